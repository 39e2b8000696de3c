"""What ingest holds in memory is bounded whatever the number of events (fakes for Kafka and Redis;
the measured peak is bench/ingest.py's `consumer_peak_rss_mb`).

The log rows a process buffers are bounded per partition (STREAMREC_LOG_FLUSH_RECORDS, or
STREAMREC_LOG_FLUSH_INTERVAL_S) and over all its partitions (`MAX_BUFFERED_LOG_ROWS`); the Redis
batches in flight by `MAX_PENDING_REDIS_BATCHES`.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future

from kafka import TopicPartition

from streaming import ingest
from streaming.ingest import Ingestor, IngestStats, PartitionState
from streaming.ingest_metrics import IngestMetrics
from streaming.settings import load_settings

PARTITIONS = [TopicPartition("events", p) for p in range(4)]


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict] = []

    def commit(self, offsets) -> None:
        self.commits.append(dict(offsets))


def _ingestor(tmp_path, **settings) -> Ingestor:
    ing = Ingestor.__new__(Ingestor)  # no Kafka, no Redis: only what commit_durable and _submit_redis touch
    ing.settings = load_settings(data_dir=tmp_path, log_flush_records=1_000_000, log_flush_interval_s=3600, **settings)
    ing.consumer, ing.metrics, ing.stats, ing.on_commit = FakeConsumer(), IngestMetrics(), IngestStats(), None
    ing.partitions = {tp: PartitionState(logged_upto=-1) for tp in PARTITIONS}
    ing._pending = deque()
    ing.persisted = []
    ing._persist = lambda tps: ing.persisted.append(sorted(tp.partition for tp in tps))
    return ing


def _buffer(ing: Ingestor, tp: TopicPartition, n: int) -> None:
    state = ing.partitions[tp]
    state.rows.extend((i,) for i in range(n))
    state.next_offset, state.pending_since = n, time.monotonic()


def test_rows_over_the_process_wide_cap_are_written_and_committed_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_BUFFERED_LOG_ROWS", 100)
    ing = _ingestor(tmp_path)
    _buffer(ing, PARTITIONS[0], 60)
    _buffer(ing, PARTITIONS[1], 39)
    assert ing.commit_durable() == 0  # 99 rows: under every threshold
    _buffer(ing, PARTITIONS[2], 1)
    assert ing.commit_durable() == 3  # 100: every partition holding rows goes, the one without stays
    assert ing.persisted == [[0, 1, 2]]
    assert sorted(tp.partition for tp in ing.consumer.commits[0]) == [0, 1, 2]


def test_a_partition_still_flushes_at_its_own_threshold(tmp_path):
    ing = _ingestor(tmp_path)
    ing.settings = ing.settings.model_copy(update={"log_flush_records": 10})
    _buffer(ing, PARTITIONS[3], 10)
    _buffer(ing, PARTITIONS[0], 9)
    assert ing.commit_durable() == 1
    assert ing.persisted == [[3]]


def test_redis_batches_in_flight_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_PENDING_REDIS_BATCHES", 3)
    ing = _ingestor(tmp_path)
    waited: list[int] = []

    class Batch(Future):  # an applied batch that notes when ingest waits for it
        def __init__(self, offset: int) -> None:
            super().__init__()
            self.offset = offset
            self.set_result(0)

        def result(self, timeout=None):
            waited.append(self.offset)
            return super().result(timeout)

    class Writer:
        def submit(self, fn, apply, topic, partition, records, upto):
            return Batch(upto)

    ing._redis_writer = Writer()
    for offset in range(3):
        ing._submit_redis(None, "events", 0, [], offset)
    assert waited == [] and len(ing._pending) == 3
    ing._submit_redis(None, "events", 0, [], 3)  # a fourth: the oldest must be acknowledged first
    assert waited == [0] and [b.offset for b in ing._pending] == [1, 2, 3]
