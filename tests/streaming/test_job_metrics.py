"""The batch runs' outcome metrics (streaming/job_metrics.py) and the feature job's (streaming/features/
run_metrics.py): the text file round trip, the push to a Pushgateway (a tiny local HTTP server
stands in for one), a failed push that never fails the run, and what a failed feature run keeps."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

import streaming.features.job as job
from streaming.features import FeaturesBusyError, run_features, store
from streaming.features import run_metrics as fm
from streaming.job_metrics import (
    FEATURES_JOB,
    MetricsFileError,
    list_job_metrics,
    metrics_file,
    read_job_metrics,
    read_previous,
    write_job_metrics,
)
from streaming.settings import Settings
from tests.fixtures.replica import closed_port


def _settings(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path, **kw)


def _registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Gauge("streamrec_demo_value", "a value", ["scene"], registry=r).labels("default").set(0.25)
    Gauge("streamrec_demo_timestamp_seconds", "a time", registry=r).set(1_700_000_000.5)
    return r


@pytest.fixture()
def gateway():
    """A Pushgateway stand-in: records each request's method, path and body; answers `status`."""
    seen: list[tuple[str, str, bytes]] = []
    state = SimpleNamespace(status=200, seen=seen)

    class Handler(BaseHTTPRequestHandler):
        def _record(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append((self.command, self.path, body))
            self.send_response(state.status)
            self.send_header("content-length", "0")
            self.end_headers()

        do_PUT = do_POST = _record

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_text_file_round_trip(tmp_path):
    s = _settings(tmp_path)
    path = write_job_metrics(s, "train-default", _registry(), job="streamrec_train")
    assert path == s.metrics_dir / "train-default.prom" == metrics_file(s, "train-default")
    got = read_job_metrics(path)
    assert got.value("streamrec_demo_value", scene="default") == 0.25
    assert got.value("streamrec_demo_value", scene="homepage") is None
    assert got.value("streamrec_demo_timestamp_seconds") == 1_700_000_000.5
    assert got.series("streamrec_demo_value") == [({"scene": "default"}, 0.25)]
    assert got.modified is not None
    assert sorted(p.name for p in s.metrics_dir.iterdir()) == ["train-default.prom"]  # no temporary left over
    assert list_job_metrics(s) == {"train-default": path}
    assert read_job_metrics(s.metrics_dir / "features.prom") is None  # that run never ended here


def test_a_malformed_file_is_an_error_naming_it_and_the_next_run_starts_afresh(tmp_path, caplog):
    bad = tmp_path / "features.prom"
    bad.write_text("streamrec_features_last_run_ok{ 1\n")
    with pytest.raises(MetricsFileError, match="features.prom"):
        read_job_metrics(bad)
    with caplog.at_level(logging.WARNING, logger="streaming.job_metrics"):
        assert read_previous(bad) is None
    assert "features.prom" in caplog.text


def test_the_push_replaces_the_group_job_and_scene(tmp_path, gateway):
    s = _settings(tmp_path, pushgateway_url=gateway.url)
    write_job_metrics(s, "train-homepage", _registry(), job="streamrec_train", grouping_key={"scene": "homepage"})
    [(method, path, body)] = gateway.seen
    assert method == "PUT" and path == "/metrics/job/streamrec_train/scene/homepage"
    assert b'streamrec_demo_value{scene="default"} 0.25' in body
    assert (s.metrics_dir / "train-homepage.prom").read_bytes() == body  # the same text in both places


def _push_failures() -> float:
    return REGISTRY.get_sample_value("streamrec_metrics_push_failures_total", {"job": FEATURES_JOB}) or 0.0


@pytest.mark.parametrize("why", ["unreachable", "refused by the gateway"])
def test_a_failed_push_is_logged_and_counted_and_never_fails_the_run(tmp_path, gateway, caplog, why):
    url = f"http://127.0.0.1:{closed_port()}" if why == "unreachable" else gateway.url
    gateway.status = 500
    s = _settings(tmp_path, pushgateway_url=url)
    before = _push_failures()
    with caplog.at_level(logging.WARNING, logger="streaming.job_metrics"):
        path = write_job_metrics(s, "features", _registry(), job=FEATURES_JOB)
    assert _push_failures() == before + 1
    assert read_job_metrics(path).value("streamrec_demo_value", scene="default") == 0.25  # the file is there
    [record] = [r for r in caplog.records if r.name == "streaming.job_metrics"]
    assert record.levelno == logging.WARNING and url in record.getMessage()


def test_a_failed_feature_run_keeps_the_last_success_and_its_version(tmp_path):
    s = _settings(tmp_path)
    result = SimpleNamespace(version=7, new_events=1200, new_files=3)
    fm.record_features_run(s, started=0.0, result=result)
    ok = read_job_metrics(metrics_file(s, fm.FEATURES_METRICS))
    assert ok.value(fm.LAST_RUN_OK) == 1 and ok.value(fm.VERSION) == 7
    assert ok.value(fm.LAST_ROWS) == 1200 and ok.value(fm.LAST_FILES) == 3
    assert ok.value(fm.LAST_SUCCESS) == ok.value(fm.LAST_RUN) > 0
    assert ok.value(fm.LAST_DURATION) == pytest.approx(ok.value(fm.LAST_RUN))  # started at 0

    fm.record_features_run(s, started=ok.value(fm.LAST_RUN), result=None, live_version=9)
    failed = read_job_metrics(metrics_file(s, fm.FEATURES_METRICS))
    assert failed.value(fm.LAST_RUN_OK) == 0 and failed.value(fm.LAST_RUN) >= ok.value(fm.LAST_RUN)
    assert failed.value(fm.LAST_SUCCESS) == ok.value(fm.LAST_SUCCESS)  # carried over
    assert failed.value(fm.VERSION) == 7  # what the last success produced
    assert failed.value(fm.LAST_ROWS) == 0 and failed.value(fm.LAST_FILES) == 0


def test_a_first_run_that_fails_says_never_succeeded_and_the_live_version(tmp_path):
    s = _settings(tmp_path)
    fm.record_features_run(s, started=0.0, result=None, live_version=4)
    got = read_job_metrics(metrics_file(s, fm.FEATURES_METRICS))
    assert got.value(fm.LAST_SUCCESS) == 0 and got.value(fm.LAST_RUN_OK) == 0 and got.value(fm.VERSION) == 4


def test_an_unwritable_metrics_dir_does_not_fail_the_run(tmp_path, caplog):
    (tmp_path / "metrics").write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="streaming.features.run_metrics"):
        fm.record_features_run(_settings(tmp_path), started=0.0, result=SimpleNamespace(
            version=1, new_events=0, new_files=0))
    assert "could not write the feature job's metrics" in caplog.text


# --- run_features writes them (the no-op and failure paths need no Ray; test_features.py runs a real job) ---
def test_run_features_records_a_noop_a_failure_and_not_a_busy_lock(tmp_path, monkeypatch):
    s = _settings(tmp_path)
    path = metrics_file(s, fm.FEATURES_METRICS)
    assert run_features(s).noop  # an empty log: nothing to do, and a successful run
    noop = read_job_metrics(path)
    assert noop.value(fm.LAST_RUN_OK) == 1 and noop.value(fm.VERSION) == 0 and noop.value(fm.LAST_ROWS) == 0

    def broken_log(*a, **k):
        raise OSError("log dir unreadable")

    monkeypatch.setattr(job, "OfflineLog", broken_log)
    with pytest.raises(OSError, match="unreadable"):
        run_features(s)
    failed = read_job_metrics(path)
    assert failed.value(fm.LAST_RUN_OK) == 0 and failed.value(fm.LAST_SUCCESS) == noop.value(fm.LAST_SUCCESS)

    def busy(*a, **k):
        raise FeaturesBusyError("another feature run holds the lock")

    monkeypatch.setattr(store, "run_lock", busy)
    with pytest.raises(FeaturesBusyError):
        run_features(s)
    assert read_job_metrics(path).samples == failed.samples  # not a run: nothing recorded
