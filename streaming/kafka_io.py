"""Kafka plumbing shared by the producer, the ingestion consumer and the tools.

Every client is made here (`make_admin`, `make_producer`, `make_consumer`: kafka-python;
`make_confluent_producer`: confluent-kafka), so the transport settings -- TLS and SASL (PLAIN,
SCRAM-SHA-256/512) from `STREAMREC_KAFKA_*`, as `security_config` (kafka-python's names) and
`librdkafka_security_config` (librdkafka's) -- reach each of them: ingest, `streamrec produce`, the
DLQ writer and reader, topic creation, the broker identity guard, `streamrec status`,
`rebuild-online` and the API replicas' impression writer. The consumer never auto-commits:
`streaming.ingest` commits offsets itself, after its outputs are durable.

kafka-python is the project's client; the one confluent-kafka producer writes impressions on the
request path (`services/impressions.py` says why).
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka import Producer as ConfluentProducer
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, TopicAuthorizationFailedError

from streaming.settings import Settings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_MS = 30_000
PRODUCER_LINGER_MS = 5
PRODUCER_BATCH_BYTES = 512 * 1024
FETCH_MAX_BYTES = 64 * 1024 * 1024
PARTITION_FETCH_MAX_BYTES = 16 * 1024 * 1024
HEARTBEAT_INTERVAL_MS = 1000


class KafkaUnavailable(RuntimeError):
    """The configured Kafka cluster cannot be reached."""


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise KafkaUnavailable(
            "no Kafka address: set KAFKA_BOOTSTRAP_SERVERS or let the CLI start the embedded stack"
        )
    return settings.kafka_bootstrap_servers


def security_config(settings: Settings) -> dict:
    """kafka-python's keyword arguments for the configured transport: `security_protocol`, and the
    SASL (`sasl_mechanism`, `sasl_plain_username`, `sasl_plain_password`: kafka-python's names for
    PLAIN and SCRAM alike) and TLS (`ssl_cafile`, `ssl_certfile`, `ssl_keyfile`) ones it needs.
    The combinations are validated when the settings load (`streaming.settings`)."""
    config: dict = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol.startswith("SASL_"):
        config.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password.get_secret_value(),
        )
    for key, path in (("ssl_cafile", settings.kafka_ssl_cafile), ("ssl_certfile", settings.kafka_ssl_certfile),
                      ("ssl_keyfile", settings.kafka_ssl_keyfile)):
        if path is not None:
            config[key] = str(path)
    return config


def librdkafka_security_config(settings: Settings) -> dict:
    """The same transport in librdkafka's configuration names (confluent-kafka): `security.protocol`,
    `sasl.mechanisms`, `sasl.username`, `sasl.password`, `ssl.ca.location`, `ssl.certificate.location`,
    `ssl.key.location`. Without a CA file a TLS client trusts the system's CAs (`probe`), as kafka-python does."""
    config: dict = {"security.protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol.startswith("SASL_"):
        config.update({
            "sasl.mechanisms": settings.kafka_sasl_mechanism,
            "sasl.username": settings.kafka_sasl_username,
            "sasl.password": settings.kafka_sasl_password.get_secret_value(),
        })
    for key, path in (("ssl.ca.location", settings.kafka_ssl_cafile),
                      ("ssl.certificate.location", settings.kafka_ssl_certfile),
                      ("ssl.key.location", settings.kafka_ssl_keyfile)):
        if path is not None:
            config[key] = str(path)
    if settings.kafka_security_protocol.endswith("SSL") and settings.kafka_ssl_cafile is None:
        config["ssl.ca.location"] = "probe"
    return config


def describe_transport(settings: Settings) -> str:
    """How the clients talk to the brokers, for messages (never the password)."""
    proto = settings.kafka_security_protocol
    if proto.startswith("SASL_"):
        return f"{proto}, {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r}"
    return proto


def _unreachable(settings: Settings, exc: Exception) -> KafkaUnavailable:
    hint = ""
    if settings.kafka_security_protocol != "PLAINTEXT":
        hint = (f" over {describe_transport(settings)} (check STREAMREC_KAFKA_SECURITY_PROTOCOL, the SASL user and "
                "password, and STREAMREC_KAFKA_SSL_CAFILE)")
    return KafkaUnavailable(
        f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers!r}{hint}: {exc}"
    )


def make_admin(settings: Settings, **overrides) -> KafkaAdminClient:
    """An admin client of the configured cluster (close it after use)."""
    config = dict(bootstrap_servers=_bootstrap(settings), request_timeout_ms=REQUEST_TIMEOUT_MS,
                  bootstrap_timeout_ms=settings.kafka_connect_timeout_ms, **security_config(settings))
    config.update(overrides)
    try:
        return KafkaAdminClient(**config)
    except (KafkaError, OSError) as exc:
        raise _unreachable(settings, exc) from exc


def ensure_topics(settings: Settings, topics: list[str] | None = None) -> None:
    """Create these topics (default: events, items, DLQ, forget and impressions) if they do not exist (idempotent).
    A client whose ACLs may not create (or even see) a topic leaves it to whoever manages the topics
    (Strimzi `KafkaTopic`s on Kubernetes): a topic it may not see looks missing to it."""
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        wanted = topics or [settings.events_topic, settings.items_topic, settings.dlq_topic, settings.forget_topic,
                             settings.impressions_topic]
        missing = [
            NewTopic(name, settings.topic_partitions, settings.topic_replication)
            for name in wanted
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
                log.info("created topics %s", [t.name for t in missing])
            except TopicAlreadyExistsError:
                pass  # another process won the race
            except TopicAuthorizationFailedError:
                log.info("not allowed to create %s: leaving the topics to whoever manages them",
                         [t.name for t in missing])
    finally:
        admin.close()


def make_producer(settings: Settings, **overrides) -> KafkaProducer:
    """A producer that waits for all in-sync replicas: a send the producer calls done is durable."""
    config = dict(
        bootstrap_servers=_bootstrap(settings),
        acks="all",
        linger_ms=PRODUCER_LINGER_MS,
        batch_size=PRODUCER_BATCH_BYTES,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        bootstrap_timeout_ms=settings.kafka_connect_timeout_ms,
        retries=5,
        **security_config(settings),
    )
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except (KafkaError, OSError) as exc:
        raise _unreachable(settings, exc) from exc


def make_confluent_producer(settings: Settings, **config) -> ConfluentProducer:
    """A confluent-kafka producer (librdkafka names in `config`, e.g. `{"linger.ms": 20}`; pass them with
    `**{...}`). Nothing connects here: librdkafka reaches the brokers from its own threads and keeps
    retrying; a configuration it refuses raises KafkaUnavailable naming the transport."""
    full = {"bootstrap.servers": _bootstrap(settings), **librdkafka_security_config(settings)}
    full.update(config)
    try:
        return ConfluentProducer(full)
    except (KafkaException, ValueError, TypeError) as exc:
        raise KafkaUnavailable(
            f"cannot make a Kafka producer for KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers!r} over "
            f"{describe_transport(settings)}: {exc}") from exc


def make_consumer(settings: Settings, *topics: str, **overrides) -> KafkaConsumer:
    """A group consumer with manual commits, tuned for micro-batches."""
    config = dict(
        bootstrap_servers=_bootstrap(settings),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_poll_records,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=min(HEARTBEAT_INTERVAL_MS, settings.session_timeout_ms // 3),
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_MAX_BYTES,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        bootstrap_timeout_ms=settings.kafka_connect_timeout_ms,
        **security_config(settings),
    )
    config.update(overrides)
    try:
        consumer = KafkaConsumer(**config)
    except (KafkaError, OSError) as exc:
        raise _unreachable(settings, exc) from exc
    return consumer
