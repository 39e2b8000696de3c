"""The impression writer: never fails or blocks a request; drops are counted by reason; with a real
broker the records arrive and parse as the contract says."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from services import impressions
from services.impressions import ImpressionWriter
from services.metrics import IMPRESSION_DROP_REASONS, ServeMetrics
from streaming import kafka_io
from streaming.events import Impression, parse_impression
from streaming.settings import load_settings
from tests.streaming.helpers import wait_for

TS = 1_732_350_000_000
PSEUDONYM = "a" * 32
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: every connection is refused
SHORT_MESSAGE_TIMEOUT_MS = 1_000  # these tests' writers give up on a record after this (instead of 30 s)
DROP_WAIT_S = 60.0  # how long a test waits for records to time out and be counted (a slow, shared machine)


def impression(i: int, user: str | None = PSEUDONYM) -> dict:
    return Impression(request_id=f"r-{i:08d}", user_id=user, scene="default", version="v000001", variant="control",
                      item_ids=[f"i{k}" for k in range(10)], scores=[1.0 - k / 10 for k in range(10)],
                      ts=TS + i).model_dump()


def counts(metrics: ServeMetrics) -> dict[str, float]:
    get = metrics.registry.get_sample_value
    out = {r: get("streamrec_impressions_dropped_total", {"reason": r}) for r in IMPRESSION_DROP_REASONS}
    out["written"] = get("streamrec_impressions_written_total", {})
    return out


@pytest.fixture
def closing():
    writers: list[ImpressionWriter] = []
    yield writers.append
    for w in writers:
        w.close(0.5)


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(impressions, "MESSAGE_TIMEOUT_MS", SHORT_MESSAGE_TIMEOUT_MS)


def test_kafka_down_and_a_tiny_buffer_every_write_returns_and_every_drop_is_counted(short_timeout, closing):
    settings = load_settings(kafka_bootstrap_servers=UNREACHABLE, impression_buffer_max=100)
    metrics = ServeMetrics("r1")
    writer = ImpressionWriter(settings, metrics)
    closing(writer)
    accepted = sum(writer.write(PSEUDONYM, impression(i)) for i in range(5000))

    seen = counts(metrics)
    assert 100 <= accepted < 5000
    assert seen["buffer_full"] == 5000 - accepted  # refused at once, never queued
    # the accepted ones wait in the producer (librdkafka keeps trying to connect), then time out: dropped
    wait_for(lambda: counts(metrics)["kafka_error"] == accepted, DROP_WAIT_S, "the queued impressions dropped")
    assert counts(metrics)["written"] == 0 and counts(metrics)["serialize"] == 0
    assert writer.pending() == 0
    # and then there is room again
    assert writer.write(PSEUDONYM, impression(5000)) and writer.pending() == 1


def test_kafka_down_is_quiet_one_warning_per_interval_and_nothing_on_stderr(short_timeout, closing, caplog, capfd):
    """librdkafka logs every failed connection; a Kafka-down replica must not spam its log or stderr."""
    settings = load_settings(kafka_bootstrap_servers=UNREACHABLE)
    metrics = ServeMetrics("r1")
    with caplog.at_level(logging.DEBUG, logger="services.impressions"):
        writer = ImpressionWriter(settings, metrics)
        closing(writer)
        for i in range(3):
            assert writer.write(PSEUDONYM, impression(i))
        wait_for(lambda: counts(metrics)["kafka_error"] == 3, DROP_WAIT_S, "the impressions timed out")
        wait_for(lambda: sum("refused" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) >= 2,
                 DROP_WAIT_S, "librdkafka to report two refused connections")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("Kafka client" in m for m in warnings) == 1, warnings  # the rest held back (ERROR_LOG_INTERVAL_S)
    assert sum("records dropped" in m for m in warnings) == 1, warnings
    err = capfd.readouterr().err  # librdkafka's default: "%3|<ts>|FAIL|streamrec-impressions#producer-1| ..."
    assert "#producer" not in err and "Connect to" not in err, err[-2000:]


def test_close_drops_and_counts_what_the_broker_did_not_acknowledge(closing):
    settings = load_settings(kafka_bootstrap_servers=UNREACHABLE)
    metrics = ServeMetrics("r1")
    writer = ImpressionWriter(settings, metrics)
    assert all(writer.write(PSEUDONYM, impression(i)) for i in range(10)) and writer.pending() == 10
    writer.close(0.2)
    assert counts(metrics)["kafka_error"] == 10 and writer.pending() == 0
    assert writer.write(PSEUDONYM, impression(11)) is False  # closed: dropped, counted, never raised
    assert counts(metrics)["kafka_error"] == 11


def test_what_is_not_json_is_dropped_as_serialize_never_raised(closing):
    settings = load_settings(kafka_bootstrap_servers=UNREACHABLE)
    metrics = ServeMetrics("r1")
    writer = ImpressionWriter(settings, metrics)
    closing(writer)
    assert writer.write(PSEUDONYM, {**impression(1), "scores": [float("nan")]}) is False
    assert writer.write(PSEUDONYM, {**impression(2), "ts": object()}) is False
    assert writer.write(12345, impression(3)) is False  # type: ignore[arg-type]  (a key must be text)
    assert counts(metrics)["serialize"] == 3 and writer.pending() == 0


def test_a_producer_that_cannot_be_made_drops_every_write_and_never_fails_the_replica(monkeypatch, closing):
    def refuse(settings, **config):
        raise kafka_io.KafkaUnavailable("ssl.ca.location: no such file")

    monkeypatch.setattr(kafka_io, "make_confluent_producer", refuse)
    metrics = ServeMetrics("r1")
    writer = ImpressionWriter(load_settings(kafka_bootstrap_servers="broker.example:9093"), metrics)
    closing(writer)
    assert writer.write(PSEUDONYM, impression(1)) is False
    assert counts(metrics)["kafka_error"] == 1 and writer.pending() == 0


class FakeProducer:
    """Stands in for confluent-kafka's producer: records what it is given; the test settles records by
    calling the configured delivery callback, as librdkafka does from `poll`."""

    def __init__(self, settings, **config):
        self.settings, self.config = settings, config
        self.produced: list[tuple[str, bytes, bytes | None]] = []
        self.polled = threading.Event()
        self.flushed = self.purged = False

    def produce(self, topic, value=None, key=None):
        if len(self.produced) >= self.config["queue.buffering.max.messages"]:
            raise BufferError("Local: Queue full")
        self.produced.append((topic, value, key))

    def poll(self, timeout=None):
        self.polled.set()
        threading.Event().wait(min(timeout or 0, 0.01))  # the real one waits for events this long
        return 0

    def flush(self, timeout=None):
        self.flushed = True
        return 0

    def purge(self, *args, **kwargs):
        self.purged = True


def test_delivery_callbacks_count_written_and_kafka_errors(monkeypatch, closing):
    made: list[FakeProducer] = []

    def factory(settings, **config):
        made.append(FakeProducer(settings, **config))
        return made[-1]

    monkeypatch.setattr(kafka_io, "make_confluent_producer", factory)
    settings = load_settings(kafka_bootstrap_servers="broker.example:9092", impressions_topic="shown",
                             impression_buffer_max=100)
    metrics = ServeMetrics("r1")
    writer = ImpressionWriter(settings, metrics)
    closing(writer)
    producer = made[0]
    assert producer.settings is settings  # made by the factory: the transport settings apply
    config = producer.config
    assert config["linger.ms"] > 0 and config["message.timeout.ms"] > 0 and config["acks"] == 1
    assert config["queue.buffering.max.messages"] == 100 and config["enable.idempotence"] is False
    assert "logger" in config  # librdkafka's own log lines go through Python logging, not stderr
    wait_for(producer.polled.is_set, 10, "the callback thread to poll")

    assert writer.write(PSEUDONYM, impression(1)) and writer.write(None, impression(2, user=None))
    (topic, value, key), (_, _, no_key) = producer.produced  # handed over in write itself: no queue of ours
    assert topic == "shown" and key == PSEUDONYM.encode() and no_key is None
    assert b" " not in value and isinstance(parse_impression(value, 1 << 20), Impression)
    assert json.loads(value)["request_id"] == "r-00000001"
    assert writer.pending() == 2
    assert all(writer.write(PSEUDONYM, impression(i)) for i in range(3, 101))
    assert not writer.write(PSEUDONYM, impression(101))  # 100 waiting: full
    assert counts(metrics)["buffer_full"] == 1 and writer.pending() == 100

    config["on_delivery"](None, "message")
    config["on_delivery"](TimeoutError("Local: Message timed out"), "message")
    assert counts(metrics)["written"] == 1 and counts(metrics)["kafka_error"] == 1 and writer.pending() == 98
    writer.close(0.5)
    assert producer.flushed and not producer.purged  # flush said nothing was left


@pytest.mark.integration
def test_impressions_reach_the_broker_and_parse(embedded_stack, tmp_path, closing):
    from kafka import TopicPartition

    from tests.streaming.helpers import isolated_settings

    settings = isolated_settings(embedded_stack, tmp_path)
    metrics = ServeMetrics("r1")
    writer = ImpressionWriter(settings, metrics)
    closing(writer)
    sent = {f"r-{i:08d}" for i in range(50)}
    assert all(writer.write(PSEUDONYM if i % 5 else None, impression(i, PSEUDONYM if i % 5 else None))
               for i in range(50))
    wait_for(lambda: counts(metrics)["written"] == 50, 60, "50 impressions acknowledged by the broker")
    assert writer.pending() == 0

    consumer = kafka_io.make_consumer(settings, group_id=None)
    try:
        parts = [TopicPartition(settings.impressions_topic, p)
                 for p in sorted(consumer.partitions_for_topic(settings.impressions_topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got: list = []

        def all_read() -> bool:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
            return len(got) >= 50

        wait_for(all_read, 60, "the 50 impressions read back")
    finally:
        consumer.close(autocommit=False)
    parsed = [parse_impression(r.value, settings.max_payload_bytes) for r in got]
    assert all(isinstance(p, Impression) for p in parsed)
    assert {p.request_id for p in parsed} == sent
    assert {r.key for r in got} == {PSEUDONYM.encode(), None}
    assert all((r.key is None) == (p.user_id is None) for r, p in zip(got, parsed))
    assert counts(metrics)["kafka_error"] == counts(metrics)["buffer_full"] == 0
