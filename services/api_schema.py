"""The HTTP API's contract: request bodies, response bodies and the one error shape (pydantic;
FastAPI turns them into the OpenAPI at /docs, which clients -- and a fuzzer -- read).

This module is the only definition: `services/serve_app.py` answers every route with one of
these models and every error with `ErrorBody`, and tests/services/test_api_schema.py fails when a
route's documented answer or an emitted error drifts from them.

Every bound is a named constant here, and every request model forbids unknown fields, so a bad
request is a 422 whose `error` names the field: `{"error": "invalid request: k", "detail":
[{"field": "k", "msg": ..., "type": ...}]}`. Other errors (401, 403, 404, and the 503 of a scene
this replica is still loading, with a `Retry-After` header) carry their message in both `error` and
`detail`; so do the refusals of a request too large (413 body, 414 query string, 431 headers: every
route; 400 for a body that is not even text) and of an API key over its rate limit (429 with
`Retry-After`: every /v1 route).

The probes: `GET /healthz` (liveness: `HealthResponse`, or a 503 `ErrorBody` naming a stopped
follower) and `GET /readyz` (readiness: `ReadinessResponse`, with 200 when ready and 503 when not --
a probe's answer, not an error of the request, so the same model both times).
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from training.registry import NAME_RE

MAX_K = 100
DEFAULT_K = 10
MAX_QUERY_CHARS = 512
MAX_RECENT_ITEMS = 200
MAX_ID_CHARS = 256
QUERY_WEIGHT_MIN, QUERY_WEIGHT_MAX = 0.0, 1.0  # 0: the history's ranking alone; 1: the query's alone
SCENE_PATTERN = NAME_RE.pattern  # a scene is a registry name

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, strip_whitespace=True)]
Scene = Annotated[str, StringConstraints(pattern=SCENE_PATTERN)]


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exclude_items: list[Id] = Field(default_factory=list, max_length=1000, description="never return these items")
    genres: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=50,
        description="only items whose text mentions one of these (case-insensitive), e.g. ['Comedy']")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id | None = Field(default=None, description="a known user: their recent items are read from Redis")
    recent_items: list[Id] | None = Field(default=None, min_length=1, max_length=MAX_RECENT_ITEMS,
                                          description="an anonymous session's items, oldest first")
    query: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS, strip_whitespace=True)] | None = Field(
        default=None, description="optional intent as text: with no history it alone decides the list; with a "
                                  "history it is blended with the history's ranking (`query_weight`)")
    query_weight: float | None = Field(
        default=None, json_schema_extra={"minimum": QUERY_WEIGHT_MIN, "maximum": QUERY_WEIGHT_MAX},
        description="the blend between the history's ranking (0) and the query's (1); default: the adapter's, "
                    "chosen on held-out data so that a query visibly moves the list")
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K, description="number of items")
    scene: Scene = Field(default="default", description="which adapter answers")
    exclude_seen: bool = Field(default=True, description="leave out items the user has interacted with")
    filters: Filters | None = None

    @field_validator("query_weight")
    @classmethod
    def _weight_in_range(cls, v: float | None) -> float | None:
        # a validator, not ge/le: the 422's message names the value the client sent
        if v is not None and not QUERY_WEIGHT_MIN <= v <= QUERY_WEIGHT_MAX:
            raise ValueError(f"query_weight={v!r}: must be between {QUERY_WEIGHT_MIN:g} and {QUERY_WEIGHT_MAX:g}")
        return v

    def input_errors(self) -> list[dict[str, Any]]:
        """The rule no single field states -- a request names a user, a session or a query -- as
        pydantic-style errors (`loc`, `msg`, `type`) for the same 422 as a bad field; [] when met."""
        if self.user_id is None and self.recent_items is None and self.query is None:
            return [{"loc": ("body", "user_id"), "msg": "give user_id, recent_items or query", "type": "missing"}]
        return []


class RecommendQuery(BaseModel):
    """The query parameters of `GET /v1/recommendations`. FastAPI reads them through this model and so
    does the replica's hot path (services/hot_routes.py): one definition, one validation."""
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K)
    scene: str = Field(default="default", pattern=SCENE_PATTERN)
    exclude_seen: bool = True


class SimilarQuery(BaseModel):
    """The query parameters of `GET /v1/items/{item_id}/similar` (FastAPI's and the hot path's)."""
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K)
    scene: str = Field(default="default", pattern=SCENE_PATTERN)


class ScoredItem(BaseModel):
    item_id: str
    score: float
    title: str | None = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    scene: str
    version: str | None = Field(description="adapter version that produced the list (null on a fallback)")
    fallback: Literal["popular", "trending"] | None = Field(
        description="null when the model answered; 'trending' for users with no history; 'popular' when Redis is down")
    request_id: str = Field(description="unique id of this answer: send it back on a click (event fields `request_id` "
                                        "and the item's 1-based `position`) so the click is attributed to it")
    variant: str = Field(default="control", description="the experiment variant that answered: `control` (the live "
                                                        "version) or a candidate version")


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    scene: str
    version: str


class SceneVersion(BaseModel):
    version: str = Field(description="the version this replica serves")
    pinned: bool = Field(description="held by user_config pins rather than following the registry")


class ExperimentView(BaseModel):
    """A scene's running experiment as one replica sees it."""

    id: str
    kind: Literal["manual", "canary"]
    candidates: dict[str, float] = Field(description="candidate version -> percent of the scene's users")
    ready: list[str] = Field(description="candidates loaded on that replica (the others' users get control meanwhile)")
    failed: dict[str, str] = Field(default_factory=dict, description="candidates that cannot load there, and why")


class ReplicaView(BaseModel):
    scenes: dict[str, str] = Field(description="scene -> the version that replica serves")
    pins: dict[str, str]
    experiments: dict[str, ExperimentView] = Field(default_factory=dict, description="scene -> its experiment there")
    age_s: float = Field(description="seconds since that replica's last heartbeat")


class ModelsResponse(BaseModel):
    scenes: dict[str, SceneVersion] = Field(description="the answering replica's active versions")
    refused: dict[str, list[str]] = Field(description="versions this replica refused (checksum, shapes, missing file)")
    replica: str
    replicas: dict[str, ReplicaView] = Field(description="every replica heard from recently, this one included")
    experiments: dict[str, ExperimentView] = Field(default_factory=dict,
                                                   description="scene -> its running experiment (answering replica)")


class HealthResponse(BaseModel):
    """Liveness: the replica's process and every follower loop run (a stopped one is a 503 `ErrorBody`)."""

    status: Literal["ok"]
    scenes: dict[str, str] = Field(description="scene -> the version this replica serves")
    replica: str


class SceneState(BaseModel):
    """Where one scene of the registry's live set stands on one replica."""

    state: Literal["loaded", "loading", "fallback"] = Field(
        description="loaded: a version answers; loading: nothing answers yet (requests get 503 with Retry-After); "
                    "fallback: no version can answer (the live one was refused and none older is loaded), so "
                    "recommendations come from the popular/trending fallback, flagged in `fallback`")
    version: str | None = Field(description="loaded: the version serving; loading: the one being loaded; "
                                            "fallback: the one that cannot serve (null if unknown)")
    reason: str | None = Field(default=None,
                               description="why a load is being retried, or why the scene is on fallback")


class ReadinessResponse(BaseModel):
    """Readiness (`GET /readyz`): 200 once every scene of the registry's live set (the scenes with a
    CURRENT pointer, or a pin) is loaded or on fallback; 503, with `Retry-After`, until then."""

    ready: bool
    scenes: dict[str, SceneState] = Field(
        description="every scene this replica knows of: the live set and those it serves")
    replica: str
    detail: str | None = Field(default=None, description="why not ready, when it is not about one scene "
                                                         "(the registry not read yet)")


class FieldError(BaseModel):
    field: str = Field(description="the offending field, dotted (`filters.genres.0`)")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. `less_than_equal`, `missing`, `extra_forbidden`")


class ErrorBody(BaseModel):
    """Every error answer (4xx, and a route's 503): `error` is a message naming the bad value (or the
    scene still loading); `detail` the per-field list on a 422."""

    error: str
    detail: list[FieldError] | str | None = None


def field_name(loc: Iterable[Any]) -> str:
    """A pydantic error location as the field a client wrote (`("body", "filters", "genres", 0)` ->
    `filters.genres.0`); the whole location when it names no field (a body that is not an object)."""
    loc = tuple(loc)
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path")) or str(loc)


def validation_error(errors: Iterable[Mapping[str, Any]]) -> ErrorBody:
    """The 422 body for pydantic/FastAPI errors (dicts with `loc`, `msg`, `type`)."""
    errors = list(errors)
    fields = [field_name(e["loc"]) for e in errors]
    return ErrorBody(error=f"invalid request: {', '.join(fields)}",
                     detail=[FieldError(field=f, msg=e["msg"], type=e["type"]) for f, e in zip(fields, errors)])


def http_error(detail: object) -> ErrorBody:
    """The body of any other 4xx: its message (`detail` of the HTTPException) in both fields."""
    if isinstance(detail, str):
        return ErrorBody(error=detail, detail=detail)
    return ErrorBody(error="invalid request", detail=None if detail is None else str(detail))


ERROR_DESCRIPTIONS = {
    400: "the request could not be parsed: a body that is not UTF-8 text, or an invalid Content-Length",
    401: "no API key (header x-api-key) while STREAMREC_API_KEYS is set",
    403: "the API key is not accepted",
    404: "unknown scene or item (the message names it)",
    422: "invalid request (`error` and `detail` name the field)",
    413: "the request body is larger than STREAMREC_MAX_BODY_BYTES",
    414: "the query string is longer than STREAMREC_MAX_QUERY_BYTES",
    429: "this API key is over its rate limit (STREAMREC_RATE_LIMIT_RPS, _BURST); retry after the `Retry-After` "
         "header's seconds",
    431: "the request's headers are larger than STREAMREC_MAX_HEADER_BYTES",
    503: "the scene exists but this replica is still loading its adapter (warm-up), or has none that can answer "
         "this route; retry after the `Retry-After` header's seconds when it is given",
}
# What any route may answer before it runs (services/request_limits.py), and a keyed route besides
# 401/403 (services/rate_limit.py).
EDGE_ERRORS = (400, 413, 414, 431)
KEYED_ERRORS = (401, 403, 429)


def error_responses(*statuses: int, media_type: str | None = None) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each status documented with `ErrorBody` (FastAPI's own 422 model
    is replaced by it). `media_type`: for a route whose answers are not JSON (/metrics), its errors are."""
    if media_type is None:
        return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}
    ref = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}  # (ErrorBody is in components: every route uses it)
    return {status: {"description": ERROR_DESCRIPTIONS[status], "content": {media_type: {"schema": ref}}}
            for status in statuses}


__all__ = ["DEFAULT_K", "EDGE_ERRORS", "ERROR_DESCRIPTIONS", "KEYED_ERRORS", "ErrorBody", "RecommendQuery", "SimilarQuery", "FieldError", "Filters",
           "HealthResponse", "MAX_ID_CHARS",
           "MAX_K", "MAX_QUERY_CHARS", "MAX_RECENT_ITEMS", "QUERY_WEIGHT_MAX", "QUERY_WEIGHT_MIN", "ModelsResponse",
           "ExperimentView", "ReadinessResponse", "RecommendRequest",
           "RecommendResponse", "ReplicaView", "SCENE_PATTERN", "SceneState", "SceneVersion", "ScoredItem",
           "SimilarResponse", "error_responses", "field_name", "http_error", "validation_error"]
