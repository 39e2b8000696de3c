"""The right to be forgotten: tombstones, and how ingest and the feature job honour them.

    streamrec forget alice          # publishes a tombstone for alice's pseudonym to the `forget` topic

End to end:

1. `streamrec forget USER_ID` hashes the id (streaming.pseudonym) and publishes a `Tombstone`
   (the contract: streaming/events.py) to `STREAMREC_FORGET_TOPIC`, keyed by the pseudonym.
2. Every `streamrec ingest` process reads *all* partitions of that topic (no consumer group: every
   process and region must see every tombstone) through `ForgetFollower`, and for new tombstones,
   in this order (`Ingestor.apply_tombstones`):
   a. from now on refuses every event of the user with `ts` at or before the tombstone's (the
      check runs on the event's pseudonym at each key generation, so a replay of old events --
      even after a key rotation -- cannot bring the user back; later events, a returning user's,
      are taken); impressions (which carry the pseudonym the API computed) likewise;
   b. waits for its Redis writer, then deletes the user's online state (`OnlineStore.forget_users`);
   c. drops the user's rows from its buffered log rows and rewrites every log file that holds
      some, of the events and the impressions topics alike (`purge_user_logs`, `purge_log`: each
      file atomically, same name, same offset range; chosen over a deletion vector so that no
      reader can forget to apply it and the rows are really gone);
   d. records the tombstone durably as `log/forget/<tombstone_id>.json`: its id, time, key
      generation and a one-way marker of the pseudonym (never the pseudonym or the raw id),
      so the tombstones outlive the topic (the embedded broker keeps topics in memory only).
   Every step is idempotent; a process that dies midway redoes them from the topic at restart.
3. The feature job sees tombstones its live version has not honoured, purges the log once more
   (against a writer that had not seen the tombstone yet) and rebuilds every table from the log:
   the user's events leave the sequences, popularity and co-visitation alike. Its manifest lists the
   honoured tombstone ids (`forgotten`).
4. The continuous trainer retrains the scene from scratch (no warm start from an adapter that saw
   the user) within `STREAMREC_FORGET_RETRAIN_S`, and publishes it even when the gate would prefer
   the old adapter; the adapter's manifest lists the tombstones it honours (training/forget_retrain.py).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from streaming.events import EVENT_LOG_SCHEMA, Tombstone
from streaming.ingest_topics import user_topics
from streaming.offline_log import PARQUET_COMPRESSION, OfflineLog
from streaming.pseudonym import CACHE_MAX_ENTRIES, Pseudonymizer, forget_marker
from streaming.versioned_store import atomic_write

logger = logging.getLogger(__name__)

FORGET_DIR = "forget"  # under the log root: one JSON file per honoured tombstone
FORGET_POLL_INTERVAL_S = 1.0  # how often ingest looks for new tombstones (a poll costs a round trip)
CATCH_UP_TIMEOUT_S = 15.0  # at start, how long ingest reads the topic's backlog before its first event
CATCH_UP_POLL_MS = 200
PUBLISH_TIMEOUT_S = 30.0
USER_COLUMN = EVENT_LOG_SCHEMA.get_field_index("user_id")
TS_COLUMN = EVENT_LOG_SCHEMA.get_field_index("ts")


def new_tombstone(pseudonymizer: Pseudonymizer, user_id: str, now_ms: int | None = None) -> Tombstone:
    return Tombstone(tombstone_id=secrets.token_hex(16), pseudonym=pseudonymizer(user_id),
                     generation=pseudonymizer.generation, ts=int(time.time() * 1000) if now_ms is None else now_ms)


def publish_tombstone(settings: Any, tombstone: Tombstone) -> None:
    """Send one tombstone and wait until the broker has it (acks=all)."""
    from streaming import kafka_io

    kafka_io.ensure_topics(settings, [settings.forget_topic])  # the only topic `forget` may write
    producer = kafka_io.make_producer(settings)
    try:
        producer.send(settings.forget_topic, key=tombstone.pseudonym.encode(),
                      value=tombstone.model_dump_json().encode()).get(timeout=PUBLISH_TIMEOUT_S)
        producer.flush(PUBLISH_TIMEOUT_S)
    finally:
        producer.close()


# --- what is forgotten ----------------------------------------------------------------------
@dataclass
class TombstoneSet:
    """The tombstones a process knows: marker -> the latest forget time (ms) for that marker."""

    markers: dict[str, int] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    requested_at: dict[str, int] = field(default_factory=dict)  # tombstone id -> its ts (ms)
    _memo: dict[str, int | None] = field(default_factory=dict, repr=False)  # raw id -> limit

    def add(self, tombstone_id: str, marker: str, ts: int) -> bool:
        """Add one; False when it was known already."""
        if tombstone_id in self.ids:
            return False
        self.ids.add(tombstone_id)
        self.requested_at[tombstone_id] = ts
        self.markers[marker] = max(ts, self.markers.get(marker, ts))
        self._memo.clear()
        return True

    def __bool__(self) -> bool:
        return bool(self.markers)

    def limit_of(self, pseudonyms: Iterable[str]) -> int | None:
        """The latest forget time among these pseudonyms of one user (any generation), or None."""
        found = [self.markers[m] for m in map(forget_marker, pseudonyms) if m in self.markers]
        return max(found) if found else None

    def refuses(self, raw_user_id: str, ts: int, pseudonymizer: Pseudonymizer) -> bool:
        """Is this raw event (user, ts) forgotten? Memoized per raw id (ingest's hot loop)."""
        limit = self._memo.get(raw_user_id, -1)
        if limit == -1:
            limit = self.limit_of(pseudonymizer.chain(raw_user_id))
            if len(self._memo) >= CACHE_MAX_ENTRIES:
                self._memo.clear()
            self._memo[raw_user_id] = limit
        return limit is not None and ts <= limit

    def row_filter(self, users: pa.Array | pa.ChunkedArray, ts: pa.Array | pa.ChunkedArray) -> pa.Array | None:
        """For log rows (pseudonyms of the current generation): a keep-mask, or None when all stay."""
        unique = pc.unique(users).to_pylist()  # impressions of anonymous requests have no user (null)
        limits = {u: self.markers[m] for u in unique if u is not None and (m := forget_marker(u)) in self.markers}
        if not limits:
            return None
        hit = pc.is_in(users, value_set=pa.array(list(limits), pa.string()))
        limit_per_row = pc.if_else(hit, pc.index_in(users, value_set=pa.array(list(limits), pa.string())), None)
        bounds = pa.array(list(limits.values()), pa.int64()).take(pc.fill_null(limit_per_row, 0))
        drop = pc.and_(hit, pc.less_equal(ts, bounds))
        return pc.invert(pc.fill_null(drop, False))


def forget_dir(log: OfflineLog) -> str:
    return f"{log.root}/{FORGET_DIR}"


def read_durable(log: OfflineLog) -> TombstoneSet:
    """The tombstones recorded under `log/forget/`."""
    out = TombstoneSet()
    selector = pafs.FileSelector(forget_dir(log), recursive=False, allow_not_found=True)
    for info in log.fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json") or info.base_name.startswith("."):
            continue
        with log.fs.open_input_stream(info.path) as fh:
            rec = json.loads(fh.read())
        out.add(rec["tombstone_id"], rec["marker"], int(rec["ts"]))
    return out


def record_durable(log: OfflineLog, tombstone: Tombstone) -> None:
    """`log/forget/<id>.json`: id, time, generation and the marker -- not the pseudonym."""
    body = json.dumps({"tombstone_id": tombstone.tombstone_id, "marker": forget_marker(tombstone.pseudonym),
                       "generation": tombstone.generation, "ts": tombstone.ts}).encode()
    path = f"{forget_dir(log)}/{tombstone.tombstone_id}.json"
    log.fs.create_dir(forget_dir(log), recursive=True)
    if isinstance(log.fs, pafs.LocalFileSystem):
        atomic_write(path, lambda fh: fh.write(body))
    else:
        with log.fs.open_output_stream(path) as fh:
            fh.write(body)


@dataclass(frozen=True)
class PurgeResult:
    files_rewritten: int
    rows_removed: int


def purge_log(log: OfflineLog, topic: str, tombstones: TombstoneSet) -> PurgeResult:
    """Rewrite every log file of `topic` holding rows of forgotten users without them: each file
    atomically under its own name (its offset range still says what it covered; the rows left
    may be none). Idempotent; safe beside a writer adding new files."""
    if not tombstones:
        return PurgeResult(0, 0)
    files = rows = 0
    for f in log.list_files(topic):
        users = pq.read_table(f.path, filesystem=log.fs, columns=["user_id", "ts"])
        keep = tombstones.row_filter(users["user_id"], users["ts"])
        if keep is None or pc.all(keep).as_py():
            continue
        table = pq.read_table(f.path, filesystem=log.fs)
        kept = table.filter(keep)
        if isinstance(log.fs, pafs.LocalFileSystem):
            atomic_write(f.path, lambda fh, t=kept: pq.write_table(t, fh, compression=PARQUET_COMPRESSION))
        else:
            pq.write_table(kept, f.path, filesystem=log.fs, compression=PARQUET_COMPRESSION)
        files += 1
        rows += table.num_rows - kept.num_rows
    if files:
        logger.info("forget: rewrote %d log files of %r without %d rows of forgotten users", files, topic, rows)
    return PurgeResult(files, rows)


def purge_user_logs(log: OfflineLog, settings: Any, tombstones: TombstoneSet) -> PurgeResult:
    """`purge_log` on every logged topic whose rows name a user: events and impressions (both `user_id`)."""
    files = rows = 0
    for topic in user_topics(settings):
        result = purge_log(log, topic, tombstones)
        files, rows = files + result.files_rewritten, rows + result.rows_removed
    return PurgeResult(files, rows)


# --- ingest's side --------------------------------------------------------------------------
class ForgetFollower:
    """Reads every partition of the forget topic (no group), knows the tombstones, filters events."""

    def __init__(self, settings: Any, pseudonymizer: Pseudonymizer, log_: OfflineLog):
        from streaming import kafka_io

        self.settings, self.pseudonymize, self.log = settings, pseudonymizer, log_
        self.known = read_durable(log_)
        self.consumer = kafka_io.make_consumer(settings, group_id=None, enable_auto_commit=False)
        self.partitions: list[Any] = []
        self._assign()
        self.next_poll = 0.0
        self.bad = 0
        self.pending: list[Tombstone] = []  # read, not yet applied (Ingestor.apply_tombstones)

    def _assign(self) -> None:
        from kafka import TopicPartition

        parts = self.consumer.partitions_for_topic(self.settings.forget_topic) or set()
        if parts:
            self.partitions = [TopicPartition(self.settings.forget_topic, p) for p in sorted(parts)]
            self.consumer.assign(self.partitions)
            self.consumer.seek_to_beginning(*self.partitions)

    def poll_new(self, timeout_ms: int = 0) -> list[Tombstone]:
        """Tombstones on the topic this process does not know yet (not yet added to `known`)."""
        out: list[Tombstone] = []
        if not self.partitions:
            return out
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for rec in records:
                try:
                    t = Tombstone.model_validate_json(rec.value or b"")
                except ValidationError as exc:
                    self.bad += 1  # nothing of the payload in the log line: it may name a person
                    logger.warning("forget topic: record at %s[%d]@%d is not a tombstone (%d errors); skipped",
                                rec.topic, rec.partition, rec.offset, exc.error_count())
                    continue
                if t.tombstone_id not in self.known.ids and all(t.tombstone_id != o.tombstone_id for o in out):
                    out.append(t)
        return out

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next_poll:
            return False
        self.next_poll = now + FORGET_POLL_INTERVAL_S
        if not self.partitions:  # the topic did not exist yet at start
            self._assign()
        return bool(self.partitions) or bool(self.pending)

    def catch_up(self) -> list[Tombstone]:
        """At start: every tombstone of the topic's backlog (until a poll comes back empty)."""
        out: list[Tombstone] = []
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            batch = self.poll_new(CATCH_UP_POLL_MS)
            if not batch and self._at_end():
                break
            out.extend(t for t in batch if all(t.tombstone_id != o.tombstone_id for o in out))
        return out

    def _at_end(self) -> bool:
        try:
            ends = self.consumer.end_offsets(self.partitions)
            return all(self.consumer.position(tp) >= ends.get(tp, 0) for tp in self.partitions)
        except Exception:  # noqa: BLE001 (an estimate; the periodic polls read whatever is left)
            return True

    def refuses(self, raw_user_id: str, ts: int) -> bool:
        return bool(self.known) and self.known.refuses(raw_user_id, ts, self.pseudonymize)

    def refuses_pseudonym(self, pseudonym: str | None, ts: int) -> bool:
        """Is this impression (the API's pseudonym of the user, ts) forgotten? As the log purge judges rows."""
        if pseudonym is None or not self.known:
            return False
        limit = self.known.limit_of([pseudonym])
        return limit is not None and ts <= limit

    def drop_buffered(self, row_lists: Iterable[list[tuple]], schema: pa.Schema = EVENT_LOG_SCHEMA) -> int:
        """Remove forgotten users' rows from buffered (not yet logged) log rows of `schema`, in place."""
        user, ts = schema.get_field_index("user_id"), schema.get_field_index("ts")
        dropped = 0
        for rows in row_lists:
            if not rows:
                continue
            keep = [r for r in rows if not self._row_forgotten(r, user, ts)]
            dropped += len(rows) - len(keep)
            rows[:] = keep
        return dropped

    def _row_forgotten(self, row: tuple, user: int = USER_COLUMN, ts: int = TS_COLUMN) -> bool:
        if row[user] is None:
            return False
        limit = self.known.limit_of([row[user]])
        return limit is not None and row[ts] <= limit

    def close(self) -> None:
        self.consumer.close(autocommit=False)


__all__ = ["FORGET_DIR", "ForgetFollower", "PurgeResult", "TombstoneSet", "forget_dir",
           "new_tombstone", "publish_tombstone", "purge_log", "purge_user_logs", "read_durable", "record_durable"]

