"""The Ray Serve API against real Ray Serve, a real Redis, a real registry and the real MiniLM.

Adapters are built directly (the model untrained, LoRA at its initialization) and published
through the registry: serving is what is under test here, not training quality. This module
runs its own redis-server (tests/fixtures/redis_server.py, append-only file on) so one test can stop it
and start it again on the same port without disturbing the session's shared stack.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from services.api_schema import ErrorBody, ModelsResponse
from services.processes import free_port
from tests.fixtures.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_ITEMS = 40
LOAD_S = 30.0  # the hot-reload test keeps at least MIN_RPS requests/s going this long
MIN_RPS = 20.0


def publish_adapter(registry, tmp: Path, *, seed: int, corrupt: bool = False) -> str:
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter

    # with the second stage (ranker, prior, trending), as `streamrec train` publishes; the "homepage"
    # scene below is published without one: an older adapter, served by its first stage
    return publish_synthetic_adapter(registry, tmp, n_items=N_ITEMS, seed=seed, corrupt=corrupt, ranker=True)


@pytest.fixture(scope="module")
def served(ray_local, embedded_stack, tmp_path_factory):
    import redis
    from ray import serve

    from services.serve_app import build_app
    from streaming.settings import load_settings, settings_env
    from training.registry import Registry

    tmp = tmp_path_factory.mktemp("serve")
    # AOF fsync'd at every write, so a restart keeps the data (tests/fixtures/redis_server.py)
    redis_proc = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="always").start()
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    port = free_port()
    # the shared broker takes the impressions (a topic of this module's own)
    settings = load_settings(redis_url=redis_proc.url, redis_prefix=prefix, data_dir=tmp,
                             registry_root=str(tmp / "registry"), api_keys=("k1",), serve_port=port,
                             kafka_bootstrap_servers=embedded_stack.kafka_bootstrap,
                             impressions_topic=f"impressions-{prefix.rstrip(':')}")
    from streaming.kafka_io import ensure_topics

    ensure_topics(settings, [settings.impressions_topic])  # as `streamrec up` (or a KafkaTopic) creates it
    registry = Registry(settings.registry_uri)
    r = redis.Redis.from_url(redis_proc.url)
    from tests.fixtures.synthetic_adapter import seed_serving_store, synthetic_catalog

    store = seed_serving_store(r, settings, N_ITEMS)
    ids, _, _ = synthetic_catalog(N_ITEMS)
    r.zadd(f"{prefix}feat:trending", {item: float(i) for i, item in enumerate(ids)})
    v1 = publish_adapter(registry, tmp, seed=1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings_env(settings)), name="streamrec-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:  # readiness, not liveness: the API can answer once /readyz is 200
        try:
            resp = requests.get(f"{base}/readyz", timeout=2)
            if resp.status_code == 200 and resp.json()["scenes"].get("default", {}).get("version") == v1:
                break
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    else:
        pytest.fail("the API never became ready with the first adapter")
    yield {"base": base, "registry": registry, "tmp": tmp, "redis": r, "store": store, "prefix": prefix, "v1": v1,
           "headers": {"X-API-Key": "k1"}, "redis_proc": redis_proc, "settings": settings}
    serve.delete("streamrec-test")
    serve.shutdown()
    redis_proc.stop()


def _get(s, path, **params):
    return requests.get(s["base"] + path, params=params, headers=s["headers"], timeout=10)


def test_the_served_openapi_document_is_the_apps_and_every_route_answers(served):
    """The replica runs the FastAPI app in its own process (services/asgi_call.py): the document
    served at /openapi.json is the app's, and every route it documents answers 200 through Serve."""
    from services.serve_app import api

    base = served["base"]
    doc = requests.get(f"{base}/openapi.json", timeout=10).json()
    assert doc == json.loads(json.dumps(api.openapi()))
    assert requests.get(f"{base}/docs", timeout=10).status_code == 200
    answered = set()
    for path, ops in doc["paths"].items():
        url = base + path.replace("{item_id}", "m1")
        for method in ops:
            if method == "get":
                params = {"user_id": "u1", "k": 3} if path == "/v1/recommendations" else None
                resp = requests.get(url, params=params, headers=served["headers"], timeout=30)
            else:
                assert (method, path) == ("post", "/v1/recommendations"), f"a route this test does not know: {method} {path}"
                resp = requests.post(url, json={"user_id": "u1", "k": 3}, headers=served["headers"], timeout=30)
            assert resp.status_code == 200, (method, path, resp.status_code, resp.text)
            answered.add((method, path))
    assert ("get", "/v1/items/{item_id}/similar") in answered and len(answered) >= 7


def test_recommendations_for_a_known_user(served):
    resp = _get(served, "/v1/recommendations", user_id="u1", k=5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == served["v1"] and body["fallback"] is None and body["scene"] == "default"
    got = [it["item_id"] for it in body["items"]]
    assert len(got) == 5 and not {"m0", "m4", "m8"} & set(got)
    assert all(it["title"].startswith("Movie ") for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_anonymous_session_query_and_similar(served):
    resp = requests.post(served["base"] + "/v1/recommendations", headers=served["headers"], timeout=10,
                         json={"recent_items": ["m1", "m5"], "query": "something funny", "k": 3})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["items"]) == 3 and not {"m1", "m5"} & {i["item_id"] for i in resp.json()["items"]}
    sim = _get(served, "/v1/items/m2/similar", k=4)
    assert sim.status_code == 200 and len(sim.json()["items"]) == 4
    assert "m2" not in {i["item_id"] for i in sim.json()["items"]}


def test_query_alone_and_query_weight(served):
    """A query alone answers its nearest items (the first is the item whose text it is); beside a
    history, `query_weight` 0 (the history's ranking) and 1 (the query's) give different lists."""
    def post(**body):
        resp = requests.post(served["base"] + "/v1/recommendations", headers=served["headers"], timeout=10,
                             json={"k": 5, **body})
        assert resp.status_code == 200, resp.text
        assert resp.json()["fallback"] is None
        return [i["item_id"] for i in resp.json()["items"]]

    assert post(query="Movie 17. Genres: Thriller.")[0] == "m17"
    history = ["m1", "m7", "m13", "m19", "m25"]  # Drama (GENRES[i % 6])
    by_history = post(recent_items=history, query="Movie 17. Genres: Thriller.", query_weight=0.0)
    by_query = post(recent_items=history, query="Movie 17. Genres: Thriller.", query_weight=1.0)
    assert by_history != by_query and by_query[0] == "m17"


def test_unknown_user_gets_trending(served):
    body = _get(served, "/v1/recommendations", user_id="nobody", k=3).json()
    assert body["fallback"] == "trending" and [i["item_id"] for i in body["items"]] == ["m39", "m38", "m37"]


@pytest.mark.parametrize("method,path,params,body,status,field", [
    ("GET", "/v1/recommendations", {"user_id": "u1", "k": 0}, None, 422, "k"),
    ("GET", "/v1/recommendations", {"user_id": "u1", "k": 101}, None, 422, "k"),
    ("GET", "/v1/recommendations", {"user_id": "u1", "k": "ten"}, None, 422, "k"),
    ("GET", "/v1/recommendations", {}, None, 422, "user_id"),
    ("GET", "/v1/recommendations", {"user_id": "u1", "scene": "bad scene!"}, None, 422, "scene"),
    ("GET", "/v1/recommendations", {"user_id": "u1", "scene": "nosuch"}, None, 404, "nosuch"),
    ("POST", "/v1/recommendations", {}, {"user_id": "u1", "colour": "red"}, 422, "colour"),
    ("POST", "/v1/recommendations", {}, {"recent_items": []}, 422, "recent_items"),
    ("POST", "/v1/recommendations", {}, {"user_id": "u1", "query": "x" * 600}, 422, "query"),
    ("POST", "/v1/recommendations", {}, {"user_id": ""}, 422, "user_id"),
    ("POST", "/v1/recommendations", {}, {"user_id": "u1", "query": "comedy", "query_weight": 1.5}, 422,
     "query_weight=1.5"),
    ("POST", "/v1/recommendations", {}, {"k": 3}, 422, "user_id"),
    ("GET", "/v1/items/nosuch/similar", {}, None, 404, "nosuch"),
])
def test_bad_requests_are_4xx_naming_the_field(served, method, path, params, body, status, field):
    resp = requests.request(method, served["base"] + path, params=params, json=body, headers=served["headers"],
                            timeout=10)
    assert resp.status_code == status, resp.text
    assert field in json.dumps(resp.json())
    assert set(resp.json()) == {"error", "detail"} and ErrorBody.model_validate(resp.json()).error


def test_api_keys(served):
    assert requests.get(served["base"] + "/v1/recommendations", params={"user_id": "u1"}, timeout=10).status_code == 401
    assert requests.get(served["base"] + "/v1/recommendations", params={"user_id": "u1"},
                        headers={"X-API-Key": "nope"}, timeout=10).status_code == 403
    assert requests.get(served["base"] + "/healthz", timeout=10).status_code == 200
    assert requests.get(served["base"] + "/readyz", timeout=10).status_code == 200  # probes need no key


def test_new_and_deleted_items_within_5_s(served):
    from streaming.events import Item

    store, ts = served["store"], 1_700_000_001_000
    # through the online store, as the ingest consumer writes them (its change log is what replicas follow)
    store.apply_items("items", 0, [(1000, Item(item_id="fresh1", title="Fresh", text="A brand new comedy.", ts=ts))])
    t0 = time.time()
    while _get(served, "/v1/items/fresh1/similar", k=3).status_code != 200:
        assert time.time() - t0 < 5, "a new item was not searchable within 5 s"
        time.sleep(0.1)
    store.apply_items("items", 0, [(1001, Item(item_id="m3", title="Movie 3", ts=ts, deleted=True))])
    t0 = time.time()
    while _get(served, "/v1/items/m3/similar", k=3).status_code != 404:
        assert time.time() - t0 < 5, "a deleted item was still in the index after 5 s"
        time.sleep(0.1)
    body = _get(served, "/v1/recommendations", user_id="u1", k=N_ITEMS).json()
    assert "m3" not in {i["item_id"] for i in body["items"]}
    assert "fresh1" in {i["item_id"] for i in body["items"]}  # new items are recommendable, not only searchable


def test_scenes_are_multiplexed_and_unknown_scenes_are_404(served):
    """A second scene gets its own adapter on the same replica; each response names its scene's version.
    While it loads, its requests get 503 with Retry-After (warm-up), never 404, and the replica stays ready."""
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter

    v = publish_synthetic_adapter(served["registry"], served["tmp"], scene="homepage", n_items=N_ITEMS, seed=7)
    t0 = time.time()
    warm_up: list[requests.Response] = []
    while _get(served, "/v1/models").json()["scenes"].get("homepage", {}).get("version") != v:
        assert time.time() - t0 < 60, "the second scene was never served"
        # from the poll that reads the new pointer on (before it, the replica rightly knows no such scene)
        if "homepage" in requests.get(served["base"] + "/readyz", timeout=10).json()["scenes"]:
            resp = _get(served, "/v1/recommendations", user_id="u1", k=5, scene="homepage")
            if resp.status_code != 200:
                warm_up.append(resp)
        time.sleep(0.2)
    for resp in warm_up:  # how many there are depends on timing; what each is does not
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0, resp.text
        assert "homepage" in ErrorBody.model_validate(resp.json()).error
    ready = requests.get(served["base"] + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["scenes"]["homepage"] == {"state": "loaded", "version": v,
                                                                              "reason": None}
    home = _get(served, "/v1/recommendations", user_id="u1", k=5, scene="homepage").json()
    default = _get(served, "/v1/recommendations", user_id="u1", k=5).json()
    assert home["scene"] == "homepage" and home["version"] == v and home["fallback"] is None
    assert default["scene"] == "default" and default["fallback"] is None
    assert [i["item_id"] for i in home["items"]] != [i["item_id"] for i in default["items"]]  # other weights
    models = _get(served, "/v1/models").json()
    ModelsResponse.model_validate(models)
    assert models["replicas"] and all(set(r["scenes"]) >= {"default", "homepage"} for r in models["replicas"].values())
    missing = _get(served, "/v1/recommendations", user_id="u1", scene="kids")
    assert missing.status_code == 404 and "kids" in missing.json()["error"]


def test_hot_reload_under_load_and_a_corrupt_version_is_refused(served):
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def load():
        while not stop.is_set():
            try:
                resp = _get(served, "/v1/recommendations", user_id="u1", k=5)
                results.append((resp.status_code, resp.json().get("version") if resp.ok else None))
            except requests.RequestException:
                results.append((0, None))
            time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(2)]
    started = time.time()
    for t in threads:
        t.start()
    try:
        time.sleep(5.0)
        v2 = publish_adapter(served["registry"], served["tmp"], seed=2)
        t0 = time.time()
        while not any(v == v2 for _, v in results[-5:]):
            assert time.time() - t0 < 60, "responses never moved to the new version"
            time.sleep(0.1)
        bad = publish_adapter(served["registry"], served["tmp"], seed=3, corrupt=True)
        t0 = time.time()
        while bad not in _get(served, "/v1/models").json().get("refused", {}).get("default", []):
            assert time.time() - t0 < 30, "the corrupt version was not refused"
            time.sleep(0.1)
        while time.time() - started < LOAD_S:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    elapsed = time.time() - started
    assert len(results) / elapsed >= MIN_RPS, f"the load generator reached only {len(results) / elapsed:.1f} req/s"
    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:5]
    assert results[-1][1] == v2
    assert _metric(served, "streamrec_adapter_reload_failures_total", scene="default") == 1.0


def _metric(served, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`, as the API's /metrics exports them
    (every series also carries `replica`)."""
    text = requests.get(served["base"] + "/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert samples and all("replica" in s.labels for s in samples)
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def _impressions(served, request_ids: set[str], timeout_s: float = 60.0) -> dict[str, dict]:
    """The impressions of `request_ids`, read from the start of the module's impressions topic."""
    from streaming.kafka_io import make_consumer

    settings = served["settings"]
    from kafka import TopicPartition

    consumer = make_consumer(settings, group_id=None)
    consumer.assign([TopicPartition(settings.impressions_topic, p) for p in range(settings.topic_partitions)])
    consumer.seek_to_beginning()
    found: dict[str, dict] = {}
    deadline = time.time() + timeout_s
    try:
        while not request_ids <= found.keys():
            assert time.time() < deadline, (f"impressions missing for {sorted(request_ids - found.keys())[:3]}; dropped "
                                            f"{_metric(served, 'streamrec_impressions_dropped_total')}, written "
                                            f"{_metric(served, 'streamrec_impressions_written_total')}")
            for msg in consumer.poll(timeout_ms=500).values():
                for rec in msg:
                    value = json.loads(rec.value)
                    if value["request_id"] in request_ids:
                        found[value["request_id"]] = {**value, "key": rec.key}
    finally:
        consumer.close()
    return found


def test_every_answer_is_an_impression_keyed_by_pseudonym(served):
    from streaming.events import parse_impression
    from tests.streaming.helpers import pseudonym

    answers = [_get(served, "/v1/recommendations", user_id="u1", k=4).json(),
               _get(served, "/v1/recommendations", user_id="nobody-knows-me", k=3).json(),  # trending fallback
               requests.post(served["base"] + "/v1/recommendations", headers=served["headers"], timeout=10,
                             json={"recent_items": ["m1"], "k": 2}).json()]
    ids = [a["request_id"] for a in answers]
    assert len(set(ids)) == 3 and all(len(i) == 24 for i in ids)
    shown = _impressions(served, set(ids))
    for answer in answers:
        imp = shown[answer["request_id"]]
        record = parse_impression(json.dumps({k: v for k, v in imp.items() if k != "key"}).encode(), 65536)
        assert not hasattr(record, "reason"), record  # the contract's own decoder takes it
        assert imp["item_ids"] == [i["item_id"] for i in answer["items"]]
        assert imp["scores"] == pytest.approx([i["score"] for i in answer["items"]])
        assert (imp["version"], imp["fallback"], imp["variant"]) == (answer["version"], answer["fallback"], "control")
    known, unknown, anonymous = (shown[i] for i in ids)
    assert known["user_id"] == pseudonym(served["settings"], "u1") and known["key"] == known["user_id"].encode()
    assert unknown["fallback"] == "trending" and unknown["user_id"] == pseudonym(served["settings"], "nobody-knows-me")
    assert anonymous["user_id"] is None and anonymous["key"] is None
    assert _metric(served, "streamrec_impressions_written_total") >= 3


def test_an_experiment_splits_users_sticky_and_stops(served):
    """A candidate published not-live takes its share of the users within seconds of `start`, each user
    always on the same variant, each answer and impression naming it; `stop` sends all back to control."""
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter
    from tests.streaming.helpers import pseudonym
    from training import experiments

    registry = served["registry"]
    candidate = publish_synthetic_adapter(registry, served["tmp"], seed=11, n_items=N_ITEMS, ranker=True,
                                          make_live=False)
    # what control serves here: the replica's active version (an earlier test left a refused, corrupt CURRENT)
    live = _get(served, "/v1/models").json()["scenes"]["default"]["version"]
    exp = experiments.start(registry, "default", {candidate: 50.0})
    t0 = time.time()
    while candidate not in _get(served, "/v1/models").json()["experiments"].get("default", {}).get("ready", []):
        assert time.time() - t0 < 60, "the candidate never became ready on the replica"
        time.sleep(0.2)
    users = [f"exp-user-{i}" for i in range(40)]
    for u in users:  # a history each, so the model answers
        served["redis"].zadd(served["store"].recent_key(pseudonym(served["settings"], u)), {"m0": 1000, "m3": 2000})
    expected = {u: exp.variant_of(pseudonym(served["settings"], u)) for u in users}
    assert 5 < sum(v == candidate for v in expected.values()) < 35
    answers = {u: [_get(served, "/v1/recommendations", user_id=u, k=3).json() for _ in range(2)] for u in users}
    for u, (first, second) in answers.items():
        want = expected[u]
        assert first["variant"] == second["variant"] == want
        assert first["version"] == (candidate if want == candidate else live)
    shown = _impressions(served, {a["request_id"] for pair in answers.values() for a in pair})
    assert {(i["variant"], i["experiment"]) for i in shown.values()} <= {(candidate, exp.id), ("control", exp.id)}
    models = _get(served, "/v1/models").json()
    assert all(r["experiments"]["default"]["id"] == exp.id for r in models["replicas"].values())
    experiments.end(registry, "default", "stop", "test over")
    t0 = time.time()
    while _get(served, "/v1/models").json()["experiments"]:
        assert time.time() - t0 < 30, "the replica kept the stopped experiment"
        time.sleep(0.2)
    assert {_get(served, "/v1/recommendations", user_id=u, k=3).json()["variant"] for u in users} == {"control"}


def test_error_answers_are_counted_beside_successes(served):
    route, similar = "GET /v1/recommendations", "GET /v1/items/{item_id}/similar"
    before = (_metric(served, "streamrec_requests_total", route=route, status="422"),
              _metric(served, "streamrec_requests_total", route=similar, status="404"))
    assert _get(served, "/v1/recommendations", user_id="u1", k=0).status_code == 422
    assert _get(served, "/v1/items/no-such-item/similar", k=3).status_code == 404
    assert _metric(served, "streamrec_requests_total", route=route, status="422") == before[0] + 1
    assert _metric(served, "streamrec_requests_total", route=similar, status="404") == before[1] + 1


def test_redis_down_means_popular_fallback_never_5xx(served):
    proc = served["redis_proc"]
    proc.stop()
    try:
        codes, fallbacks = [], []
        for _ in range(20):
            resp = _get(served, "/v1/recommendations", user_id="u1", k=5)
            codes.append(resp.status_code)
            fallbacks.append(resp.json().get("fallback"))
        assert codes == [200] * 20 and set(fallbacks) == {"popular"}
        assert [i["item_id"] for i in _get(served, "/v1/recommendations", user_id="u1", k=3).json()["items"]] == \
            ["m0", "m1", "m2"]  # the last popularity snapshot, in its order
    finally:
        proc.start()  # same port, same append-only file: the data is back
    t0 = time.time()
    while True:
        body = _get(served, "/v1/recommendations", user_id="u1", k=5).json()
        if body.get("fallback") is None:
            break
        assert time.time() - t0 < 10, "no model answers after Redis came back"
        time.sleep(0.1)
    assert body["version"] is not None and len(body["items"]) == 5
