"""services/api_schema.py is the one definition of the HTTP contract: the documented answers, the
emitted errors and every error body built elsewhere in services/ must agree with it.

The emission checks run the real FastAPI app (its routes and error handlers, with the replica as
`self` as services/serve_app.py wires them) against an `Api` replica built in this process -- no Serve, no Ray, Redis unreachable
on purpose.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from services import api_schema
from services.api_schema import (
    ErrorBody, HealthResponse, ModelsResponse, ReadinessResponse, http_error, validation_error,
)
from tests.fixtures.replica import in_process_replica

ROOT = Path(__file__).resolve().parents[2]
REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def openapi() -> dict:
    from services.serve_app import api

    return api.openapi()


def _schema_name(response: dict) -> str | None:
    ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    return ref[len(REF):] if ref.startswith(REF) else None


def _operations(openapi: dict):
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            yield method.upper(), path, op


def test_the_document_describes_exactly_the_routes_the_app_serves(openapi):
    """The deployment runs this app for every request (services/serve_app.py `Api.__call__`; the hot
    routes run the app's own route methods, tests/services/test_hot_routes.py), so
    the app's routes are what is served: each one is in the document, with its methods, and the
    document names no route the app lacks (FastAPI's own /docs and /openapi.json aside)."""
    from ray.serve._private.http_util import _walk_fastapi_routes  # FastAPI >= 0.137 nests the class's routes

    from services.serve_app import Api, api

    served = {(m.lower(), prefix + r.path) for r, _, prefix in _walk_fastapi_routes(api) for m in r.methods}
    documented = {(m.lower(), p) for m, p, _ in _operations(openapi)}
    assert served == documented and len(served) >= 7
    # the hot routes (services/hot_routes.py) are app routes answered without the framework around them
    assert "run_asgi(api, request" in inspect.getsource(Api.func_or_class.__call__)


def test_every_v1_route_documents_a_typed_answer_from_api_schema(openapi):
    v1 = [(m, p, op) for m, p, op in _operations(openapi) if p.startswith("/v1/")]
    assert len(v1) >= 4
    for method, path, op in v1:
        name = _schema_name(op["responses"].get("200", {}))
        assert name, f"{method} {path}: its 200 answer has no response model"
        model = getattr(api_schema, name, None)
        assert isinstance(model, type) and issubclass(model, BaseModel), (
            f"{method} {path}: answers {name}, which services/api_schema.py does not define")


def test_every_documented_4xx_is_the_one_error_body(openapi):
    assert "HTTPValidationError" not in openapi["components"]["schemas"], "FastAPI's own 422 model leaked into /docs"
    for method, path, op in _operations(openapi):
        params = op.get("parameters") or op.get("requestBody")
        if path.startswith("/v1/") and params:
            assert "422" in op["responses"], f"{method} {path} takes input but documents no 422"
        for status, response in op["responses"].items():
            if status.startswith("4"):
                assert _schema_name(response) == "ErrorBody", f"{method} {path} documents {status} as {response}"
            if status.startswith("5"):  # a probe answers its own model; every other 503 is the one error body
                want = "ReadinessResponse" if path == "/readyz" else "ErrorBody"
                assert _schema_name(response) == want, f"{method} {path} documents {status} as {response}"


def test_the_probes_and_the_warm_up_503_are_documented(openapi):
    paths = openapi["paths"]
    assert _schema_name(paths["/healthz"]["get"]["responses"]["200"]) == "HealthResponse"
    assert _schema_name(paths["/readyz"]["get"]["responses"]["200"]) == "ReadinessResponse"
    assert _schema_name(paths["/readyz"]["get"]["responses"]["503"]) == "ReadinessResponse"
    for path in ("/v1/recommendations", "/v1/items/{item_id}/similar"):
        for op in paths[path].values():
            assert "503" in op["responses"], f"{path}: the warm-up 503 is not documented"


def test_every_route_documents_the_edge_refusals_and_the_keyed_ones_429_and_the_key(openapi):
    """What a schema-driven client (or fuzzer) may meet: 400/413/414/431 on every route (the size
    limits run before any route), and 429 plus the x-api-key security scheme on every /v1 route."""
    scheme = openapi["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "x-api-key"}
    for method, path, op in _operations(openapi):
        for status in ("400", "413", "414", "431"):
            assert _schema_name(op["responses"].get(status, {})) == "ErrorBody", f"{method} {path}: no {status}"
        if path.startswith("/v1/"):
            assert _schema_name(op["responses"].get("429", {})) == "ErrorBody", f"{method} {path}: no 429"
            assert op.get("security") == [{"ApiKey": []}], f"{method} {path} does not name the API key"
        else:
            assert "429" not in op["responses"] and "security" not in op, f"{method} {path} is not keyed"


def test_a_recommendation_links_to_the_similar_items_of_its_first_item(openapi):
    paths = openapi["paths"]
    assert paths["/v1/items/{item_id}/similar"]["get"]["operationId"] == "similar_items"
    for op in paths["/v1/recommendations"].values():
        link = op["responses"]["200"]["links"]["SimilarToFirst"]
        assert link["operationId"] == "similar_items"
        assert link["parameters"]["item_id"] == "$response.body#/items/0/item_id"


def test_the_error_builders_give_the_readme_shape():
    body = validation_error([{"loc": ("query", "k"), "msg": "Input should be greater than or equal to 1",
                              "type": "greater_than_equal"}])
    assert body.model_dump() == {"error": "invalid request: k", "detail": [
        {"field": "k", "msg": "Input should be greater than or equal to 1", "type": "greater_than_equal"}]}
    assert validation_error([{"loc": ("body",), "msg": "bad", "type": "json_invalid"}]).detail[0].field == "('body',)"
    assert http_error("scene 'kids' has no adapter").model_dump() == {
        "error": "scene 'kids' has no adapter", "detail": "scene 'kids' has no adapter"}


# --- no second error shape in services/ ---------------------------------------------------------
ERROR_KEYS = ({"loc"}, {"error", "detail"}, {"field", "msg"})


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                yield node


def test_no_error_body_is_hand_built_outside_api_schema():
    for path in sorted((ROOT / "services").rglob("*.py")):
        if path.name == "api_schema.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                assert not any(shape <= keys for shape in ERROR_KEYS), (
                    f"{where}:{node.lineno}: an error body built by hand ({sorted(keys)}); use services.api_schema")
        for call in _calls(tree, "HTTPException"):
            detail = call.args[1] if len(call.args) > 1 else next(
                (k.value for k in call.keywords if k.arg == "detail"), None)
            assert not isinstance(detail, (ast.Dict, ast.List, ast.Tuple)), (
                f"{where}:{call.lineno}: HTTPException's detail is a message; field errors go through "
                "RequestValidationError")
        for call in _calls(tree, "JSONResponse"):
            content = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "content"), None)
            assert isinstance(content, ast.Call) and isinstance(content.func, ast.Attribute) and \
                content.func.attr == "model_dump", f"{where}:{call.lineno}: a JSON response not built from a model"


# --- what a replica really emits ----------------------------------------------------------------
# (method, path, query, json body, status, a word the error must contain); the cases of test_serve.py
BAD_REQUESTS = [
    ("GET", "/v1/recommendations", "user_id=u1&k=0", None, 422, "k"),
    ("GET", "/v1/recommendations", "user_id=u1&k=101", None, 422, "k"),
    ("GET", "/v1/recommendations", "user_id=u1&k=ten", None, 422, "k"),
    ("GET", "/v1/recommendations", "", None, 422, "user_id"),
    ("GET", "/v1/recommendations", "user_id=%20%20", None, 422, "user_id"),  # blank once stripped
    ("GET", "/v1/recommendations", "user_id=u1&scene=bad%20scene!", None, 422, "scene"),
    ("GET", "/v1/recommendations", "user_id=u1&scene=nosuch", None, 404, "nosuch"),
    ("POST", "/v1/recommendations", "", {"user_id": "u1", "colour": "red"}, 422, "colour"),
    ("POST", "/v1/recommendations", "", {"recent_items": []}, 422, "recent_items"),
    ("POST", "/v1/recommendations", "", {"user_id": "u1", "query": "x" * 600}, 422, "query"),
    ("POST", "/v1/recommendations", "", {"user_id": ""}, 422, "user_id"),
    ("POST", "/v1/recommendations", "", {"k": 3}, 422, "user_id"),
    ("POST", "/v1/recommendations", "", {"user_id": "u1", "filters": {"genres": [""]}}, 422, "filters.genres.0"),
    ("GET", "/v1/items/m1/similar", "k=0", None, 422, "k"),
    ("GET", "/v1/items/m1/similar", "scene=nosuch", None, 404, "nosuch"),
    ("GET", "/v1/nosuch", "", None, 404, "Not Found"),
    ("POST", "/v1/models", "", {}, 405, "Method Not Allowed"),
]


@pytest.fixture()
def replica(monkeypatch, tmp_path):
    """`call(...)` -> (status, json) against the deployment's own ASGI app and an in-process replica."""
    with in_process_replica(monkeypatch, tmp_path) as rep:
        yield SimpleNamespace(inst=rep.inst, call=lambda *a, **kw: rep.call(*a, **kw)[:2])


def _assert_error_body(status: int, body: object) -> ErrorBody:
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) == {"error", "detail"}, body
    parsed = ErrorBody.model_validate(body)
    assert parsed.error
    return parsed


def test_every_error_a_replica_emits_is_the_one_error_body(replica):
    for method, path, query, body, status, word in BAD_REQUESTS:
        got_status, got = replica.call(method, path, query, body)
        assert got_status == status, (method, path, query, body, got)
        _assert_error_body(got_status, got)
        assert word in json.dumps(got), (method, path, query, body, got)
    # the rule no single field states, in the README's shape
    assert replica.call("POST", "/v1/recommendations", body={"k": 3}) == (422, {
        "error": "invalid request: user_id",
        "detail": [{"field": "user_id", "msg": "give user_id, recent_items or query", "type": "missing"}]})
    for status, (code, got) in [(422, replica.call("POST", "/v1/recommendations", raw=b"{not json")),
                                (401, replica.call("GET", "/v1/models", key=None)),
                                (403, replica.call("GET", "/v1/recommendations", "user_id=u1", key="nope"))]:
        assert code == status
        _assert_error_body(code, got)
    assert replica.call("GET", "/v1/models", key=None)[1]["error"] == "missing API key (header x-api-key)"


def test_the_answers_a_replica_gives_without_redis_are_typed(replica):
    status, health = replica.call("GET", "/healthz", key=None)
    assert status == 200 and HealthResponse.model_validate(health).scenes == {}
    status, ready = replica.call("GET", "/readyz", key=None)  # an empty registry: nothing to load
    assert status == 200 and ReadinessResponse.model_validate(ready).ready and ready["scenes"] == {}
    status, models = replica.call("GET", "/v1/models")
    assert status == 200
    parsed = ModelsResponse.model_validate(models)
    assert set(parsed.replicas) == {replica.inst.replica} and parsed.scenes == {} and parsed.refused == {}
    metrics = replica.inst.metrics.registry
    assert metrics.get_sample_value("streamrec_request_errors_total", {"what": "replicas"}) == 1.0
