"""streaming.ingest_metrics: the contract's names, per-batch updates, /metrics and /healthz, the port error."""

from __future__ import annotations

import socket
from collections import Counter

import pytest
import requests
from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from services.processes import free_port
from streaming.feature_schedule import PeriodicFeatures
from streaming.features.store import FeaturesBusyError
from streaming.ingest_metrics import (
    LIVENESS_STALL_S,
    IngestMetrics,
    MetricsPortError,
    MetricsServer,
    liveness_bound_s,
)

# The ingest table of the metric contract (README, monitoring), name -> (type, labels).
INGEST_CONTRACT = {
    "streamrec_ingest_records_total": ("counter", {"topic", "partition"}),
    "streamrec_ingest_dlq_records_total": ("counter", {"reason"}),
    "streamrec_ingest_apply_seconds": ("histogram", {"output"}),
    "streamrec_ingest_commit_seconds": ("histogram", set()),
    "streamrec_ingest_consumer_lag": ("gauge", {"topic", "partition"}),
    "streamrec_ingest_last_commit_timestamp_seconds": ("gauge", set()),
    "streamrec_ingest_seconds_since_last_commit": ("gauge", set()),
    "streamrec_ingest_assigned_partitions": ("gauge", {"topic"}),
    "streamrec_ingest_redis_rewinds_total": ("counter", {"topic", "partition"}),
    "streamrec_features_last_success_timestamp_seconds": ("gauge", set()),
    "streamrec_features_runs_total": ("counter", {"outcome"}),
}
EVENTS0, EVENTS1 = TopicPartition("events", 0), TopicPartition("events", 1)


def samples(metrics: IngestMetrics) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: IngestMetrics, name: str, **labels: str) -> float | None:
    found = [v for lab, v in samples(metrics).get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    return sum(found) if found else None


class FakeConsumer:
    """highwater/position as kafka-python answers them (None while unknown)."""

    def __init__(self, high: dict, position: dict) -> None:
        self.high, self.pos = high, position

    def highwater(self, tp):
        return self.high.get(tp)

    def position(self, tp, timeout_ms=None):
        return self.pos.get(tp)


def test_every_ingest_metric_of_the_contract_is_exported_with_its_type_and_labels():
    metrics = IngestMetrics(features_timer=True)
    metrics.consumed(EVENTS0, 3)
    metrics.sync_dlq(1, Counter(not_json=1))
    metrics.redis_apply.observe(0.01)
    metrics.committed(0.002)
    metrics.rewound(EVENTS0)
    metrics.refresh_partitions(FakeConsumer({EVENTS0: 10}, {}), {EVENTS0: 7})
    metrics.feature_run(True)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    for name, (kind, labels) in INGEST_CONTRACT.items():
        base = name[: -len("_total")] if kind == "counter" else name
        assert base in families, f"{name} is not exported"
        family = families[base]
        assert family.type == kind, (name, family.type)
        shown = {k for s in family.samples for k in s.labels if k != "le"}
        assert shown == labels, (name, shown)


def test_counters_follow_batches_and_the_dlq_catches_up_from_running_totals():
    metrics = IngestMetrics()
    metrics.consumed(EVENTS0, 500)
    metrics.consumed(EVENTS0, 20)
    metrics.consumed(EVENTS1, 7)
    by_reason = Counter(not_json=2)
    metrics.sync_dlq(2, by_reason)
    by_reason.update(not_json=1, missing_field=4)
    metrics.sync_dlq(7, by_reason)
    metrics.sync_dlq(7, by_reason)  # nothing new: no double count
    assert value(metrics, "streamrec_ingest_records_total", partition="0") == 520
    assert value(metrics, "streamrec_ingest_records_total", partition="1") == 7
    assert value(metrics, "streamrec_ingest_dlq_records_total", reason="not_json") == 3
    assert value(metrics, "streamrec_ingest_dlq_records_total", reason="missing_field") == 4
    # no feature timer in this process: no feature metrics that would look stale
    assert "streamrec_features_last_success_timestamp_seconds" not in samples(metrics)


def test_commit_times_and_seconds_since_the_last_commit():
    metrics = IngestMetrics()
    assert value(metrics, "streamrec_ingest_last_commit_timestamp_seconds") == 0
    before = value(metrics, "streamrec_ingest_seconds_since_last_commit")
    assert before is not None and before >= 0  # since the process started
    metrics.started -= 1000  # as if started long ago: the scrape computes the age
    assert value(metrics, "streamrec_ingest_seconds_since_last_commit") >= 1000
    metrics.committed(0.003)
    assert value(metrics, "streamrec_ingest_last_commit_timestamp_seconds") == pytest.approx(metrics.last_commit)
    assert value(metrics, "streamrec_ingest_seconds_since_last_commit") < 1000
    assert value(metrics, "streamrec_ingest_commit_seconds_count") == 1


def test_lag_and_assignment_follow_the_partitions_held():
    metrics = IngestMetrics()
    items0 = TopicPartition("items", 0)
    consumer = FakeConsumer({EVENTS0: 100, EVENTS1: 50, items0: None}, {EVENTS1: 45})
    metrics.refresh_partitions(consumer, {EVENTS0: 90, EVENTS1: None, items0: None})
    assert value(metrics, "streamrec_ingest_consumer_lag", partition="0") == 10
    assert value(metrics, "streamrec_ingest_consumer_lag", partition="1") == 5  # from the consumer's position
    assert value(metrics, "streamrec_ingest_consumer_lag", topic="items") is None  # no high-water mark yet
    assert value(metrics, "streamrec_ingest_assigned_partitions", topic="events") == 2
    assert value(metrics, "streamrec_ingest_assigned_partitions", topic="items") == 1
    metrics.refresh_partitions(consumer, {EVENTS0: 100})  # the others were given away
    assert value(metrics, "streamrec_ingest_consumer_lag", partition="0") == 0
    assert value(metrics, "streamrec_ingest_consumer_lag", partition="1") is None  # no stale series left
    assert value(metrics, "streamrec_ingest_assigned_partitions", topic="events") == 1
    assert value(metrics, "streamrec_ingest_assigned_partitions", topic="items") == 0


def test_feature_runs_of_the_timer_are_counted_and_the_last_success_carried_over():
    metrics = IngestMetrics(features_timer=True, features_last_success=1234.0)
    assert value(metrics, "streamrec_features_last_success_timestamp_seconds") == 1234.0
    assert value(metrics, "streamrec_features_runs_total", outcome="failed") == 0

    outcomes = iter([RuntimeError("log unreadable"), FeaturesBusyError("another run holds the lock"), None])

    def job(settings, redis_client=None):
        exc = next(outcomes)
        if exc is not None:
            raise exc
        return type("R", (), {"noop": True})()

    pf = PeriodicFeatures(None, None, interval_s=1e-9, run=job, on_outcome=metrics.feature_run)
    for _ in range(3):
        pf.maybe_run()
        pf.join()
    assert value(metrics, "streamrec_features_runs_total", outcome="failed") == 1
    assert value(metrics, "streamrec_features_runs_total", outcome="ok") == 1  # busy is no run
    assert value(metrics, "streamrec_features_last_success_timestamp_seconds") > 1234.0


def test_healthz_follows_the_consume_loop_and_metrics_are_served():
    assert liveness_bound_s(10_000) == LIVENESS_STALL_S
    assert liveness_bound_s(600_000) > 600  # comfortably above max.poll.interval
    metrics = IngestMetrics(liveness_bound_s=30.0)
    server = MetricsServer(metrics, free_port())
    base = f"http://127.0.0.1:{server.port}"
    try:
        metrics.consumed(EVENTS0, 5)
        got = requests.get(f"{base}/metrics", timeout=5)
        assert got.status_code == 200 and "text/plain" in got.headers["Content-Type"]
        assert 'streamrec_ingest_records_total{partition="0",topic="events"} 5.0' in got.text
        assert "process_cpu_seconds_total" in got.text or "python_info" in got.text  # the default registry too
        ok = requests.get(f"{base}/healthz", timeout=5)
        assert ok.status_code == 200 and ok.text.startswith("ok")
        metrics.last_poll -= 31  # the loop has not polled for longer than the bound
        stuck = requests.get(f"{base}/healthz", timeout=5)
        assert stuck.status_code == 503 and "has not polled" in stuck.text and stuck.text.count("\n") == 1
        assert requests.get(f"{base}/nope", timeout=5).status_code == 404
    finally:
        server.close()


def test_a_port_in_use_names_the_variable():
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(MetricsPortError, match=f"STREAMREC_INGEST_METRICS_PORT={port}") as err:
            MetricsServer(IngestMetrics(), port)
        assert "0 to turn" in str(err.value)
