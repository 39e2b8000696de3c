"""The probes of an `Api` replica: readiness (`/readyz`), liveness (`/healthz`, `check_health`) and the
warm-up 503, against a replica built in this process (tests/fixtures/replica.py) whose registry is a
fake and whose adapter load waits for the test to release it (tests/fixtures/fake_registry.py) -- no
Serve, no model, Redis unreachable.

The follower's state machine behind `/readyz` is tested on its own in test_registry_follower.py; the
real Serve path (a scene published to a running API answers 503, never 404, until it loads) in
test_serve.py.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from services import serve_app
from services.api_schema import ErrorBody, ReadinessResponse, RecommendResponse
from tests.fixtures.fake_registry import install_fake_loads, install_fake_registry
from tests.fixtures.replica import in_process_replica, replica_globals


@pytest.fixture()
def registry(monkeypatch):
    """The registry every replica of the test reads: `live` is scene -> CURRENT version."""
    live: dict[str, str] = {"default": "v000001"}
    install_fake_registry(monkeypatch, live)
    return live


@pytest.fixture()
def loads(monkeypatch):
    """The replica's adapter loads: each waits for `release`; `refuse` holds model ids that fail for good."""
    return install_fake_loads(monkeypatch)


def test_a_replica_loading_its_adapter_is_not_ready_and_warm_up_requests_get_503(monkeypatch, tmp_path, registry,
                                                                                 loads):
    monkeypatch.setitem(replica_globals(), "WARMUP_WAIT_S", 0.0)  # as if the warm-up bound passed mid-load
    with in_process_replica(monkeypatch, tmp_path) as rep:
        rep.until(lambda: loads.calls)
        status, body, headers = rep.call("GET", "/readyz", key=None)
        ready = ReadinessResponse.model_validate(body)
        assert status == 503 and not ready.ready and headers["retry-after"] == str(serve_app.RETRY_AFTER_S)
        assert ready.scenes["default"].state == "loading" and ready.scenes["default"].version == "v000001"
        assert rep.call("GET", "/healthz", key=None)[0] == 200  # alive while it loads: no restart

        for method, path, query, req in [("GET", "/v1/recommendations", "user_id=u1", None),
                                         ("POST", "/v1/recommendations", "", {"recent_items": ["m1"]}),
                                         ("GET", "/v1/items/m1/similar", "", None)]:
            status, body, headers = rep.call(method, path, query, req)
            assert status == 503, (method, path, body)
            assert headers["retry-after"] == str(serve_app.RETRY_AFTER_S)
            error = ErrorBody.model_validate(body).error
            assert "'default'" in error and "loading" in error and "v000001" in error
        status, body, _ = rep.call("GET", "/v1/recommendations", "user_id=u1&scene=kids")
        assert status == 404 and "kids" in ErrorBody.model_validate(body).error  # no such scene: still 404

        loads.release.set()
        rep.until(lambda: rep.inst.versions.ready)
        status, body, headers = rep.call("GET", "/readyz", key=None)
        assert status == 200 and body["scenes"]["default"] == {"state": "loaded", "version": "v000001", "reason": None}
        assert "retry-after" not in headers
        status, body, _ = rep.call("POST", "/v1/recommendations", body={"recent_items": ["m1"], "k": 2})
        answer = RecommendResponse.model_validate(body)
        assert status == 200 and answer.version == "v000001" and answer.fallback is None
        assert [i.item_id for i in answer.items] == ["m2", "m3"]
        assert rep.call("GET", "/v1/recommendations", "user_id=u1&scene=kids")[0] == 404


def test_serve_gets_the_replica_only_once_it_is_ready(monkeypatch, tmp_path, registry, loads):
    """Serve routes requests to a replica once its constructor and first reconfigure return: the
    warm-up happens before, so a new replica (a restart, an autoscaling step) never answers 503."""
    loads.release.set()
    registry["homepage"] = "v000004"
    with in_process_replica(monkeypatch, tmp_path) as rep:  # nothing more runs the loop before the asserts
        status, body, _ = rep.call("GET", "/readyz", key=None)
        assert status == 200 and {s: st["state"] for s, st in body["scenes"].items()} == {
            "default": "loaded", "homepage": "loaded"}
        assert rep.call("GET", "/v1/items/m1/similar", "scene=homepage")[0] == 200


def test_pins_apply_from_the_first_load(monkeypatch, tmp_path, registry, loads):
    """The pins arrive with the first reconfigure, before the registry follower starts: a pinned
    scene never loads (or serves) CURRENT first."""
    loads.release.set()
    with in_process_replica(monkeypatch, tmp_path, user_config={"pins": {"default": "v000000"}}) as rep:
        assert rep.call("GET", "/readyz", key=None)[1]["scenes"]["default"]["version"] == "v000000"
    assert loads.calls == ["default@v000000"]


def test_a_scene_whose_live_version_is_refused_is_ready_on_a_declared_fallback(monkeypatch, tmp_path, registry,
                                                                               loads):
    loads.release.set()
    loads.refuse.add("default@v000001")
    with in_process_replica(monkeypatch, tmp_path) as rep:
        status, body, _ = rep.call("GET", "/readyz", key=None)
        scene = ReadinessResponse.model_validate(body).scenes["default"]
        assert status == 200 and scene.state == "fallback" and "checksum mismatch" in scene.reason
        status, body, _ = rep.call("POST", "/v1/recommendations", body={"recent_items": ["m1"]})
        answer = RecommendResponse.model_validate(body)
        assert status == 200 and answer.fallback == "popular" and answer.version is None
        status, body, headers = rep.call("GET", "/v1/items/m1/similar")
        assert status == 503 and "checksum mismatch" in ErrorBody.model_validate(body).error
        assert "retry-after" not in headers  # not a warm-up: retrying soon will not help


def test_liveness_fails_when_a_follower_stopped(monkeypatch, tmp_path, registry, loads):
    loads.release.set()
    with in_process_replica(monkeypatch, tmp_path) as rep:
        assert rep.call("GET", "/healthz", key=None)[0] == 200
        rep.inst.check_health()
        rep.inst.stop_followers()
        rep.until(lambda: rep.inst.stopped_followers())
        status, body, _ = rep.call("GET", "/healthz", key=None)
        assert status == 503 and "stopped" in ErrorBody.model_validate(body).error
        with pytest.raises(RuntimeError, match="stopped"):
            rep.inst.check_health()


# --- the client `streamrec up` waits with ----------------------------------------------------------
@pytest.fixture()
def fake_api():
    """An HTTP server answering GET /readyz with `answer["status"]` and `answer["body"]`."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = {"status": 503, "body": {"ready": False, "scenes": {"default": {"state": "loading"}}}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            payload = json.dumps(answer["body"]).encode()
            self.send_response(answer["status"] if self.path == "/readyz" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", answer=answer)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_api_client_is_ready_only_when_readyz_says_so(fake_api):
    from services.api_client import ApiClient, ApiError
    from tests.fixtures.replica import closed_port

    api = ApiClient(fake_api.url, timeout_s=5)
    assert api.readiness()["scenes"]["default"]["state"] == "loading"  # a 503 is an answer, not an error
    assert not api.ready("default")
    fake_api.answer.update(status=200, body={"ready": True, "scenes": {"default": {"state": "loaded"}}})
    assert api.ready("default") and api.ready() and not api.ready("homepage")
    fake_api.answer.update(status=500, body={"error": "boom"})
    with pytest.raises(ApiError, match="HTTP 500"):
        api.ready()
    with pytest.raises(ApiError):
        ApiClient(f"http://127.0.0.1:{closed_port()}", timeout_s=2).ready()
