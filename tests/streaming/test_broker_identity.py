"""streaming.broker_identity: the comparison and the policy (unit tests on a fake Redis); the real
refusal of `streamrec ingest` on a new broker is tests/streaming/test_ingest_broker_guard.py."""

from __future__ import annotations

import logging

import pytest

from streaming.broker_identity import (
    BrokerIdentity,
    BrokerMismatch,
    broker_key,
    check_broker_identity,
    clean_topic_id,
    differences,
    read_recorded,
)

A = BrokerIdentity("cluster-a", {"events": "id-ev-1", "items": "id-it-1"})
PARTITIONS = {"events": 2, "items": 1}


class FakeRedis:
    """The few commands the guard uses, on a dict (bytes in, bytes out like redis-py)."""

    def __init__(self) -> None:
        self.data: dict[str, object] = {}

    def set(self, key, value):
        self.data[key] = str(value).encode()

    def mget(self, keys):
        return [self.data.get(k) for k in keys]

    def hgetall(self, key):
        return {k.encode(): v.encode() for k, v in (self.data.get(key) or {}).items()}

    def delete(self, key):
        self.data.pop(key, None)

    def hset(self, key, mapping):
        self.data.setdefault(key, {}).update(mapping)

    def pipeline(self, transaction=True):
        parent = self

        class Pipe:
            def __init__(self):
                self.ops = []

            def delete(self, key):
                self.ops.append(lambda: parent.delete(key))

            def hset(self, key, mapping):
                self.ops.append(lambda: parent.hset(key, mapping))

            def execute(self):
                for op in self.ops:
                    op()

        return Pipe()


def test_clean_topic_id_drops_what_brokers_without_topic_ids_answer():
    assert clean_topic_id(None) is None
    assert clean_topic_id("00000000-0000-0000-0000-000000000000") is None
    assert clean_topic_id("AAAAAAAAAAAAAAAAAAAAAA") is None
    assert clean_topic_id("01a23bb1-1c67-7d63-9730-1a9c13efef08") == "01a23bb1-1c67-7d63-9730-1a9c13efef08"


def test_differences_name_the_cluster_and_each_recreated_topic():
    assert differences(A, A) == []
    other = BrokerIdentity("cluster-b", {"events": "id-ev-2", "items": "id-it-1"})
    diffs = differences(A, other)
    assert len(diffs) == 2
    assert "'cluster-a'" in diffs[0] and "'cluster-b'" in diffs[0]
    assert "'events'" in diffs[1] and "id-ev-1" in diffs[1] and "id-ev-2" in diffs[1]
    # an id one side does not know is no difference: a broker without topic ids, a new topic
    assert differences(A, BrokerIdentity("cluster-a", {})) == []
    assert differences(BrokerIdentity(None, {"events": "id-ev-1"}), A) == []
    assert differences(A, BrokerIdentity("cluster-a", {"events": "id-ev-1", "dlq": "x"})) == []


def test_fresh_redis_records_and_the_same_broker_matches():
    r = FakeRedis()
    assert check_broker_identity(r, "p:", A, PARTITIONS) == "recorded"
    assert read_recorded(r, "p:") == A
    r.set("p:wm:events:0", 41)
    assert check_broker_identity(r, "p:", A, PARTITIONS) == "matched"


def test_watermarks_of_another_cluster_or_topic_are_refused_naming_both_ids_and_the_fix():
    r = FakeRedis()
    check_broker_identity(r, "p:", A, PARTITIONS)
    r.set("p:wm:events:1", 7)
    new_cluster = BrokerIdentity("cluster-b", {"events": "id-ev-9", "items": "id-it-9"})
    with pytest.raises(BrokerMismatch) as err:
        check_broker_identity(r, "p:", new_cluster, PARTITIONS, redis_at="Redis at redis://r", kafka_at="the broker at k:9092")
    msg = str(err.value)
    for needed in ("cluster-a", "cluster-b", "id-ev-1", "id-ev-9", "streamrec ingest --fresh", "redis://r", "k:9092",
                   "skipped as already applied", "1 partitions"):
        assert needed in msg, needed
    recreated = BrokerIdentity("cluster-a", {"events": "id-ev-2", "items": "id-it-1"})
    with pytest.raises(BrokerMismatch, match="id-ev-2"):
        check_broker_identity(r, "p:", recreated, PARTITIONS, fix="`streamrec up --fresh`")
    assert read_recorded(r, "p:") == A  # a refusal records nothing


def test_watermarks_without_identity_are_adopted_with_a_warning(caplog):
    r = FakeRedis()
    r.set("p:wm:items:0", 3)  # older data, or a store rebuilt by rebuild-online
    with caplog.at_level(logging.WARNING, logger="streaming.broker_identity"):
        assert check_broker_identity(r, "p:", A, PARTITIONS) == "adopted"
    assert "no broker identity" in caplog.text and "streamrec ingest --fresh" in caplog.text
    assert read_recorded(r, "p:") == A


def test_an_identity_without_watermarks_is_replaced():
    r = FakeRedis()
    check_broker_identity(r, "p:", A, PARTITIONS)
    b = BrokerIdentity("cluster-b", {"events": "e", "items": "i"})
    assert check_broker_identity(r, "p:", b, PARTITIONS) == "replaced"  # the watermarks were deleted as the fix
    assert read_recorded(r, "p:") == b
    assert broker_key("p:") in r.data and "p:" + "broker" == broker_key("p:")


def test_a_matching_broker_completes_the_record():
    r = FakeRedis()
    check_broker_identity(r, "p:", BrokerIdentity("cluster-a", {"events": "id-ev-1"}), PARTITIONS)
    r.set("p:wm:events:0", 1)
    assert check_broker_identity(r, "p:", A, PARTITIONS) == "matched"
    assert read_recorded(r, "p:") == A  # the items topic's id is recorded now too
