"""`streamrec status`: the verdicts over fake snapshots, the sources against files and local HTTP
servers, the command's exit status and output; and one integration test with a real broker, Redis
and `streamrec ingest` (its metrics exporter), stopped halfway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from typer.testing import CliRunner

from services import status as st
from services import status_sources as sources
from services.status_model import (
    FAIL, OK, WARN, ApiObs, Check, Endpoint, FeaturesObs, RegistryObs, Samples, SceneObs, Scrape, Snapshot, fmt_age,
    worst,
)
from services.status_view import lag_rows, lag_table, print_report, report_json

NOW = 1_800_000_000.0
INGEST_URL = "http://ingest:9310/metrics"


def ingest_metrics(lag=(5, 0, 12, 3), since_commit=1.5, last_commit=NOW - 1.5, assigned=4) -> Samples:
    rows = [("streamrec_ingest_consumer_lag", {"topic": "events", "partition": str(p)}, v) for p, v in enumerate(lag)]
    rows += [("streamrec_ingest_records_total", {"topic": "events", "partition": "0"}, 1000.0),
             ("streamrec_ingest_dlq_records_total", {"reason": "bad_json"}, 2.0),
             ("streamrec_ingest_assigned_partitions", {"topic": "events"}, float(assigned)),
             ("streamrec_ingest_last_commit_timestamp_seconds", {}, last_commit),
             ("streamrec_ingest_seconds_since_last_commit", {}, since_commit)]
    return Samples.of(rows)


def features_prom(last_success_age=30.0, run_ok=1.0, version=7) -> Samples:
    return Samples.of([("streamrec_features_last_success_timestamp_seconds", {}, NOW - last_success_age),
                       ("streamrec_features_last_run_timestamp_seconds", {}, NOW - 30.0),
                       ("streamrec_features_last_run_ok", {}, run_ok),
                       ("streamrec_features_version", {}, float(version))])


def api_metrics(fallback=1, model=99) -> Samples:
    return Samples.of([("streamrec_recommendations_total", {"scene": "default", "source": "fallback"}, fallback),
                       ("streamrec_recommendations_total", {"scene": "default", "source": "model"}, model)])


def models(serving=None, refused=None, pins=None) -> dict:
    serving = serving or {"r1": "v000002", "r2": "v000002"}
    return {"scenes": {"default": {"version": "v000002", "pinned": False}}, "refused": refused or {}, "replica": "r1",
            "replicas": {rid: {"scenes": {"default": v} if v else {}, "pins": (pins or {}).get(rid, {}), "age_s": 0.5}
                         for rid, v in serving.items()}}


def healthy() -> Snapshot:
    return Snapshot(
        now=NOW, stack="embedded", data_dir="/data",
        broker=Endpoint("127.0.0.1:9092", "embedded", True, "pid 1"),
        redis=Endpoint("redis://127.0.0.1:6379/0", "embedded", True, "pid 2"),
        ingest=(Scrape(INGEST_URL, ingest_metrics()),),
        features=FeaturesObs(manifest_version=7, manifest_created_at=NOW - 600, prom=features_prom(), prom_path="f.prom"),
        registry=RegistryObs("/data/registry", (SceneObs("default", "v000002", NOW - 3600, 0.31),)),
        api=ApiObs("http://127.0.0.1:8000", reachable=True, ready=True,
                   scene_states={"default": {"state": "loaded", "version": "v000002"}}, models=models(),
                   metrics=api_metrics()),
    )


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def verdict(snap: Snapshot, **thresholds) -> dict[str, Check]:
    return by_name(st.evaluate(snap, st.Thresholds(**thresholds)))


# --- verdicts --------------------------------------------------------------------------------------
def test_a_healthy_snapshot_is_all_ok_and_exits_0():
    checks = st.evaluate(healthy(), st.Thresholds())
    assert {c.name: c.status for c in checks} == {
        "broker": OK, "redis": OK, "ingest": OK, "ingest.lag": OK, "ingest.commit": OK, "features": OK,
        "registry": OK, "scene:default": OK, "api": OK, "api.fallback": OK}
    assert all(c.reason == "" for c in checks)
    report = st.Report(healthy(), checks, st.Thresholds())
    assert (report.status, report.exit_code) == (OK, 0)
    c = by_name(checks)
    assert c["ingest.lag"].summary == ("20 records behind over 4 partition(s), at most 12 (events[2]) "
                                       "(the embedded broker under-reports lag)")
    assert "live v000002" in c["scene:default"].summary and "r1=v000002" in c["scene:default"].summary


@pytest.mark.parametrize("required, expected", [(st.DEFAULT_REQUIRE, FAIL), (("broker", "redis"), WARN)])
def test_a_missing_part_fails_only_when_required(required, expected):
    snap = replace(healthy(), ingest=(Scrape(INGEST_URL, error="connection refused"),),
                   api=ApiObs("http://127.0.0.1:8000", error="connection refused"))
    c = verdict(snap, require=frozenset(required))
    assert c["ingest"].status == expected and "not running" in c["ingest"].summary
    assert "streamrec ingest" in c["ingest"].reason and INGEST_URL in c["ingest"].reason
    assert c["api"].status == expected and "streamrec serve" in c["api"].reason
    assert "ingest.lag" not in c and "api.fallback" not in c  # nothing to judge when the part is not there


def test_an_unreachable_stack_fails_and_says_how_to_start_it():
    down = Endpoint(None, "embedded", False, "no embedded stack answers for data dir /data")
    c = verdict(replace(healthy(), broker=down, redis=Endpoint("redis://h:1/0", "configured", False, "refused")))
    assert c["broker"].status == FAIL and "streamrec stack start" in c["broker"].reason
    assert c["redis"].status == FAIL and "REDIS_URL" in c["redis"].reason and "redis://h:1/0" in c["redis"].summary


def test_lag_above_the_limit_fails_naming_the_partition():
    snap = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(lag=(5, 20_001, 0, 0))),))
    c = verdict(snap)
    assert c["ingest.lag"].status == FAIL and "events[1] is 20001 records behind" in c["ingest.lag"].reason
    assert verdict(snap, max_lag=30_000)["ingest.lag"].status == OK


def test_no_commit_fails_only_while_records_wait():
    stuck = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(since_commit=900, last_commit=NOW - 900)),))
    c = verdict(stuck)
    assert c["ingest.commit"].status == FAIL and "no commit for 15 min while 20 records wait" in c["ingest.commit"].reason
    idle = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(lag=(0, 0, 0, 0), since_commit=900)),))
    c = verdict(idle)
    assert c["ingest.commit"].status == OK and "idle" in c["ingest.commit"].summary
    never = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(since_commit=4, last_commit=0)),))
    assert verdict(never)["ingest.commit"].summary == "no commit yet (4 s since start)"


def test_commit_age_falls_back_to_the_timestamp():
    m = Samples.of([("streamrec_ingest_last_commit_timestamp_seconds", {}, NOW - 42)])
    assert st.commit_age(Scrape(INGEST_URL, m), NOW) == 42


def test_a_consumer_without_partitions_and_one_of_two_down_warn():
    snap = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(assigned=0, lag=())),
                                      Scrape("http://other:9310/metrics", error="connection refused")))
    c = verdict(snap)
    assert c["ingest"].status == WARN
    assert "holds no partition" in c["ingest"].reason and "http://other:9310/metrics does not answer" in c["ingest"].reason
    assert c["ingest.lag"].status == WARN


def test_features_stale_failed_missing_and_manifest_only():
    c = verdict(replace(healthy(), features=replace(healthy().features, prom=features_prom(last_success_age=4000))))
    assert c["features"].status == FAIL and "--max-features-age-s" in c["features"].reason
    c = verdict(replace(healthy(), features=replace(healthy().features, prom=features_prom(run_ok=0))))
    assert c["features"].status == WARN and "FAILED" in c["features"].summary
    c = verdict(replace(healthy(), features=FeaturesObs(prom_path="f.prom")))
    assert c["features"].status == WARN and "no feature version yet" == c["features"].summary
    assert verdict(replace(healthy(), features=FeaturesObs(prom_path="f.prom")),
                   require=frozenset({"features"}))["features"].status == FAIL
    old = FeaturesObs(manifest_version=3, manifest_created_at=NOW - 7200, prom_path="f.prom")
    c = verdict(replace(healthy(), features=old))
    assert c["features"].status == WARN and "version 3 (made 2.0 h ago)" == c["features"].summary
    c = verdict(replace(healthy(), features=FeaturesObs(error="ValueError: bad json")))
    assert c["features"].status == FAIL


def test_scene_warnings_replica_behind_pinned_refused_gate():
    api = replace(healthy().api, models=models(serving={"r1": "v000002", "r2": "v000001"}))
    c = verdict(replace(healthy(), api=api))["scene:default"]
    assert c.status == WARN and "r2 do not serve the live v000002" in c.reason
    api = replace(healthy().api, models=models(serving={"r1": "v000002", "r2": "v000001"},
                                               pins={"r2": {"default": "v000001"}}))
    c = verdict(replace(healthy(), api=api))["scene:default"]
    assert c.status == OK and "r2=v000001 (pinned)" in c.summary
    api = replace(healthy().api, models=models(refused={"default": ["v000003"]}))
    c = verdict(replace(healthy(), api=api))["scene:default"]
    assert c.status == WARN and "refused v000003" in c.reason and "streamrec registry rollback default" in c.reason
    train = Samples.of([("streamrec_train_gate_refusals_in_a_row", {"scene": "default"}, 4.0),
                        ("streamrec_train_last_outcome", {"scene": "default", "outcome": "failed"}, 0.0)])
    reg = RegistryObs("/r", (replace(healthy().registry.scenes[0], train=train),))
    c = verdict(replace(healthy(), registry=reg))["scene:default"]
    assert c.status == WARN and "gate refused the last 4 runs" in c.reason
    assert verdict(replace(healthy(), registry=reg), max_gate_refusals=5)["scene:default"].status == OK


def test_a_scene_on_fallback_fails():
    api = replace(healthy().api, scene_states={"default": {"state": "fallback", "reason": "v000002 was refused"}})
    c = verdict(replace(healthy(), api=api))["scene:default"]
    assert c.status == FAIL and "v000002 was refused" in c.reason


def test_registry_missing_and_unreadable():
    c = verdict(replace(healthy(), registry=RegistryObs("/r")))
    assert c["registry"].status == WARN and "streamrec train" in c["registry"].reason
    assert not any(n.startswith("scene:") for n in c)
    assert verdict(replace(healthy(), registry=RegistryObs("/r", error="RegistryError: x")))["registry"].status == FAIL


@pytest.mark.parametrize("metrics, status", [
    (api_metrics(fallback=30, model=70), FAIL),
    (api_metrics(fallback=5, model=95), OK),
    (api_metrics(fallback=5, model=0), OK),  # 5 answers: too few to judge
    # without streamrec_recommendations_total: fallbacks / successful recommendation requests
    (Samples.of([("streamrec_fallbacks_total", {"kind": "popular"}, 40.0),
                 ("streamrec_requests_total", {"route": "GET /v1/recommendations", "status": "200"}, 100.0),
                 ("streamrec_requests_total", {"route": "GET /v1/models", "status": "200"}, 900.0)]), FAIL),
])
def test_the_fallback_share(metrics, status):
    c = verdict(replace(healthy(), api=replace(healthy().api, metrics=metrics)))
    assert c["api.fallback"].status == status


def test_an_api_not_ready_or_without_models_warns():
    api = replace(healthy().api, ready=False, scene_states={"default": {"state": "loading"}}, models=None,
                  error="GET /v1/models: HTTP 401 (set STREAMREC_API_KEYS to one of the API's keys)")
    c = verdict(replace(healthy(), api=api))
    assert c["api"].status == WARN and "loading default" in c["api"].reason and "401" in c["api"].reason


def test_parse_require():
    assert st.parse_require("Ingest, api") == {"ingest", "api"}
    assert st.parse_require("none") == frozenset()
    with pytest.raises(ValueError, match="unknown part.*kafka.*choose from broker"):
        st.parse_require("kafka,api")


def test_small_helpers():
    assert worst([OK, WARN, OK]) == WARN and worst([]) == OK and worst([WARN, FAIL]) == FAIL
    assert [fmt_age(s) for s in (None, 5, 600, 9000, 3 * 86400)] == ["?", "5 s", "10 min", "2.5 h", "3.0 d"]
    with pytest.raises(ValueError, match="status must be one of"):
        Check("x", "bad", "")


# --- rendering -------------------------------------------------------------------------------------
def test_the_json_holds_every_check_and_what_was_seen():
    snap = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(lag=(5, 20_001, 0, 0))),))
    report = st.Report(snap, st.evaluate(snap, st.Thresholds()), st.Thresholds())
    body = json.loads(report_json(report))
    assert body["status"] == FAIL and body["exit_code"] == 1 and body["healthy"] is False
    assert {"name": "ingest.lag", "status": FAIL} .items() <= next(c for c in body["checks"] if c["name"] == "ingest.lag").items()
    assert body["ingest"]["lag"][0] == {"topic": "events", "partition": 1, "lag": 20001}
    assert body["ingest"]["consumers"][0]["seconds_since_last_commit"] == 1.5
    assert body["features"]["version"] == 7 and body["registry"]["scenes"][0]["live_version"] == "v000002"
    assert body["api"]["fallback"] == {"fallback": 1.0, "total": 100.0, "share": 0.01}
    assert body["thresholds"]["require"] == sorted(st.DEFAULT_REQUIRE)


def test_the_screen_names_each_part_and_the_failures():
    from rich.console import Console

    snap = replace(healthy(), api=ApiObs("http://127.0.0.1:8000", error="connection refused"))
    report = st.Report(snap, st.evaluate(snap, st.Thresholds()), st.Thresholds())
    console = Console(record=True, width=120, color_system=None)
    print_report(report, console)
    text = console.export_text()
    for name in ("broker", "redis", "ingest.lag", "features", "scene:default", "api"):
        assert name in text
    assert "streamrec status: FAIL" in text and "exit status 1: unhealthy (api)" in text
    assert "consumer lag: 3 of 4 partitions behind" in text


def test_lag_rows_order_most_lagging_first_and_the_table_shows_only_lagging_ones():
    snap = replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(lag=(1, 9, 0, 9))),))
    assert [r["partition"] for r in lag_rows(snap)] == [1, 3, 0, 2]
    assert lag_table(snap)[1].row_count == 3
    assert lag_table(replace(healthy(), ingest=(Scrape(INGEST_URL, ingest_metrics(lag=(0, 0))),))) is None


# --- the command -----------------------------------------------------------------------------------
@pytest.fixture()
def fake_gather(monkeypatch):
    seen = {}

    def install(snap: Snapshot):
        def gather(settings, opts):
            seen["opts"] = opts
            return snap

        monkeypatch.setattr(sources, "gather", gather)
        return seen

    return install


def _invoke(*args):
    from services.cli import app

    return CliRunner().invoke(app, ["status", *args])


def test_the_command_exits_0_when_healthy_and_1_naming_the_failure(fake_gather):
    seen = fake_gather(healthy())
    result = _invoke("--json", "--ingest-metrics", "http://a:1", "--ingest-metrics", "http://b:2", "--api", "http://x:8")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == OK
    assert seen["opts"].ingest_urls == ("http://a:1", "http://b:2") and seen["opts"].api_url == "http://x:8"
    fake_gather(replace(healthy(), ingest=(Scrape(INGEST_URL, error="connection refused"),)))
    result = _invoke()
    assert result.exit_code == 1 and "unhealthy (ingest)" in result.stdout
    result = _invoke("--require", "broker,redis")  # ingest not required: a warning
    assert result.exit_code == 0, result.stdout


@pytest.mark.parametrize("args", [["--require", "kafka"], ["--max-lag", "-1"], ["--max-fallback-share", "2"],
                                  ["--bogus"]])
def test_bad_usage_exits_2(fake_gather, args):
    fake_gather(healthy())
    result = _invoke(*args)
    assert result.exit_code == 2, result.output


def test_the_help_documents_the_exit_status():
    result = CliRunner().invoke(__import__("services.cli", fromlist=["app"]).app, ["status", "--help"],
                                env={"COLUMNS": "200"})
    assert "Exit status: 0 healthy" in result.stdout and "1 a check fails" in result.stdout
    assert "2 bad usage" in result.stdout


# --- sources (files and local HTTP servers; no streamrec process) ------------------------------------
class _Stub(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str]] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        code, body = self.routes.get(self.path, (404, "no such route"))
        if self.path == "/v1/models" and "X-API-Key" not in self.headers:
            code, body = 401, '{"error": "missing API key"}'
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub_server():
    servers = []

    def start(routes: dict[str, tuple[int, str]]) -> str:
        handler = type("Handler", (_Stub,), {"routes": routes})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _prom_text() -> str:
    from prometheus_client import generate_latest

    r = CollectorRegistry()
    Gauge("streamrec_ingest_consumer_lag", "lag", ["topic", "partition"], registry=r).labels("events", "0").set(3)
    Counter("streamrec_recommendations_total", "answers", ["scene", "source"], registry=r).labels("default", "model").inc(4)
    return generate_latest(r).decode()


def test_scrape_parses_and_reports_what_is_wrong(stub_server):
    base = stub_server({"/metrics": (200, _prom_text()), "/bad": (200, "this is { not prometheus"),
                        "/err": (500, "boom")})
    got = sources.scrape(base, 2.0)  # a bare base URL means its /metrics
    assert got.url == base + "/metrics" and got.metrics.value("streamrec_ingest_consumer_lag", partition="0") == 3
    assert got.metrics.value("streamrec_recommendations_total", source="model") == 4
    assert "not Prometheus text" in sources.scrape(base + "/bad", 2.0).error
    assert sources.scrape(base + "/err", 2.0).error == "HTTP 500: boom"
    from services.processes import free_port

    closed = sources.scrape(f"http://127.0.0.1:{free_port()}/metrics", 2.0)
    assert closed.metrics is None and "connection refused" in closed.error


def test_gather_api_reads_readiness_models_and_metrics(stub_server, tmp_path):
    from streaming.settings import load_settings

    from services.api_schema import ModelsResponse, ReadinessResponse

    readyz = {"ready": False, "scenes": {"default": {"state": "loading", "version": "v000002"}}, "replica": "r1"}
    # The stub answers what the real API answers: its bodies are valid under the HTTP contract.
    ReadinessResponse.model_validate(readyz)
    ModelsResponse.model_validate(models())
    routes = {"/readyz": (503, json.dumps(readyz)), "/v1/models": (200, json.dumps(models())),
              "/metrics": (200, _prom_text())}
    base = stub_server(routes)
    keyed = load_settings(data_dir=tmp_path, api_keys="k1,k2")
    api = sources.gather_api(keyed, base, 2.0)
    assert api.reachable and api.ready is False and api.scene_states["default"]["state"] == "loading"
    assert set(api.models["replicas"]) == {"r1", "r2"} and api.error is None
    assert api.metrics.value("streamrec_recommendations_total") == 4
    open_api = sources.gather_api(load_settings(data_dir=tmp_path), base, 2.0)  # no key: /v1/models says 401
    assert open_api.models is None and "HTTP 401" in open_api.error and "STREAMREC_API_KEYS" in open_api.error


def test_gather_features_and_registry_from_files(tmp_path):
    from prometheus_client import generate_latest

    from streaming.job_metrics import metrics_file
    from streaming.settings import load_settings
    from streaming.versioned_store import atomic_write_json
    from training.registry import Registry

    settings = load_settings(data_dir=tmp_path)
    assert sources.gather_features(settings).manifest_version is None
    assert sources.gather_registry(settings).scenes == ()
    atomic_write_json(settings.features_dir / "manifest.json",
                      {"version": 4, "created_at": "2027-01-15T08:00:00.000+00:00", "tables": {}})
    r = CollectorRegistry()
    Gauge("streamrec_features_last_run_ok", "ok", registry=r).set(1)
    metrics_file(settings, "features").parent.mkdir(parents=True, exist_ok=True)
    metrics_file(settings, "features").write_bytes(generate_latest(r))
    f = sources.gather_features(settings)
    assert f.manifest_version == 4 and f.manifest_created_at == 1_800_000_000.0 and f.error is None
    assert f.prom.value("streamrec_features_last_run_ok") == 1

    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "adapter.pt").write_bytes(b"x")
    Registry(settings.registry_uri).publish("home", staged, {"metrics": {"val_ndcg10": 0.25}})
    r = CollectorRegistry()
    Gauge("streamrec_train_gate_refusals_in_a_row", "n", ["scene"], registry=r).labels("home").set(2)
    metrics_file(settings, "train-home").write_bytes(generate_latest(r))
    reg = sources.gather_registry(settings)
    assert reg.error is None and len(reg.scenes) == 1
    scene = reg.scenes[0]
    assert (scene.scene, scene.live_version, scene.val_ndcg10) == ("home", "v000001", 0.25)
    assert scene.created_at and scene.train.value("streamrec_train_gate_refusals_in_a_row", scene="home") == 2

    metrics_file(settings, "features").write_text("garbage {{{")
    assert "not Prometheus text" in sources.gather_features(settings).error


def test_gather_reports_a_stopped_embedded_stack_without_starting_it(tmp_path):
    from streaming.settings import load_settings

    from services.processes import free_port

    settings = load_settings(data_dir=tmp_path, ingest_metrics_port=free_port(), serve_port=free_port())
    snap = sources.gather(settings, sources.SourceOptions(timeout_s=1.0))
    assert snap.stack == "embedded" and not snap.broker.reachable and not snap.redis.reachable
    assert "no embedded stack answers" in snap.broker.detail
    assert not (tmp_path / "stack" / "stack.json").exists()  # nothing was started
    checks = by_name(st.evaluate(snap, st.Thresholds()))
    assert {n for n, c in checks.items() if c.status == FAIL} == {"broker", "redis", "ingest", "api"}


# --- integration: a real broker, Redis and `streamrec ingest` -----------------------------------------
def _status_json(settings, url: str) -> tuple[int, dict]:
    from streaming.settings import settings_env

    env = {**os.environ, **settings_env(settings)}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json", "--ingest-metrics", url,
                           "--require", "broker,redis,ingest"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.integration
def test_status_follows_a_real_ingest_and_fails_when_it_stops(embedded_stack, tmp_path):
    from services.processes import free_port
    from streaming.producer import EventProducer
    from streaming.settings import settings_env
    from tests.streaming.helpers import isolated_settings, wait_for

    port = free_port()
    settings = isolated_settings(embedded_stack, tmp_path, ingest_metrics_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "ingest.log"
    with open(log_path, "wb") as out:
        ingest = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest", "--no-progress",
                                   "--features-every", "0"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with EventProducer(settings) as producer:
            for i in range(40):
                producer.send_event({"event_id": f"e{i}", "user_id": f"u{i % 7}", "item_id": f"i{i % 5}",
                                     "type": "click", "ts": 1_700_000_000_000 + i})

        partitions = {(settings.events_topic, p) for p in range(settings.topic_partitions)}

        def committed_with_lag():
            """The exporter answers, has committed, and reports every events partition's lag."""
            code, body = _status_json(settings, url)
            consumer = body["ingest"]["consumers"][0]
            lagging = {(r["topic"], r["partition"]) for r in body["ingest"]["lag"]}
            ready = consumer["up"] and (consumer["last_commit_timestamp"] or 0) > 0 and partitions <= lagging
            return (code, body) if ready else None

        try:
            code, body = wait_for(committed_with_lag, 120, f"status to see ingest's commit and lag at {url}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; ingest's log:\n{log_path.read_text()[-3000:]}") from None
        checks = {c["name"]: c for c in body["checks"]}
        assert code == 0, checks
        assert body["stack"]["mode"] == "configured" and checks["broker"]["status"] == checks["redis"]["status"] == OK
        assert checks["ingest"]["status"] == OK and checks["ingest.commit"]["status"] == OK
        assert all(r["lag"] >= 0 for r in body["ingest"]["lag"])
        assert checks["ingest.lag"]["status"] == OK and "records behind over" in checks["ingest.lag"]["summary"]
    finally:
        ingest.send_signal(signal.SIGTERM)
        rc = ingest.wait(60)
    assert rc == 0, log_path.read_text()[-3000:]

    code, body = _status_json(settings, url)
    failed = [c["name"] for c in body["checks"] if c["status"] == FAIL]
    assert code == 1 and failed == ["ingest"], body["checks"]
