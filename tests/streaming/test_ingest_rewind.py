"""Ingestor.rewind_lost, the decision alone (fakes for the consumer and Redis); the real thing, with
redis-server SIGKILLed mid-stream, is tests/streaming/test_redis_recovery.py."""

from __future__ import annotations

import logging

from kafka import TopicPartition

from streaming.ingest import Ingestor
from streaming.ingest_metrics import IngestMetrics

P0, P1, P2, P3 = (TopicPartition("events", p) for p in range(4))


class FakeConsumer:
    def __init__(self, committed: dict) -> None:
        self.committed_offsets, self.sought = committed, {}

    def committed(self, tp):
        return self.committed_offsets.get(tp)

    def seek(self, tp, offset):
        self.sought[tp] = offset


class FakeStore:
    def __init__(self, watermarks: dict) -> None:
        self.watermarks = watermarks

    def watermark(self, topic, partition):
        return self.watermarks.get(TopicPartition(topic, partition), -1)


def _ingestor(committed: dict, watermarks: dict) -> Ingestor:
    ing = Ingestor.__new__(Ingestor)  # no Kafka, no Redis: only what rewind_lost reads
    ing.consumer, ing.store, ing.metrics = FakeConsumer(committed), FakeStore(watermarks), IngestMetrics()
    ing.partitions = {tp: object() for tp in (P0, P1, P2, P3)}
    ing.unchecked = {P0, P1, P2, P3}
    return ing


def test_only_partitions_redis_lost_are_sought_back_and_their_polled_records_dropped(caplog):
    ing = _ingestor(committed={P0: 100, P1: 100, P2: None, P3: 5}, watermarks={P0: 99, P1: 60, P3: -1})
    polled = {P0: ["r"], P1: ["r100", "r101"], P3: ["r5"]}
    with caplog.at_level(logging.WARNING, logger="streaming.ingest"):
        assert ing.rewind_lost(polled) == 2
    # P0: in step (watermark 99 = committed - 1); P2: nothing committed yet; P1, P3 lost offsets
    assert ing.consumer.sought == {P1: 61, P3: 0}
    assert polled == {P0: ["r"]}  # records read from past the gap are re-read after the seek instead
    assert "events[1]: Redis holds offsets up to 60 but 100 is committed" in caplog.text
    assert not ing.unchecked
    assert ing.rewind_lost({}) == 0  # checked once per assignment


def test_a_watermark_ahead_of_the_commit_is_normal():
    # applied but not yet committed when the last owner stopped: nothing to re-read
    ing = _ingestor(committed={P0: 10}, watermarks={P0: 50})
    assert ing.rewind_lost({}) == 0 and ing.consumer.sought == {}


def test_a_partition_revoked_before_the_check_is_skipped():
    ing = _ingestor(committed={P0: 10}, watermarks={})
    del ing.partitions[P0]
    assert ing.rewind_lost({}) == 0 and ing.consumer.sought == {}
