"""The hot routes (services/hot_routes.py) answer exactly as the FastAPI app does.

Each request goes to an in-process replica twice: through the app (`call`, what every other route
runs) and through the deployment's `__call__` (`deploy`: the hot path, falling through to the app
off its happy path). Status, headers and body must be equal, bar the random `request_id`; the
happy path must not have run the app, and the error cases must be counted under the same labels.
"""

from __future__ import annotations

import pytest

from services.api_schema import RecommendQuery, RecommendRequest, SimilarQuery
from services.hot_routes import FallThrough, query_params, route_path
from tests.fixtures.fake_registry import install_fake_loads, install_fake_registry
from tests.fixtures.replica import in_process_replica, replica_globals

JSON = (b"content-type", b"application/json")

# (method, path, query, json body, raw body, key, headers, answered by the hot path itself)
CASES = [
    ("GET", "/v1/recommendations", "user_id=u1", None, None, "k1", None, True),
    ("GET", "/v1/recommendations", "user_id=u1&k=2&scene=default&exclude_seen=false", None, None, "k1", None, True),
    ("GET", "/v1/recommendations", "user_id=u1&exclude_seen=no&unknown=1", None, None, "k1", None, True),
    ("GET", "/v1/recommendations", "user_id=%20u%C3%A9%20", None, None, "k1", None, True),
    ("GET", "/v1/recommendations", "user_id=%20%20", None, None, "k1", None, True),  # 422 raised by the route
    ("GET", "/v1/recommendations", "user_id=u1&scene=kids", None, None, "k1", None, True),  # 404 from the route
    ("GET", "/v1/recommendations", "user_id=u1", None, None, None, None, True),  # 401
    ("GET", "/v1/recommendations", "user_id=u1", None, None, "nope", None, True),  # 403
    ("GET", "/v1/recommendations", "user_id=u1&k=0", None, None, "k1", None, False),
    ("GET", "/v1/recommendations", "user_id=u1&k=ten", None, None, "k1", None, False),
    ("GET", "/v1/recommendations", "user_id=u1&k=1&k=2", None, None, "k1", None, False),
    ("GET", "/v1/recommendations", "", None, None, "k1", None, False),
    ("GET", "/v1/recommendations", "user_id=u1&scene=bad%20scene!", None, None, "k1", None, False),
    ("GET", "/v1/recommendations", "user_id=" + "x" * 300, None, None, "k1", None, False),
    ("GET", "/v1/recommendations/", "user_id=u1", None, None, "k1", None, False),
    ("GET", "/v1/items/m1/similar", "", None, None, "k1", None, True),
    ("GET", "/v1/items/m1/similar", "k=1&scene=default", None, None, "k1", None, True),
    ("GET", "/v1/items/nosuch/similar", "", None, None, "k1", None, True),  # 404 from the route
    ("GET", "/v1/items/m1/similar", "k=0", None, None, "k1", None, False),
    ("GET", "/v1/items//similar", "", None, None, "k1", None, False),
    ("POST", "/v1/recommendations", "", {"recent_items": ["m1"], "k": 2}, None, "k1", None, True),
    ("POST", "/v1/recommendations", "", {"user_id": "u1", "filters": {"exclude_items": ["m2"]}}, None, "k1", None,
     True),
    ("POST", "/v1/recommendations", "", {"k": 3}, None, "k1", None, True),  # 422 raised by the route
    ("POST", "/v1/recommendations", "", {"recent_items": ["m1"]}, None, "nope", None, True),  # 403
    ("POST", "/v1/recommendations", "", {"user_id": "u1", "colour": "red"}, None, "k1", None, False),
    ("POST", "/v1/recommendations", "", {"recent_items": []}, None, "k1", None, False),
    ("POST", "/v1/recommendations", "", None, b"{not json", "k1", None, False),
    ("POST", "/v1/recommendations", "", None, b"[1, 2]", "k1", None, False),
    ("POST", "/v1/recommendations", "", None, b'{"recent_items": ["m1"]}', "k1",
     [(b"content-type", b"text/plain"), (b"content-length", b"24")], False),
    ("POST", "/v1/recommendations", "", None, b'{"recent_items": ["m1"]}', "k1", [JSON], False),  # no length
    ("POST", "/v1/recommendations", "", None, b'{"recent_items": ["m1"]}', "k1",
     [JSON, (b"content-length", b"999999999")], False),  # 413 from the edge
]


def _without_request_id(body: object) -> object:
    return {k: v for k, v in body.items() if k != "request_id"} if isinstance(body, dict) else body


@pytest.fixture()
def rep(monkeypatch, tmp_path):
    install_fake_registry(monkeypatch, {"default": "v000001"})
    loads = install_fake_loads(monkeypatch)
    loads.release.set()
    with in_process_replica(monkeypatch, tmp_path) as rep:
        rep.until(lambda: rep.inst.versions.ready)
        app_runs: list[str] = []
        run_asgi = replica_globals()["run_asgi"]

        async def counted(app, request, body=None):
            app_runs.append(request.scope["path"])
            return await run_asgi(app, request, body)

        monkeypatch.setitem(replica_globals(), "run_asgi", counted)
        rep.app_runs = app_runs
        yield rep


def _requests_total(rep) -> dict[tuple[str, str], float]:
    return {(s.labels["route"], s.labels["status"]): s.value
            for metric in rep.inst.metrics.registry.collect() if metric.name == "streamrec_requests"
            for s in metric.samples if s.name == "streamrec_requests_total"}


def test_the_hot_path_answers_as_the_app_does(rep):
    for method, path, query, body, raw, key, headers, hot in CASES:
        before = _requests_total(rep)
        app_status, app_body, app_headers = rep.call(method, path, query, body, raw, key, headers)
        by_app = {k: v - before.get(k, 0.0) for k, v in _requests_total(rep).items() if v != before.get(k, 0.0)}
        rep.app_runs.clear()
        before = _requests_total(rep)
        status, got, got_headers = rep.deploy(method, path, query, body, raw, key, headers)
        by_deploy = {k: v - before.get(k, 0.0) for k, v in _requests_total(rep).items() if v != before.get(k, 0.0)}
        case = (method, path, query, body, raw, key)
        assert status == app_status, (case, got, app_body)
        assert _without_request_id(got) == _without_request_id(app_body), case
        assert got_headers == app_headers, case
        assert by_deploy == by_app, case  # the same route/status labels, successes and errors alike
        assert (not rep.app_runs) == hot, (case, "answered by the hot path" if not rep.app_runs else "by the app")
    statuses = {rep.deploy(m, p, q, b, r, k, h)[0] for m, p, q, b, r, k, h, _ in CASES}
    assert {200, 401, 403, 404, 413, 422} <= statuses  # the cases do reach every kind of answer


def test_with_cors_configured_every_request_goes_through_the_app(monkeypatch, tmp_path):
    install_fake_registry(monkeypatch, {"default": "v000001"})
    install_fake_loads(monkeypatch).release.set()
    env = {"STREAMREC_CORS_ORIGINS": "https://shop.example"}
    with in_process_replica(monkeypatch, tmp_path, env=env) as rep:
        rep.until(lambda: rep.inst.versions.ready)
        origin = [(b"origin", b"https://shop.example")]
        status, _, headers = rep.deploy("GET", "/v1/recommendations", "user_id=u1", headers=origin)
        assert status == 200 and headers["access-control-allow-origin"] == "https://shop.example"


def test_the_app_reads_the_query_through_the_hot_paths_models():
    """One definition of what a valid query is: the routes' parameters are these models."""
    from services.serve_app import ApiReplica

    hints = {name: getattr(ApiReplica, name).__annotations__["q"] for name in ("recommend_get", "similar")}
    assert hints["recommend_get"].__origin__ is RecommendQuery
    assert hints["similar"].__origin__ is SimilarQuery
    assert ApiReplica.recommend_post.__annotations__["body"] in (RecommendRequest, "RecommendRequest")


def test_query_parsing_and_the_prefix_follow_starlette():
    assert query_params({"query_string": b"user_id=u%20%C3%A9&k=3&flag"}) == {"user_id": "u é", "k": "3", "flag": ""}
    with pytest.raises(FallThrough):
        query_params({"query_string": b"k=1&k=2"})
    assert route_path({"path": "/imp/v1/recommendations", "root_path": "/imp"}) == "/v1/recommendations"
    assert route_path({"path": "/v1/recommendations", "root_path": ""}) == "/v1/recommendations"
    assert route_path({"path": "/important", "root_path": "/imp"}) == "/important"


def test_a_hot_get_stops_serves_disconnect_watch_and_a_serve_upgrade_would_show():
    """services/hot_routes.py `stop_watching_disconnect` relies on this private attribute of Serve's receive
    proxy: when an upgrade renames it, this fails (the API still works, only slower)."""
    import asyncio

    from ray.serve._private.http_util import ASGIReceiveProxy
    from starlette.requests import Request

    from services.hot_routes import stop_watching_disconnect

    fetched: list[object] = []

    async def fetch(metadata):
        fetched.append(metadata)
        return b""

    proxy = ASGIReceiveProxy({"type": "http"}, "meta", fetch)
    assert proxy._receive_asgi_messages is fetch

    async def run():
        assert stop_watching_disconnect(Request({"type": "http"}, proxy))
        task = asyncio.create_task(proxy.fetch_until_disconnect())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not task.done()
        task.cancel()

    asyncio.run(run())
    assert fetched == []  # the proxy was never called back
    assert not stop_watching_disconnect(Request({"type": "http"}, lambda: None))  # a plain receive: left alone
