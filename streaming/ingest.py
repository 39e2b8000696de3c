"""`streamrec ingest`: Kafka `events` + `items` -> Redis (online) + Parquet log (offline); `impressions` -> log.

    streamrec ingest                    # runs until Ctrl-C / SIGTERM (commits what it ingested)
    streamrec ingest --until-idle 5     # drains what is there, then exits

Several `streamrec ingest` processes with the same `STREAMREC_CONSUMER_GROUP` split the
partitions between them. The guarantee is the *effect* of exactly once: every good record
is counted once in Redis and written once to the log, across crashes, restarts and
rebalances, because

* Redis writes are idempotent: one transaction per partition batch, guarded by a per-partition
  offset watermark (`streaming.online_store`);
* log files are named by their offset range and the writer skips offsets the log already holds
  (`streaming.offline_log`);
* offsets are committed only after both outputs are durable (`Ingestor.commit_durable`);
* a Redis that lost its last second (restarted from an `appendfsync everysec` AOF after a crash)
  holds watermarks below offsets Kafka already committed: at assignment each partition is sought
  back to its Redis watermark + 1 (`Ingestor.rewind_lost`), and the replay is skipped where it is
  already written (the log) and applied where Redis lost it;
* when Redis stops answering mid-stream, ingest waits it out (`Ingestor.ride_out_redis_outage`,
  `streaming.redis_outage`): partitions paused, nothing committed, one WARNING; when it answers
  again, every partition is re-read from the first offset Redis or the log may lack
  (`Ingestor.resync_after_outage`), so the outage loses and double counts nothing.

The `impressions` topic (what the API showed, `streaming.events.Impression`) is validated and logged
only: it has no online state (`streaming.ingest_topics`: each topic's decoder, schema and row builder).

`streamrec ingest` also serves its metrics and health (`streaming.ingest_metrics`) and refuses a
broker other than the one its watermarks came from (`streaming.broker_identity`).

Bad records go to the DLQ topic with the reason and source topic/partition/offset in headers
(`streaming.dlq.ErrorHandler`); the DLQ is at-least-once (a replay after a crash may repeat an
entry: deduplicate on the source headers).

Memory does not grow with the events read: log rows wait per partition for
STREAMREC_LOG_FLUSH_RECORDS / _INTERVAL_S and in all for `MAX_BUFFERED_LOG_ROWS`, Redis batches in
flight are `MAX_PENDING_REDIS_BATCHES`, the pseudonym memo is capped (`streaming.pseudonym`), and
dedup is by offset watermarks (Redis) and file names (the log), never a set of seen ids.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import redis
from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from streaming import kafka_io
from streaming.dlq import ErrorHandler
from streaming.events import BadRecord, Impression, Item, Tombstone, parse_impression, parse_item
from streaming.forget import ForgetFollower, purge_user_logs, record_durable
from streaming.ingest_metrics import LAG_REFRESH_S, IngestMetrics
from streaming.ingest_topics import (EVENTS, IMPRESSIONS, ITEMS, parse_event_fields, rows_to_table, topic_routes,
                                     user_topics)
from streaming.offline_log import OfflineLog
from streaming.online_store import OnlineStore
from streaming.pseudonym import Pseudonymizer, forget_marker
from streaming.redis_io import REDIS_DOWN_ERRORS, make_redis, shown_url
from streaming.redis_outage import BACKOFF_MAX_S, RedisOutage, backoff_delays, outage_metrics
from streaming.settings import Settings

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0
# Redis batches handed to the writer thread and not yet acknowledged; past this, `process` waits.
MAX_PENDING_REDIS_BATCHES = 8
# Log rows buffered over all held partitions: past this, every partition holding rows is written out
# and committed in the same round, whatever its own flush threshold. Each partition already flushes at
# STREAMREC_LOG_FLUSH_RECORDS rows or STREAMREC_LOG_FLUSH_INTERVAL_S seconds; this bounds the total when
# one process holds many partitions (~0.4 KB a row: ~80 MB; 4 partitions x the default 50,000 rows).
MAX_BUFFERED_LOG_ROWS = 200_000
# Cyclic-GC thresholds while ingesting. The log buffers hold hundreds of thousands of tuples
# between flushes, and with CPython's defaults (700, 10, 10) the frequent collections keep
# re-traversing them: measured here, that halved the ingest rate. Nothing the loop allocates
# forms reference cycles, so collecting rarely is safe.
GC_THRESHOLDS = (50_000, 20, 100)
# GIL switch interval while ingesting: the Redis writer and kafka-python's IO thread mostly
# wait on sockets; with the default 5 ms the batch loop was handed off mid-batch far more
# often than they had work (measured: ~+20% rate at 20 ms, freshness unchanged).
GIL_SWITCH_INTERVAL_S = 0.02
CLOSE_TIMEOUT_S = 10.0
# Redis calls of ingest's own client give up after this long (a cut network must end in an error
# that starts the outage wait, not a hang); a batch script takes milliseconds.
REDIS_SOCKET_TIMEOUT_S = 30.0


@dataclass
class IngestStats:
    """Running totals of one ingest process (also what `run` returns)."""

    consumed: int = 0
    events: int = 0
    items: int = 0
    impressions: int = 0
    bad: int = 0
    skipped_replays: int = 0
    forgotten: int = 0  # events and impressions refused: their user asked to be forgotten
    log_files: int = 0
    commits: int = 0
    bad_by_reason: Counter = field(default_factory=Counter)


@dataclass
class PartitionState:
    """What this process holds for one assigned partition between commits."""

    logged_upto: int  # last offset already in the log (read from the log itself at assignment)
    next_offset: int | None = None  # offset after the last record processed
    rows: list[tuple] = field(default_factory=list)  # good records waiting for the next log file
    pending_since: float | None = None  # monotonic time of the oldest uncommitted record


@dataclass
class _RunClock:
    """`Ingestor.run`'s times (monotonic seconds) between rounds."""

    last_record: float
    last_status: float
    last_partitions: float
    assigned_once: bool = False

    @classmethod
    def starting(cls, now: float) -> "_RunClock":
        return cls(now, now, now)


class _Rebalance(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls rebalance hooks on its IO thread, where a blocking consumer call
    (commit) would deadlock; so the hooks only do local work and never commit."""

    def __init__(self, ingestor: "Ingestor"):
        self.ingestor = ingestor

    async def on_partitions_revoked(self, revoked):
        self.ingestor.release(revoked)

    async def on_partitions_assigned(self, assigned):
        self.ingestor.adopt(assigned)


class Ingestor:
    """One ingestion consumer. `run()` polls until stopped; `process()` handles one poll."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: redis.Redis | None = None,
        on_commit: Callable[["Ingestor"], None] | None = None,
        stop_event: threading.Event | None = None,
        metrics: IngestMetrics | None = None,
    ):
        self.settings = settings
        self.stats = IngestStats()
        self.metrics = metrics or IngestMetrics()
        outage_metrics(self.metrics.registry)  # streamrec_ingest_redis_up = 1 from the start
        self.redis = redis_client or make_redis(settings, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
        self.store = OnlineStore(self.redis, settings.redis_prefix, settings.recent_items_max, settings.user_ttl_s)
        self.log = OfflineLog(settings.log_dir)
        self.producer = kafka_io.make_producer(settings)
        self.handle_error = ErrorHandler(self.producer, settings, self.stats)
        # User ids become pseudonyms before anything is stored or logged (streaming.pseudonym), and
        # every tombstone of the forget topic is known before the first event (streaming.forget).
        self.pseudonymize = Pseudonymizer.from_settings(settings)
        self.forget = ForgetFollower(settings, self.pseudonymize, self.log)
        self.consumer = kafka_io.make_consumer(settings)
        self.routes = topic_routes(settings)  # topic -> decoder, log schema, row builder (streaming.ingest_topics)
        self.consumer.subscribe(list(self.routes), listener=_Rebalance(self))
        self.partitions: dict[TopicPartition, PartitionState] = {}
        self.unchecked: set[TopicPartition] = set()  # assigned, not yet compared with Redis (rewind_lost)
        self.failed: Exception | None = None  # why `run` stopped early (then nothing more is written)
        self.redis_down = False  # in an outage: nothing is applied, persisted or committed (ride_out_redis_outage)
        self.on_commit = on_commit
        # One writer thread applies Redis batches in submission order (per-partition order is what
        # the watermark needs) while the main thread polls and validates the next batch.
        self._redis_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-writer")
        self._pending: deque[Future] = deque()
        self._stop = stop_event or threading.Event()
        self._event_types = frozenset(settings.event_types)
        self.apply_tombstones(self.forget.catch_up())

    # --- rebalance (called inside poll) ---------------------------------------------------
    def release(self, revoked) -> None:
        """Partitions go to another member: make what we hold durable (DLQ, log file) without
        committing. The next owner replays from the last commit and skips what is written."""
        mine = [tp for tp in revoked if tp in self.partitions]
        if mine and self.failed is None and not self.redis_down:
            try:
                self._persist([tp for tp in mine if self.partitions[tp].pending_since is not None])
            except REDIS_DOWN_ERRORS as exc:  # the main loop meets the outage too; the next owner replays
                log.debug("revoked partitions not persisted, Redis is down: %s", exc)
        for tp in mine:
            self.partitions.pop(tp, None)
        self.unchecked.difference_update(revoked)

    def adopt(self, assigned) -> None:
        for tp in assigned:
            # The log itself says what is already written: a previous owner may have written a file
            # and crashed (or lost the partition) before committing. Those records are skipped.
            self.partitions[tp] = PartitionState(logged_upto=self.log.logged_upto(tp.topic, tp.partition))
        # Compared with Redis on the main thread, before any of their records is processed (a
        # blocking consumer call here, on kafka-python's IO thread, would deadlock).
        self.unchecked.update(assigned)
        if assigned:
            log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    def rewind_lost(self, polled: dict[TopicPartition, list]) -> int:
        """For each newly assigned partition: when the Redis watermark + 1 is below the committed
        offset, Redis lost records Kafka had committed (a crash with `appendfsync everysec` loses up
        to a second): seek back to the watermark + 1 and drop what this poll returned for it. Safe
        because both writers skip what they hold. Returns the number of partitions sought back."""
        rewound = 0
        checks = sorted(self.unchecked)
        self.unchecked.difference_update(checks)
        for tp in checks:
            if tp not in self.partitions:
                continue
            committed = self.consumer.committed(tp)
            watermark = self.store.watermark(tp.topic, tp.partition)
            if committed is None or watermark + 1 >= committed:
                continue
            self.consumer.seek(tp, watermark + 1)
            polled.pop(tp, None)
            self.metrics.rewound(tp)
            rewound += 1
            log.warning(
                "%s[%d]: Redis holds offsets up to %d but %d is committed: Redis lost %d offsets (a restart "
                "from its append-only file loses up to a second); re-reading from %d (what Redis and the log "
                "already hold is skipped)", tp.topic, tp.partition, watermark, committed,
                committed - watermark - 1, watermark + 1)
        return rewound

    # --- the work ---------------------------------------------------------------------------
    def process(self, polled: dict[TopicPartition, list]) -> None:
        """Validate one poll's records, route bad ones to the DLQ, apply good ones to Redis and
        buffer them for the log. Nothing is committed here (see `commit_durable`)."""
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        for tp, records in polled.items():
            state = self.partitions.get(tp)
            if state is None:  # revoked while we were polling; the new owner will read these
                continue
            route = self.routes[tp.topic]
            kind = route.kind
            self.stats.consumed += len(records)
            self.metrics.consumed(tp, len(records))
            if not records:
                continue
            if kind is EVENTS:
                good = self._events(tp, state, records, route.to_row, now_ms)
                self.stats.events += len(good)
            else:
                good = self._catalog_or_impressions(tp, state, kind, records, now_ms)
                if kind is ITEMS:
                    self.stats.items += len(good)
                else:
                    self.stats.impressions += len(good)
            state.next_offset = records[-1].offset + 1
            if state.pending_since is None:
                state.pending_since = now
        self.metrics.sync_dlq(self.stats.bad, self.stats.bad_by_reason)

    def _events(self, tp: TopicPartition, state: PartitionState, records: list, to_row: Callable, now_ms: int) -> list:
        """`process` for one partition batch of the events topic: the hot loop, kept to what each
        record needs. An event is decoded into a plain field dict (`parse_event_fields`: the same
        decisions as `parse_event`, without building the model), its user id pseudonymized in place
        (the raw id goes no further than this loop), applied to Redis (on the writer thread) and,
        unless the log already holds its offset, buffered as a log row."""
        parse, event_types, max_bytes = parse_event_fields, self._event_types, self.settings.max_payload_bytes
        pseudonymize, handle_error = self.pseudonymize, self.handle_error
        refuses = self.forget.refuses if self.forget.known else None
        partition, upto, rows = tp.partition, state.logged_upto, state.rows
        good: list[tuple[int, dict]] = []
        forgotten = skipped = 0
        for rec in records:
            fields = parse(rec.value, event_types, max_bytes)
            if fields.__class__ is BadRecord:
                handle_error(rec, fields)
                continue
            if refuses is not None and refuses(fields["user_id"], fields["ts"]):
                forgotten += 1  # not applied, not logged; its offset still counts as done
                continue
            fields["user_id"] = pseudonymize(fields["user_id"])
            offset = rec.offset
            good.append((offset, fields))
            if offset > upto:
                rows.append(to_row(fields, partition, offset, now_ms))
            else:
                skipped += 1
        if forgotten:
            self.stats.forgotten += forgotten
            self.metrics.forgotten.inc(forgotten)
        self.stats.skipped_replays += skipped
        # upto: trailing bad records advance the watermark too (see streaming.online_store)
        self._submit_redis(self.store.apply_events, tp.topic, partition, good, records[-1].offset)
        return good

    def _catalog_or_impressions(self, tp: TopicPartition, state: PartitionState, kind: str, records: list,
                                now_ms: int) -> list:
        """`process` for one partition batch of the items or impressions topic (pydantic models)."""
        max_bytes = self.settings.max_payload_bytes
        good: list[tuple[int, Item | Impression]] = []
        forgotten = 0
        for rec in records:
            parsed = parse_item(rec.value, max_bytes) if kind is ITEMS else parse_impression(rec.value, max_bytes)
            if parsed.__class__ is BadRecord:
                self.handle_error(rec, parsed)
            elif kind is IMPRESSIONS and self.forget.known and self.forget.refuses_pseudonym(parsed.user_id, parsed.ts):
                forgotten += 1  # the API wrote the pseudonym already
            else:
                good.append((rec.offset, parsed))
        if forgotten:
            self.stats.forgotten += forgotten
            self.metrics.forgotten.inc(forgotten)
        # impressions have no online state, only the watermark (streaming.ingest_topics says why)
        apply = self.store.apply_items if kind is ITEMS else self.store.apply_events
        self._submit_redis(apply, tp.topic, tp.partition, good if kind is ITEMS else [], records[-1].offset)
        to_row, upto, rows = self.routes[tp.topic].to_row, state.logged_upto, state.rows
        for offset, rec in good:
            if offset > upto:
                rows.append(to_row(rec, tp.partition, offset, now_ms))
            else:
                self.stats.skipped_replays += 1
        return good

    def apply_tombstones(self, new: list[Tombstone]) -> None:
        """Honour forget tombstones (streaming.forget has the whole story). The order:

        a. the users' events are refused from now on (`process` checks the known tombstones);
        b. the Redis writer drains, then the users' online state is deleted;
        c. their rows (events and impressions) leave the buffered log rows and every log file (rewritten atomically);
        d. each tombstone is recorded durably (log/forget/<id>.json).
        Idempotent: a failure midway (Redis down) leaves them pending and the next call redoes them."""
        pending = self.forget.pending
        pending.extend(t for t in new if all(t.tombstone_id != p.tombstone_id for p in pending))
        if not pending:
            return
        for t in pending:
            self.forget.known.add(t.tombstone_id, forget_marker(t.pseudonym), t.ts)
        self._wait_redis()
        self.store.forget_users([t.pseudonym for t in pending])
        buffered = sum(self.forget.drop_buffered([st.rows for tp, st in self.partitions.items() if tp.topic == topic],
                                                 self.routes[topic].schema) for topic in user_topics(self.settings))
        purged = purge_user_logs(self.log, self.settings, self.forget.known)
        for t in pending:
            record_durable(self.log, t)
        self.metrics.tombstones.inc(len(pending))
        log.info("forget: applied %d tombstones: online state deleted, %d buffered and %d logged rows erased "
                 "(%d log files rewritten)", len(pending), buffered, purged.rows_removed, purged.files_rewritten)
        pending.clear()

    def _submit_redis(self, apply, topic: str, partition: int, records: list, upto: int | None) -> None:
        if upto is None:
            return
        while len(self._pending) >= MAX_PENDING_REDIS_BATCHES:
            self._pending.popleft().result()
        self._pending.append(self._redis_writer.submit(self._apply_timed, apply, topic, partition, records, upto))

    def _apply_timed(self, apply, topic: str, partition: int, records: list, upto: int) -> int:
        started = time.perf_counter()
        applied = apply(topic, partition, records, upto)
        self.metrics.redis_apply.observe(time.perf_counter() - started)
        return applied

    def _wait_redis(self) -> None:
        """Block until every submitted Redis batch is applied; re-raise the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def _due(self, state: PartitionState, now: float) -> bool:
        if state.pending_since is None:
            return False
        return (
            len(state.rows) >= self.settings.log_flush_records
            or now - state.pending_since >= self.settings.log_flush_interval_s
        )

    def commit_durable(self, partitions: list[TopicPartition] | None = None, *, force: bool = False) -> int:
        """Make the processed records durable, then commit their offsets. The order is the guarantee:
        every output durable (1-3), then the commit (4).

        1. Offline log: each due partition's buffered rows become one Parquet file (fsync, then an
           atomic rename), named by its offset range. Written first, while the writer thread is still
           applying Redis batches: the two overlap instead of taking turns (Redis sat idle during
           every log write before). A failure (`LogDiskFull`) raises here, before anything is committed.
        2. Redis: wait until the writer thread has applied every batch `process` handed it (one
           watermark-guarded atomic script per partition batch: idempotent, so writing before the
           commit is safe). A Redis failure raises here, before anything is committed.
        3. DLQ: `producer.flush()` -- every bad record's DLQ copy is acknowledged by the broker.
        4. Commit: only now the offset after the last processed record of those partitions.

        The outputs are independent of each other (each skips what it holds), so their order among
        1-3 is free; only the commit must come last. A crash before step 4 replays from the last
        commit: the log writer skips offsets at or below the log's last offset, Redis skips offsets
        at or below its watermark, the DLQ may repeat an entry. Returns the number of partitions
        committed.
        """
        now = time.monotonic()
        targets = partitions if partitions is not None else list(self.partitions)
        # Too many rows buffered in all (MAX_BUFFERED_LOG_ROWS): everything pending goes now.
        force = force or sum(len(st.rows) for st in self.partitions.values()) >= MAX_BUFFERED_LOG_ROWS
        due = [
            tp
            for tp in targets
            if tp in self.partitions and (self._due(self.partitions[tp], now) or (force and self.partitions[tp].pending_since is not None))
        ]
        if not due:
            return 0
        self._persist(due)
        offsets = {tp: OffsetAndMetadata(self.partitions[tp].next_offset, "", -1) for tp in due}
        started = time.perf_counter()
        try:
            self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The group moved on (rebalance). Outputs are durable and idempotent; the next owner
            # replays from the last successful commit and skips what is already written.
            log.warning("commit of %d partitions failed (%s); the next owner will skip the replay", len(offsets), exc)
            return 0
        self.metrics.committed(time.perf_counter() - started)
        for tp in due:
            self.partitions[tp].pending_since = None
        self.stats.commits += 1
        if self.on_commit is not None:
            self.on_commit(self)
        return len(due)

    def _persist(self, partitions: list[TopicPartition]) -> None:
        """Steps 1-3 of `commit_durable`: buffered rows as log files (while Redis batches are still being
        applied), Redis applied, DLQ acknowledged."""
        for tp in partitions:
            state = self.partitions[tp]
            if state.rows:
                started = time.perf_counter()
                written = self.log.write(tp.topic, tp.partition,
                                         rows_to_table(state.rows, self.routes[tp.topic].schema))
                self.metrics.log_write.observe(time.perf_counter() - started)
                state.logged_upto = written.end
                state.rows = []
                self.stats.log_files += 1
        self._wait_redis()
        self.producer.flush()

    # --- lifecycle --------------------------------------------------------------------------
    def stop(self, *_args) -> None:
        self._stop.set()

    def run(
        self,
        *,
        max_records: int | None = None,
        until_idle_s: float | None = None,
        progress: Callable[[IngestStats], None] | None = None,
    ) -> IngestStats:
        """Poll, process and commit until `stop()`, `max_records` consumed, or `until_idle_s`
        seconds without a record (after the first assignment); then commit everything and close.
        Redis going away mid-run is waited out (`ride_out_redis_outage`), not an exit."""
        clock = _RunClock.starting(time.monotonic())
        saved_gc, saved_switch = gc.get_threshold(), sys.getswitchinterval()
        gc.set_threshold(*GC_THRESHOLDS)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            while not self._stop.is_set():
                try:
                    if self._step(clock, max_records, until_idle_s, progress):
                        break
                except REDIS_DOWN_ERRORS as exc:
                    if not self.ride_out_redis_outage(exc):
                        return self.stats  # stopped while Redis was down: nothing durable to commit
            self.commit_durable(force=True)
        except Exception as exc:
            # Leaving the group revokes the partitions (`release`), which would try Redis again:
            # nothing more is written; the next owner replays from the last commit.
            self.failed = exc
            self.metrics.stopped = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            gc.set_threshold(*saved_gc)
            sys.setswitchinterval(saved_switch)
            self.close()
        return self.stats

    def _step(self, clock: "_RunClock", max_records: int | None, until_idle_s: float | None,
              progress: Callable[[IngestStats], None] | None) -> bool:
        """One poll -> process -> commit round of `run`; True when `run` should end."""
        polled = self.consumer.poll(timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_poll_records)
        now = self.metrics.last_poll = time.monotonic()  # the liveness of /healthz
        if self.unchecked:
            self.rewind_lost(polled)
        if self.forget.due():
            self.apply_tombstones(self.forget.poll_new())
        if polled:
            self.process(polled)
            clock.last_record = now
        if self.partitions and not clock.assigned_once:
            clock.assigned_once, clock.last_record = True, now
        self.commit_durable()
        if progress is not None:
            progress(self.stats)
        if now - clock.last_partitions >= LAG_REFRESH_S:
            clock.last_partitions = now
            self.metrics.refresh_partitions(self.consumer, {tp: st.next_offset for tp, st in self.partitions.items()})
        if now - clock.last_status >= STATUS_EVERY_S:
            clock.last_status = now
            log.info("consumed=%d events=%d items=%d impressions=%d bad=%d files=%d commits=%d", self.stats.consumed,
                     self.stats.events, self.stats.items, self.stats.impressions, self.stats.bad, self.stats.log_files,
                     self.stats.commits)
        if max_records is not None and self.stats.consumed >= max_records:
            return True
        return until_idle_s is not None and clock.assigned_once and now - clock.last_record >= until_idle_s

    # --- a Redis outage -------------------------------------------------------------------------
    def ride_out_redis_outage(self, exc: BaseException) -> bool:
        """Redis stopped answering: wait with back-off until it answers, then resync and return True;
        False when stopped meanwhile. One WARNING when the outage starts, one INFO when it ends
        (`streaming.redis_outage`). Meanwhile the partitions are paused but the consumer keeps
        polling (so it stays in the group, under max.poll.interval.ms), and nothing is committed:
        the committed offsets never pass what Redis holds."""
        self.redis_down = True
        # A poll at least every half max.poll.interval.ms keeps the group membership.
        cap_s = min(BACKOFF_MAX_S, self.settings.max_poll_interval_ms / 2000)
        outage = RedisOutage(log, f"REDIS_URL={shown_url(self.settings)}", exc, cap_s,
                             outage_metrics(self.metrics.registry))
        for pending in self._pending:  # let the writer thread finish (or fail) what it was given
            pending.exception()
        self._pending.clear()
        for delay in backoff_delays(cap_s=cap_s):
            self._idle_poll(delay)
            if self._stop.is_set():
                log.info("stopped while Redis was down (%.1f s): nothing more committed; the next start "
                         "re-reads from the last commit", outage.end(None))
                return False
            try:
                self.redis.ping()
                behind = self.resync_after_outage()
            except REDIS_DOWN_ERRORS as again:
                outage.retry_failed(again)
                continue
            break
        self.redis_down = False
        self.consumer.resume(*self.consumer.assignment())
        lost = (f"it came back without the last offsets of {behind} partitions (a restart from its append-only "
                "file); those are re-applied" if behind else "nothing was lost")
        outage.end(f"{lost}; re-reading {len(self.partitions)} partitions from the last offset Redis and the log "
                   "hold (what they hold is skipped)")
        return True

    def _idle_poll(self, timeout_s: float) -> None:
        """Wait `timeout_s` inside poll with every partition paused (a heartbeat, not a read). A partition
        assigned during the poll is not paused yet: what it returned is put back (sought to its first record)."""
        self.consumer.pause(*self.consumer.assignment())
        polled = self.consumer.poll(timeout_ms=max(1, int(timeout_s * 1000)))
        self.metrics.last_poll = time.monotonic()
        for tp, records in polled.items():
            if records:
                self.consumer.seek(tp, records[0].offset)
        self.consumer.pause(*self.consumer.assignment())

    def resync_after_outage(self) -> int:
        """After an outage, seek every held partition back to the first offset Redis or the log may lack:
        the Redis watermark + 1 (a restarted Redis may hold less than before, even less than Kafka's
        commit), or the committed offset (the records processed since were dropped with their failed
        batches and unwritten log rows; without a commit: the log's last offset + 1). Both writers skip
        what they hold, so nothing is lost or counted twice. Returns the partitions whose Redis came
        back behind the committed offset (counted in `streamrec_ingest_redis_rewinds_total`)."""
        # Everything read first: Redis failing again midway leaves nothing half done (the caller retries).
        marks = {tp: (self.store.watermark(tp.topic, tp.partition), self.consumer.committed(tp))
                 for tp in self.partitions}
        behind = 0
        for tp, (watermark, committed) in marks.items():
            state = self.partitions[tp]
            target = min(watermark + 1, state.logged_upto + 1 if committed is None else committed)
            if committed is not None and watermark + 1 < committed:
                self.metrics.rewound(tp)
                behind += 1
            state.rows, state.next_offset, state.pending_since = [], None, None
            self.consumer.seek(tp, target)
        self.unchecked.clear()  # every held partition was just compared with Redis (what rewind_lost does)
        return behind

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
            self.forget.close()
        finally:
            self._redis_writer.shutdown(wait=True)
            self.producer.close(timeout=CLOSE_TIMEOUT_S)
