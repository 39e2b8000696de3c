"""Redis dying under ingest: ingest waits with back-off (one WARNING per outage, one INFO when Redis is
back), commits nothing past what Redis holds, and comes out exact. Unit tests drive
`Ingestor.ride_out_redis_outage` with fakes; the integration test SIGKILLs a real redis-server while
events flow and restarts it on its append-only file, behind."""

from __future__ import annotations

import logging
import signal
import threading

import pytest
import redis
from kafka import TopicPartition

from streaming.ingest import Ingestor, IngestStats, PartitionState
from streaming.ingest_metrics import IngestMetrics

P0, P1, P2 = (TopicPartition("events", p) for p in range(3))


# --- unit: the decision and the log lines, with fakes ---------------------------------------------
class FakeConsumer:
    def __init__(self, committed: dict, assignment: set, polls: list | None = None) -> None:
        self.committed_offsets, self.assigned = committed, assignment
        self.sought: dict = {}
        self.paused: set = set()
        self.polls = list(polls or [])  # what successive polls return
        self.resumed = False

    def committed(self, tp):
        return self.committed_offsets.get(tp)

    def seek(self, tp, offset):
        self.sought[tp] = offset

    def assignment(self):
        return set(self.assigned)

    def pause(self, *tps):
        self.paused.update(tps)

    def resume(self, *tps):
        self.paused.difference_update(tps)
        self.resumed = True

    def poll(self, timeout_ms=0, max_records=None):
        return self.polls.pop(0) if self.polls else {}


class FakeStore:
    def __init__(self, watermarks: dict) -> None:
        self.watermarks = watermarks

    def watermark(self, topic, partition):
        return self.watermarks.get(TopicPartition(topic, partition), -1)


class FlakyRedis:
    """PING fails `down_for` times, then answers."""

    def __init__(self, down_for: int) -> None:
        self.down_for, self.pings = down_for, 0

    def ping(self):
        self.pings += 1
        if self.pings <= self.down_for:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return True


class Rec:
    def __init__(self, offset: int) -> None:
        self.offset = offset


def _ingestor(committed: dict, watermarks: dict, logged: dict, down_for: int = 3, polls=None) -> Ingestor:
    ing = Ingestor.__new__(Ingestor)  # no Kafka, no Redis: only what the outage path reads
    ing.settings = type("S", (), {"max_poll_interval_ms": 10_000, "redis_url": "redis://127.0.0.1:6379/0"})()
    ing.consumer = FakeConsumer(committed, set(logged), polls)
    ing.store, ing.metrics, ing.redis = FakeStore(watermarks), IngestMetrics(), FlakyRedis(down_for)
    ing.partitions = {tp: _state(upto) for tp, upto in logged.items()}
    ing.unchecked, ing._pending, ing.stats = set(logged), [], IngestStats()  # noqa: SLF001
    ing._stop, ing.redis_down = threading.Event(), False  # noqa: SLF001
    return ing


def _state(logged_upto: int) -> PartitionState:
    state = PartitionState(logged_upto=logged_upto)
    state.rows, state.next_offset, state.pending_since = [("row",)], logged_upto + 50, 1.0
    return state


def test_an_outage_is_waited_out_with_one_warning_and_one_info(caplog):
    # P0: Redis came back behind the commit (lost its last second); P1: in step, processed past the commit;
    # P2: never committed, the log holds up to 9 and Redis up to 4
    ing = _ingestor(committed={P0: 100, P1: 100}, watermarks={P0: 60, P1: 130, P2: 4},
                    logged={P0: 99, P1: 99, P2: 9})
    with caplog.at_level(logging.DEBUG, logger="streaming.ingest"):
        assert ing.ride_out_redis_outage(redis.ConnectionError("Connection reset by peer")) is True
    records = [r for r in caplog.records if r.name == "streaming.ingest"]
    assert [r.levelname for r in records].count("WARNING") == 1
    assert [r.levelname for r in records].count("INFO") == 1 and [r.levelname for r in records].count("DEBUG") == 3
    assert "stopped answering" in records[0].getMessage() and "answers again after" in records[-1].getMessage()
    assert "without the last offsets of 1 partitions" in records[-1].getMessage()
    # each partition re-read from the first offset Redis or the log may lack; nothing buffered is kept
    assert ing.consumer.sought == {P0: 61, P1: 100, P2: 5}
    assert all(st.rows == [] and st.next_offset is None and st.pending_since is None for st in ing.partitions.values())
    assert ing.consumer.resumed and not ing.consumer.paused and not ing.redis_down and not ing.unchecked
    assert _sample(ing, "streamrec_ingest_redis_up") == 1 and _sample(ing, "streamrec_ingest_redis_outages_total") == 1
    assert _sample(ing, "streamrec_ingest_redis_rewinds_total") == 1  # P0 came back behind its commit


def _sample(ing: Ingestor, name: str) -> float:
    return sum(s.value for m in ing.metrics.registry.collect() for s in m.samples if s.name == name)


def test_records_of_a_partition_assigned_during_the_wait_are_put_back():
    ing = _ingestor(committed={P0: 10}, watermarks={P0: 9}, logged={P0: 9}, down_for=2,
                    polls=[{}, {P1: [Rec(40), Rec(41)]}])
    ing.consumer.assigned.add(P1)
    ing.partitions[P1] = _state(39)
    assert ing.ride_out_redis_outage(redis.TimeoutError("Timeout reading from socket"))
    assert ing.consumer.sought[P1] <= 40


def test_stopped_during_an_outage_commits_nothing_and_says_so(caplog):
    ing = _ingestor(committed={P0: 10}, watermarks={P0: 9}, logged={P0: 9}, down_for=10**6)
    ing.consumer.poll = lambda timeout_ms=0, max_records=None: ing._stop.set() or {}  # noqa: SLF001
    with caplog.at_level(logging.INFO, logger="streaming.ingest"):
        assert ing.ride_out_redis_outage(redis.ConnectionError("refused")) is False
    assert "stopped while Redis was down" in caplog.text and ing.redis_down
    assert _sample(ing, "streamrec_ingest_redis_up") == 0
    assert ing.consumer.sought == {}


# --- integration: a real redis-server SIGKILLed while events flow -----------------------------------
IDLE_TIMEOUT_S = 180
PRODUCE_RATE = 800  # events/s: ~20 s of traffic, so the kill and the restart land while events flow
OUTAGE_EVENTS = 1600  # events produced while Redis is down (~2 s of traffic): a condition, not a sleep


def _produced(settings) -> int:
    from streaming.kafka_io import make_consumer

    consumer = make_consumer(settings, group_id=None)
    try:
        tps = [TopicPartition(settings.events_topic, p) for p in range(settings.topic_partitions)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.slow
def test_redis_sigkilled_under_ingest_is_waited_out_and_nothing_is_lost_or_doubled(embedded_stack, tmp_path):
    from streaming.datasets import SyntheticConfig, synthetic_dataset
    from streaming.online_store import OnlineStore
    from streaming.producer import EventProducer, replay
    from streaming.redis_io import make_redis
    from tests.fixtures.redis_server import RedisServer
    from tests.streaming.helpers import isolated_settings, popularity_total, read_log, wait_for
    from tests.streaming.redis_crash import applied_events, assert_exact, crash_behind, spawn_ingest

    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = isolated_settings(embedded_stack, tmp_path / "data", redis_url=server.url, max_poll_records=400,
                                 log_flush_records=1500, log_flush_interval_s=0.3)
    ds = synthetic_dataset(SyntheticConfig(n_users=150, n_items=120, n_events=16_000, seed=11))
    events, items = list(ds.event_dicts()), list(ds.item_dicts())
    store = OnlineStore(make_redis(settings), settings.redis_prefix, settings.recent_items_max)
    producer = EventProducer(settings, validate=False)
    feeder = threading.Thread(target=replay, args=(producer, items, events),
                              kwargs=dict(rate=PRODUCE_RATE, progress=False))
    feeder.start()
    log_path = tmp_path / "ingest.log"
    ingest = spawn_ingest(settings, log_path)
    try:
        wait_for(lambda: applied_events(store, settings) >= 1500, IDLE_TIMEOUT_S, "ingestion to get going")
        crash_behind(server, store, settings, feeder, IDLE_TIMEOUT_S)
        killed_at = _produced(settings)
        wait_for(lambda: "stopped answering" in log_path.read_text(), IDLE_TIMEOUT_S, "ingest to see Redis go")
        wait_for(lambda: _produced(settings) >= killed_at + OUTAGE_EVENTS, IDLE_TIMEOUT_S,
                 "events to keep flowing while Redis is down")
        assert ingest.poll() is None, log_path.read_text()[-3000:]  # waiting, not exiting
        server.start()
        feeder.join()
        producer.close()
        n = len(events)
        wait_for(lambda: popularity_total(settings) >= n and read_log(settings).num_rows >= n, IDLE_TIMEOUT_S,
                 "every event in Redis and the log")
    finally:
        if ingest.poll() is None:
            ingest.send_signal(signal.SIGTERM)
        code = ingest.wait(60)
        if feeder.is_alive():
            feeder.join(IDLE_TIMEOUT_S)
    try:
        text = log_path.read_text()
        assert code == 0, text[-3000:]
        warnings = [line for line in text.splitlines() if " WARNING streaming." in line]
        assert len(warnings) == 1 and "stopped answering" in warnings[0], warnings
        back = [line for line in text.splitlines() if "answers again after" in line]
        assert len(back) == 1 and "came back without the last offsets of" in back[0], back
        assert "Traceback" not in text
        assert_exact(settings, store, events, items)
    finally:
        server.stop()

