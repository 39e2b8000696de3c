"""Request and response bodies of the HTTP API (pydantic; FastAPI turns them into the OpenAPI at /docs).

Every bound is a named constant here, and every request model forbids unknown fields, so a bad
request is a 422 whose `detail` names the field (`loc`) -- see `services/serve_app.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from training.registry import NAME_RE

MAX_K = 100
DEFAULT_K = 10
MAX_QUERY_CHARS = 512
MAX_RECENT_ITEMS = 200
MAX_ID_CHARS = 256
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
        default=None, description="optional intent as text, blended into the user embedding")
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K, description="number of items")
    scene: Scene = Field(default="default", description="which adapter answers")
    exclude_seen: bool = Field(default=True, description="leave out items the user has interacted with")
    filters: Filters | None = None


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


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    scene: str
    version: str


class ErrorBody(BaseModel):
    error: str
    detail: object | None = None


__all__ = ["DEFAULT_K", "ErrorBody", "Filters", "MAX_ID_CHARS", "MAX_K", "MAX_QUERY_CHARS", "MAX_RECENT_ITEMS", "RecommendRequest",
           "RecommendResponse", "SCENE_PATTERN", "ScoredItem", "SimilarResponse"]
