"""Which Kafka cluster and topics the online store's watermarks belong to, and the guard of `streamrec ingest`.

Redis holds, per partition, the last offset applied (`wm:<topic>:<partition>`, `streaming.online_store`),
and the offline log names its files by offset range. Both are only meaningful for the broker that
handed out those offsets. A new broker -- the embedded one restarted (its topics live in memory), a
topic deleted and recreated, another cluster -- numbers its records from 0 again, and the
idempotent writers would skip them as already applied: silently lost events.

So ingest records the broker's identity beside the watermarks, in the hash `<prefix>broker`
(`cluster_id`, and `topic:<name>` -> topic id for the events and items topics), and checks it at
start (`guard_broker_identity`, before the consumer joins its group):

| Redis holds                                    | ingest                                                     |
| ---------------------------------------------- | ---------------------------------------------------------- |
| no watermarks of these topics                  | records the current identity and starts                    |
| watermarks and the same identity               | starts                                                     |
| watermarks and another cluster id or topic id  | refuses: `BrokerMismatch`, exit status 2, both ids named   |
| watermarks but no identity                     | records the current one with a WARNING and starts          |

The last row is data from before identities were recorded, or a store rebuilt from the log by
`streamrec rebuild-online`: nothing says which broker it came from, so the broker at hand is taken
(the WARNING says how to undo that). An identity recorded without watermarks (they were deleted as
a fix) is replaced by the current one.

What the broker reports: Tansu (the embedded broker) and Kafka >= 2.8 report a cluster id and a
topic id (a UUID, new for a recreated topic). A broker that reports none, or the all-zero UUID, has
no topic ids recorded and compared: then only the cluster id guards (a topic recreated on the same
cluster goes unnoticed there).

Fix for a refusal (`INGEST_FIX`): `streamrec ingest --fresh` (or `streamrec up --fresh` under `up`)
moves the old log, features, registry and runs to `<data dir>/archive/<time>/` and removes the
Redis keys of the prefix; then ingest starts over on the new broker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger(__name__)

CLUSTER_FIELD = "cluster_id"
TOPIC_FIELD_PREFIX = "topic:"
RECORDED_AT_FIELD = "recorded_at"
# How brokers without topic ids answer (the Java client's text form, and the plain UUID).
NO_TOPIC_IDS = frozenset({"", "AAAAAAAAAAAAAAAAAAAAAA", "00000000-0000-0000-0000-000000000000"})
INGEST_FIX = "`streamrec ingest --fresh`"
UP_FIX = "`streamrec up --fresh`"


class BrokerMismatch(RuntimeError):
    """Redis holds watermarks recorded against another cluster or topic; the message says what to do."""


@dataclass(frozen=True)
class BrokerIdentity:
    """A cluster id and topic ids (topic -> id; topics whose broker reports no id are left out)."""

    cluster_id: str | None
    topic_ids: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        topics = ", ".join(f"{t}={i}" for t, i in sorted(self.topic_ids.items())) or "none reported"
        return f"cluster id {self.cluster_id!r}, topic ids {topics}"


def broker_key(prefix: str) -> str:
    return f"{prefix}broker"


def clean_topic_id(raw: Any) -> str | None:
    """A topic id as text, or None for a broker that reports none (absent or all zeros)."""
    text = "" if raw is None else str(raw)
    return None if text in NO_TOPIC_IDS else text


def differences(recorded: BrokerIdentity, current: BrokerIdentity) -> list[str]:
    """What tells `current` apart from `recorded` (empty: the same broker, as far as both know).
    An id one side does not know is not a difference."""
    diffs = []
    if recorded.cluster_id and current.cluster_id and recorded.cluster_id != current.cluster_id:
        diffs.append(f"cluster id {recorded.cluster_id!r} (recorded) != {current.cluster_id!r} (now)")
    for topic, was in sorted(recorded.topic_ids.items()):
        now = current.topic_ids.get(topic)
        if now and was != now:
            diffs.append(f"topic {topic!r} id {was} (recorded) != {now} (now)")
    return diffs


# --- the broker ------------------------------------------------------------------------------
def fetch_broker_identity(settings: Any, topics: list[str]) -> tuple[BrokerIdentity, dict[str, int]]:
    """The broker's identity and the partition count of each of `topics` (that exists)."""
    from streaming.kafka_io import make_admin

    admin = make_admin(settings)
    try:
        cluster_id = admin.describe_cluster().get("cluster_id")
        described = admin.describe_topics(topics)
    finally:
        admin.close()
    topic_ids, partitions = {}, {}
    for t in described:
        if t.get("error_code"):
            continue
        topic_id = clean_topic_id(t.get("topic_id"))
        if topic_id:
            topic_ids[t["name"]] = topic_id
        partitions[t["name"]] = len(t.get("partitions") or ())
    return BrokerIdentity(cluster_id or None, topic_ids), partitions


# --- Redis -----------------------------------------------------------------------------------
def read_recorded(client: Any, prefix: str) -> BrokerIdentity | None:
    raw = client.hgetall(broker_key(prefix))
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    topics = {k[len(TOPIC_FIELD_PREFIX):]: v for k, v in fields.items() if k.startswith(TOPIC_FIELD_PREFIX)}
    return BrokerIdentity(fields.get(CLUSTER_FIELD) or None, topics)


def record(client: Any, prefix: str, identity: BrokerIdentity) -> None:
    """Replace the recorded identity with `identity` (one transaction)."""
    mapping = {RECORDED_AT_FIELD: f"{time.time():.3f}"}
    if identity.cluster_id:
        mapping[CLUSTER_FIELD] = identity.cluster_id
    mapping.update({TOPIC_FIELD_PREFIX + t: i for t, i in identity.topic_ids.items()})
    pipe = client.pipeline(transaction=True)
    pipe.delete(broker_key(prefix))
    pipe.hset(broker_key(prefix), mapping=mapping)
    pipe.execute()


def recorded_watermarks(client: Any, prefix: str, partitions: Mapping[str, int]) -> int:
    """How many partitions of these topics (topic -> partition count) have a watermark in Redis."""
    from streaming.online_store import watermark_key

    keys = [watermark_key(prefix, t, p) for t, n in sorted(partitions.items()) for p in range(n)]
    return sum(v is not None for v in client.mget(keys)) if keys else 0


def check_broker_identity(client: Any, prefix: str, current: BrokerIdentity, partitions: Mapping[str, int], *,
                          redis_at: str = "Redis", kafka_at: str = "the broker", fix: str = INGEST_FIX) -> str:
    """Compare `current` with what Redis recorded (see the module's table); record it when allowed.
    Returns what happened ("recorded", "matched", "adopted", "replaced"); raises BrokerMismatch.
    `redis_at` / `kafka_at` name the two for the message, `fix` the command that fixes it."""
    recorded = read_recorded(client, prefix)
    if recorded is not None:
        diffs = differences(recorded, current)
        if not diffs:
            if recorded != current:  # a topic id learnt, a topic added: keep the record complete
                record(client, prefix, BrokerIdentity(current.cluster_id or recorded.cluster_id,
                                                      {**recorded.topic_ids, **current.topic_ids}))
            return "matched"
    held = recorded_watermarks(client, prefix, partitions)
    if recorded is not None and held:
        raise BrokerMismatch(
            f"{redis_at} holds ingestion watermarks (prefix {prefix!r}, {held} partitions) recorded against "
            f"another Kafka than {kafka_at}: {'; '.join(diffs)}. The broker was replaced or restarted empty, "
            "or the topic was recreated: its offsets start again, and new events would reuse "
            f"them and be skipped as already applied. Run {fix} (moves the old log, features, registry and runs "
            f"to <data dir>/archive/<time>/ and removes the Redis keys {prefix}*), or point KAFKA_BOOTSTRAP_SERVERS "
            "back at the broker these watermarks came from, or use another STREAMREC_DATA_DIR and "
            "STREAMREC_REDIS_PREFIX")
    record(client, prefix, current)
    if recorded is not None:
        log.info("no watermarks under %s for these topics: the broker identity is now %s", prefix, current.describe())
        return "replaced"
    if held:
        log.warning(
            "Redis (prefix %r) holds watermarks of %d partitions but no broker identity (data from before "
            "identities were recorded, or a store rebuilt by `streamrec rebuild-online`): recording %s as their "
            "broker. If they came from another broker (one restarted or a topic recreated since), stop ingest and "
            "run %s", prefix, held, current.describe(), fix)
        return "adopted"
    return "recorded"


def guard_broker_identity(settings: Any, client: Any = None, fix: str = INGEST_FIX) -> str:
    """`check_broker_identity` for the configured broker, Redis (`client`, or one of its own) and
    topics (events, items, impressions: the log writer skips offsets it holds on each of them)."""
    from streaming.redis_io import make_redis, shown_url

    current, found = fetch_broker_identity(settings, [settings.events_topic, settings.items_topic,
                                                      settings.impressions_topic])
    # watermarks of partitions the topic no longer has count too (a topic recreated smaller)
    partitions = {t: max(n, settings.topic_partitions) for t, n in found.items()}
    own = client is None
    client = make_redis(settings) if own else client
    try:
        return check_broker_identity(client, settings.redis_prefix, current, partitions,
                                     redis_at=f"Redis at {shown_url(settings)}",
                                     kafka_at=f"the broker at {settings.kafka_bootstrap_servers}", fix=fix)
    finally:
        if own:
            client.close()


__all__ = [
    "INGEST_FIX", "UP_FIX", "BrokerIdentity", "BrokerMismatch", "broker_key", "check_broker_identity",
    "clean_topic_id", "differences", "fetch_broker_identity", "guard_broker_identity", "read_recorded", "record",
    "recorded_watermarks",
]
