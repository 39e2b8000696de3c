"""The live API fuzzed from its own OpenAPI schema with schemathesis: every route, generated valid
and invalid requests, and stateful runs that follow the schema's links (a recommendation's items to
their similar items). Each answer must not be a 5xx, must match the status codes, content types and
response models the schema documents for that route, and must come within CASE_TIMEOUT_S (no hang).

The API under test is real: an `Api` replica built in this process (tests/fixtures/replica.py)
with a real redis-server (seeded with a catalog, a user's history, popularity and trending), a real
published adapter (MiniLM + LoRA, FAISS index), served over HTTP by uvicorn on localhost with the
middleware and error handlers of the deployment. Only Ray Serve's proxy is left out
(tests/services/test_serve.py covers it).

The case counts are printed (`-s`) and asserted: at least MIN_TOTAL_CASES over all routes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = "fuzz-key"
N_ITEMS = 40
CASE_TIMEOUT_S = 10.0  # one request; far above any answer here (a hang fails the case)
SERVER_START_S = 30.0
MIN_TOTAL_CASES = 1000
STATEFUL_STEPS = 60  # stateful scenarios (each a few linked calls)
# generated cases per operation and mode: the routes with input get the most (a route without input
# has a handful of distinct requests, which hypothesis exhausts quickly)
POSITIVE_CASES = {"recommend_get": 250, "recommend_post": 300, "similar_items": 150}
NEGATIVE_CASES = {"recommend_get": 100, "recommend_post": 150, "similar_items": 60}
OTHER_CASES = 40
# below uvicorn's own limits (its parser refuses a head over 16 KiB first), so the API's answer shows
EDGE_LIMITS = {"max_body_bytes": 65_536, "max_query_bytes": 4096, "max_header_bytes": 8192}


def _checks():
    # (schemathesis' `ignored_auth` would triple the run time; tests/services/test_api_limits.py and
    # test_api_schema.py cover the key check)
    from schemathesis.checks import (
        content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _seed_redis(url: str, prefix: str, data_dir) -> None:
    import redis

    from streaming.events import Item
    from streaming.online_store import OnlineStore
    from streaming.pseudonym import Pseudonymizer
    from streaming.settings import load_settings
    from tests.fixtures.synthetic_adapter import synthetic_catalog

    r = redis.Redis.from_url(url)
    store = OnlineStore(r, prefix)
    ids, titles, texts = synthetic_catalog(N_ITEMS)
    store.apply_items("items", 0, [(i, Item(item_id=item, title=title, text=texts[i], ts=1_700_000_000_000))
                                   for i, (item, title) in enumerate(zip(ids, titles))])
    # user u1 as ingest stores it: under its pseudonym with the replica's key (its data dir's)
    user = Pseudonymizer.from_settings(load_settings(data_dir=data_dir))("u1")
    r.zadd(store.recent_key(user), {"m0": 1000, "m4": 2000, "m8": 3000})
    r.zadd(f"{prefix}feat:popular", {item: float(N_ITEMS - i) for i, item in enumerate(ids)})
    r.zadd(f"{prefix}feat:trending", {item: float(i) for i, item in enumerate(ids)})
    r.close()


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    """The base URL of a real replica served over HTTP (see the module's docstring)."""
    import uvicorn

    from services.processes import free_port
    from tests.fixtures.redis_server import redis_server
    from tests.fixtures.replica import in_process_replica
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter
    from training.registry import Registry

    tmp = tmp_path_factory.mktemp("fuzz")
    prefix = f"fz{uuid.uuid4().hex[:6]}:"
    with redis_server(tmp_path_factory.mktemp("redis")) as url, pytest.MonkeyPatch.context() as mp:
        _seed_redis(url, prefix, tmp)
        (tmp / "registry").mkdir()
        publish_synthetic_adapter(Registry(str(tmp / "registry")), tmp, n_items=N_ITEMS, seed=1)
        # the limit is on (its Lua script runs on every /v1 request) but far above what the fuzzer sends
        env = {"REDIS_URL": url, "STREAMREC_REDIS_PREFIX": prefix, "STREAMREC_API_KEYS": API_KEY,
               "STREAMREC_RATE_LIMIT_RPS": "100000", "STREAMREC_RATE_LIMIT_BURST": "100000",
               **{f"STREAMREC_{name.upper()}": str(value) for name, value in EDGE_LIMITS.items()}}
        with in_process_replica(mp, tmp, env=env) as rep:
            from services.serve_app import api

            assert rep.inst.versions.active.get("default"), rep.inst.versions.scene_states()
            port = free_port()
            server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning",
                                                   lifespan="off"))
            # the replica's loop runs the server: its Redis client and followers live on that loop
            thread = threading.Thread(target=rep.loop.run_until_complete, args=(server.serve(),), daemon=True)
            thread.start()
            deadline = time.monotonic() + SERVER_START_S
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
                thread.join(timeout=SERVER_START_S)


@pytest.fixture(scope="module")
def schema(live_api):
    import schemathesis

    return schemathesis.openapi.from_url(f"{live_api}/openapi.json")


def _run_cases(operation, mode, n: int, session, statuses: Counter) -> int:
    """Generate up to `n` cases of `operation` in `mode`, call and check each; the number run
    (`statuses` counts the answers by route and status)."""
    from hypothesis import HealthCheck, Phase, given, settings

    count = 0

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        nonlocal count
        count += 1
        response = case.call(session=session, headers={"x-api-key": API_KEY}, timeout=CASE_TIMEOUT_S)
        statuses[f"{case.method} {case.path} {response.status_code}"] += 1
        case.validate_response(response, checks=_checks())

    run()
    return count


def test_every_route_survives_generated_requests(schema):
    import requests
    from schemathesis import GenerationMode

    counts: dict[str, int] = {}
    statuses: Counter = Counter()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            name = op.definition.raw.get("operationId") or op.label
            label = f"{op.method.upper()} {op.path}"
            has_input = bool(op.definition.raw.get("parameters") or op.definition.raw.get("requestBody"))
            counts[f"{label} positive"] = _run_cases(op, GenerationMode.POSITIVE,
                                                     POSITIVE_CASES.get(name, OTHER_CASES), session, statuses)
            if has_input:
                counts[f"{label} negative"] = _run_cases(op, GenerationMode.NEGATIVE,
                                                         NEGATIVE_CASES.get(name, OTHER_CASES), session, statuses)
    total = sum(counts.values())
    print("\nschemathesis cases per route and mode:")
    for label, n in counts.items():
        print(f"  {label:<45} {n:>5}")
    print(f"  {'total':<45} {total:>5}")
    print("answers by route and status: " + ", ".join(f"{k}: {n}" for k, n in sorted(statuses.items())))
    assert {label.rsplit(" ", 1)[0] for label in counts} >= {
        "GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/models", "GET /v1/recommendations",
        "POST /v1/recommendations", "GET /v1/items/{item_id}/similar"}
    assert total >= MIN_TOTAL_CASES, counts


def test_linked_calls_survive_stateful_runs(schema):
    """Scenarios that follow the schema's links: a recommendation, then its first item's similar items."""
    from hypothesis import HealthCheck, settings

    checks = _checks()
    steps: Counter = Counter()

    class Machine(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": {"x-api-key": API_KEY}, "timeout": CASE_TIMEOUT_S}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            steps[f"{case.method} {case.path} {response.status_code}"] += 1
            case.validate_response(response, checks=checks)

    Machine.run(settings=settings(max_examples=STATEFUL_STEPS, deadline=None, database=None, derandomize=True,
                                  suppress_health_check=list(HealthCheck), stateful_step_count=4))
    calls = sum(steps.values())
    print(f"\nstateful: {STATEFUL_STEPS} scenarios, {calls} calls: " +
          ", ".join(f"{k}: {n}" for k, n in sorted(steps.items())))
    assert calls >= STATEFUL_STEPS


def test_oversized_requests_over_real_http_get_their_4xx(live_api):
    """The size limits as a client meets them through a real HTTP server: a body announced too large,
    a chunked body that grows too large (no Content-Length), a query string, headers."""
    import requests

    from services.api_schema import ErrorBody

    url, key = f"{live_api}/v1/recommendations", {"x-api-key": API_KEY}
    big = b'{"recent_items": ["' + b"m" * (EDGE_LIMITS["max_body_bytes"] + 1) + b'"]}'

    def chunked():  # a generator body: requests sends it with Transfer-Encoding: chunked
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    answers = {
        "announced": requests.post(url, data=big, headers={**key, "content-type": "application/json"},
                                   timeout=CASE_TIMEOUT_S),
        "chunked": requests.post(url, data=chunked(), headers={**key, "content-type": "application/json"},
                                 timeout=CASE_TIMEOUT_S),
        "query": requests.get(url, params={"user_id": "u" * EDGE_LIMITS["max_query_bytes"]}, headers=key,
                              timeout=CASE_TIMEOUT_S),
        "headers": requests.get(url, params={"user_id": "u1"}, timeout=CASE_TIMEOUT_S,
                                headers={**key, "x-padding": "p" * EDGE_LIMITS["max_header_bytes"]}),
    }
    assert {what: r.status_code for what, r in answers.items()} == {
        "announced": 413, "chunked": 413, "query": 414, "headers": 431}
    for r in answers.values():
        assert "STREAMREC_MAX_" in ErrorBody.model_validate(r.json()).error
    assert requests.get(url, params={"user_id": "u1"}, headers=key, timeout=CASE_TIMEOUT_S).status_code == 200
