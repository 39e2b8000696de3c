"""A Redis that lost what Kafka had committed: ingest seeks back to the watermark + 1 at assignment
(`Ingestor.rewind_lost`) and the online store comes out exact. Real broker, real redis-server."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import redis
import requests

from services.processes import free_port
from streaming.datasets import SyntheticConfig, synthetic_dataset
from streaming.events import Event
from streaming.ingest import Ingestor
from streaming.online_store import OnlineStore
from streaming.producer import EventProducer, replay
from tests.fixtures.redis_server import RedisServer
from tests.streaming.helpers import isolated_settings, popularity_total, read_log, wait_for
from tests.streaming.redis_crash import ahead, applied_events, assert_exact, committed, crash_behind, spawn_ingest, \
    watermarks

pytestmark = pytest.mark.integration

IDLE_EXIT_S = 2.0
PRODUCE_RATE = 800  # events/s: 25 s of traffic, so the kill lands while events flow
FLOW_TIMEOUT_S = 180


@pytest.mark.slow
def test_redis_sigkilled_mid_stream_and_restarted_behind_comes_out_exact(embedded_stack, tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = isolated_settings(embedded_stack, tmp_path / "data", redis_url=server.url, max_poll_records=400,
                                 log_flush_records=1500, log_flush_interval_s=0.3)
    ds = synthetic_dataset(SyntheticConfig(n_users=200, n_items=150, n_events=20_000, seed=5))
    events, items = list(ds.event_dicts()), list(ds.item_dicts())
    n = len(events)
    store = OnlineStore(redis.Redis.from_url(settings.redis_url), settings.redis_prefix, settings.recent_items_max)
    producer = EventProducer(settings, validate=False)
    feeder = threading.Thread(target=replay, args=(producer, items, events),
                              kwargs=dict(rate=PRODUCE_RATE, progress=False))
    feeder.start()
    first = second = None
    try:  # the processes are stopped in `finally`, the server after the checks
        first = spawn_ingest(settings, tmp_path / "ingest-1.log")
        wait_for(lambda: applied_events(store, settings) >= 1500, FLOW_TIMEOUT_S, "ingestion to get going")
        crash_behind(server, store, settings, feeder, FLOW_TIMEOUT_S)
        # Ingest waits an outage out (tests/streaming/test_redis_outage.py); stopped meanwhile it commits
        # nothing more, so the next one meets the restarted Redis, behind, at assignment.
        wait_for(lambda: "stopped answering" in first.log_path.read_text(), FLOW_TIMEOUT_S, "ingest to see Redis go")
        first.send_signal(signal.SIGTERM)
        assert first.wait(FLOW_TIMEOUT_S) == 0, first.log_path.read_text()[-3000:]
        server.start()
        behind = ahead(committed(settings), watermarks(store, settings))
        assert behind, "the restarted Redis should be behind the committed offsets"

        port = free_port()
        second = spawn_ingest(settings, tmp_path / "ingest-2.log", metrics_port=port)
        feeder.join()
        producer.close()
        wait_for(lambda: popularity_total(settings) >= n and read_log(settings).num_rows >= n, FLOW_TIMEOUT_S,
                 "every event in Redis and the log")
        scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        rewinds = sum(float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                      if line.startswith("streamrec_ingest_redis_rewinds_total{"))
        assert rewinds >= len([tp for tp in behind if tp[0] == settings.events_topic]) > 0
        assert "re-reading from" in second.log_path.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if second is not None:
            assert second.wait(30) == 0, second.log_path.read_text()[-3000:]
        if feeder.is_alive():
            feeder.join(FLOW_TIMEOUT_S)
    try:
        assert_exact(settings, store, events, items)
    finally:
        server.stop()


def _event(i: int) -> Event:
    return Event(event_id=f"e{i}", user_id=f"u{i % 3}", item_id=f"i{i % 4}", type="click", ts=1_000 + i)


def test_trailing_bad_records_advance_the_watermark(embedded_stack):
    r = redis.Redis.from_url(embedded_stack.redis_url)
    store = OnlineStore(r, f"t{os.getpid()}wm:")
    assert store.apply_events("ev", 0, [(0, _event(0)), (1, _event(1))], upto=3) == 2  # 2, 3 went to the DLQ
    assert store.watermark("ev", 0) == 3
    assert store.apply_events("ev", 0, [], upto=6) == 0  # an all-bad batch
    assert store.watermark("ev", 0) == 6
    assert store.apply_events("ev", 0, [(0, _event(0))], upto=4) == 0  # a replay changes nothing
    assert store.watermark("ev", 0) == 6 and store.popularity(["i0"]) == {"i0": 1}
    assert store.apply_events("ev", 0, [(7, _event(7))]) == 1 and store.watermark("ev", 0) == 7  # upto optional
    assert store.apply_items("it", 0, [], upto=2) == 0 and store.watermark("it", 0) == 2


def test_a_redis_that_lost_everything_is_refilled_from_kafka_and_the_log_is_not_rewritten(embedded_stack, tmp_path):
    """Every key gone (the extreme of a lost last second): the watermark is -1, below every committed
    offset, so each partition is re-read from its start; the log writer skips what it holds."""
    settings = isolated_settings(embedded_stack, tmp_path)
    n_good = 300
    with EventProducer(settings) as producer:
        for i in range(n_good):
            producer.send_event({"event_id": f"g{i}", "user_id": f"u{i % 9}", "item_id": f"i{i % 11}",
                                 "type": "click", "ts": 10_000 + i})
        for i in range(20):  # a trailing bad record per partition or so: no rewind for those alone
            producer.send_raw(settings.events_topic, b"{not json", key=f"u{i}".encode())
    first = Ingestor(settings)
    assert first.run(until_idle_s=IDLE_EXIT_S).events == n_good
    files = {f.path for f in read_log_files(settings)}

    again = Ingestor(settings)
    assert again.run(until_idle_s=IDLE_EXIT_S).consumed == 0  # everything committed, nothing lost
    assert _rewinds(again) == 0  # trailing DLQ records advanced the watermark: no false rewind

    r = redis.Redis.from_url(settings.redis_url)
    r.delete(*r.keys(f"{settings.redis_prefix}*"))
    third = Ingestor(settings)
    stats = third.run(until_idle_s=IDLE_EXIT_S)
    assert _rewinds(third) >= 1 and stats.events == n_good and stats.skipped_replays == n_good
    assert popularity_total(settings) == n_good
    assert {f.path for f in read_log_files(settings)} == files  # no log file written twice
    assert read_log(settings).num_rows == n_good


def read_log_files(settings):
    from streaming.offline_log import OfflineLog

    return OfflineLog(settings.log_dir).list_files(settings.events_topic)


def _rewinds(ingestor: Ingestor) -> float:
    return sum(s.value for m in ingestor.metrics.registry.collect() if m.name == "streamrec_ingest_redis_rewinds"
               for s in m.samples if s.name.endswith("_total"))
