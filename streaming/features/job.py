"""One feature run (`run_features`): fold the log files that are new since the last run into the
feature tables and publish them as a new version.

What is exact, and why:

* Input: a file is new when its last offset is above its partition's watermark; rows at or
  below the watermark are dropped too (a file never overlaps another, so that is only a guard).
  Files appear whole, so a listed file is complete.
* Sequences: per touched user, the new events are either a plain append (all sort after the
  user's stored last event, no event id already stored: `streaming.features.merge`) or the stored
  sequence and the new events are re-sorted/deduplicated together -- either way the result is the
  same as sorting the whole log, whatever order files arrive in (late events included). A bucket is
  stored as a base + segments merged on read (`streaming.features.tables`).
* Popularity and co-visitation are updated from exact per-user differences
  (`streaming.features.merge`), so integer columns equal a full recompute exactly; trending
  equals it within float rounding (old * 2^(-(new_ref - old_ref)/half_life) + new
  contributions; ref_ts only grows).
* Idempotence: with no new log files a run is a no-op (no table or manifest written) and says so.
* Format: a live manifest whose ``format`` is not `MANIFEST_FORMAT` (3 since the co-visitation counts
  became segments) is not built on: the run rebuilds every table from the whole log, logged.
* Parameters (`_params`: bucket counts, window, top-K, half-life, topics) are in the manifest; a run
  whose parameters differ from the live version's rebuilds every table from the whole log. That
  includes `STREAMREC_COVISIT_BUCKETS` (`covisit_buckets`): the co-visitation files are split by item
  hash, so a new count is a new layout, logged as such, and no stored file is reused.
* Attribution (`streaming.features.attribution`): every run that is not a no-op -- new event, item or
  impression files, or a changed `STREAMREC_ATTRIBUTION_WINDOW_S` -- recomputes it from the whole log
  (exact: a late click changes an old impression's counts) and publishes its tables with the version.
  It reads two columns of the event log and the impression log: 0.02 s at 1.2M events without
  impressions (bench/features_scale.py), so still a recompute; incremental attribution is left for
  when impression volume makes it count.
* Cost (issue 18): a run writes, per user bucket its new events touch, one segment with only the
  touched users' new rows and reads the bucket's per-user state and event-id hashes, not its
  sequences (except for users with a late or duplicate event: `streaming.features.merge`); per item
  bucket its pair deltas touch, one delta segment of integer pair keys, after looking up the stored
  counts of those pairs by binary search in memory-mapped arrays, and a new top-K file
  (`streaming.features.covisit_merge`), not the stored pairs. What still grows with the stored data:
  the state file (rewritten, one row per stored user of a touched bucket), the hash files (read, 8
  bytes per stored event), compaction of either kind of segment (`MAX_SEGMENTS`,
  `COMPACT_WHEN_APPENDED_OVER_BASE`, `MAX_COVISIT_SEGMENTS`, `COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS`:
  a run that compacts rewrites those buckets, amortized a bounded number of times per byte), and
  files bounded by the catalog, not the events: the co-visitation id and top-K files (items x
  neighbours) and the popularity file (one row per item).
  `last_run.stage_s` in the manifest says where a run's time went, `last_run.compactions` how many
  buckets it compacted (``full`` / ``segments``: sequences; ``covisit_full`` / ``covisit_segments``).
  Measured (bench/features_scale.py, 100k users, 20k items, 2 shared cores): the sequences stage per
  100k new events is 1.4-1.5 s at 1M stored events and 2.6-2.8 s at 10M (stage 1's own work per
  bucket, in process: ~0.045 CPU-s at both sizes, was 0.06-0.19 / 0.5). The co-visitation stage,
  which read and rewrote every touched bucket whole before (2.1-2.9 s at 1M, 3.8M pairs; 8.4-10 s at
  10M, 30M pairs): see `streaming.features.covisit_merge` for its figures now.
* A corrupt or torn new log file stops the run with `CorruptLogFile` naming it (footers are checked
  before any work; when a Ray Data read fails, the new files are decoded to find the culprit): never
  tables silently missing its events. Chosen over quarantine; README "Chaos suite" says what to do.

Every run, successful, a no-op or failed, ends by writing the job's outcome metrics
(`streaming.features.run_metrics`: `<data_dir>/metrics/features.prom`, and the Pushgateway).

Ray Data does the heavy lifting: ``read_parquet`` over the new event files, a watermark filter
that tags each row with its user bucket, ``groupby(bucket).map_groups`` for the user-bucket
merge, then ``groupby(item bucket).map_groups`` for the co-visitation buckets. Popularity
deltas (at most one row per item per user bucket) and the item records are merged with pyarrow
on the driver. Workers write the files directly, so on a multi-host Ray cluster
``features_dir`` must be a filesystem every node mounts (a PVC) and the ``streaming`` package
must be importable on every node.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.events import ITEM_LOG_SCHEMA
from streaming.features import merge as merge_stage
from streaming.features import store
from streaming.features.attribution import EVENT_SCHEMA_WITHOUT_ATTRIBUTION, attribution_is_stale, publish_attribution
from streaming.features import covisit_merge as covisit_stage
from streaming.features.covisit_merge import COVISIT_OUT_SCHEMA
from streaming.features.merge import (
    DELTA_SCHEMA,
    EVENT_COLUMNS_READ,
    MergeJob,
    above_watermarks,
    merge_user_bucket,
    only_kind,
    prepare_events,
    runs,
)
from streaming.features.redis_push import push_popularity_to_redis, pushed_version
from streaming.features.run_metrics import record_features_run
from streaming.features.store import KEEP_VERSIONS, MANIFEST_FORMAT, write_parquet
from streaming.forget import purge_user_logs, read_durable
from streaming.features.tables import (
    COVISIT_BUCKETS,
    COVISIT_COUNTS,
    COVISIT_TOPK,
    ITEMS,
    MANIFEST_NAME,
    POPULARITY,
    POPULARITY_SCHEMA,
    SEQUENCES,
    TABLE_NAMES,
    load_tables,
    read_manifest,
    read_parquet,
)
from streaming.offline_log import CorruptLogFile, LogFile, OfflineLog, check_log_file
from streaming.offline_log import read_table as read_log_table
from streaming.ray_runtime import ensure_ray
from streaming.settings import Settings
from streaming.versioned_store import read_json, version_name

logger = logging.getLogger(__name__)

MS_PER_S = 1000.0
MAX_COVISIT_BUCKETS = 4096  # the bound of STREAMREC_COVISIT_BUCKETS (as for user_buckets)


@dataclass(frozen=True)
class FeatureRunResult:
    """What one run did: the live version after it, what it read, whether it was a no-op."""

    version: int
    new_files: int
    new_events: int
    users_touched: int
    noop: bool
    manifest_path: Path


def run_features(settings: Settings, *, full: bool = False, redis_client: Any = None,
                 progress: bool = False) -> FeatureRunResult:
    """Fold the log files that are new since the last run into the feature tables and publish
    a new version (see the module docstring). With nothing new, a no-op. `full=True` rebuilds
    every table from the whole log. With `redis_client`, runs under a redis lock too and pushes
    popularity / trending to Redis (`push_popularity_to_redis`)."""
    features_dir = Path(settings.features_dir).absolute()
    features_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        with store.run_lock(features_dir, redis_client, settings) as rlock:
            result = _run_locked(settings, features_dir, full, rlock, progress)
            # Also after a no-op: Redis may have restarted empty since the last push. Under the
            # lock, so an older version never overwrites a newer one.
            if redis_client is not None:
                manifest = read_manifest(settings)
                if manifest is not None and pushed_version(redis_client, settings) != manifest["version"]:
                    push_popularity_to_redis(load_tables(settings, manifest, (ITEMS, POPULARITY)), redis_client,
                                             settings)
    except store.FeaturesBusyError:
        raise  # not a run: the one holding the lock records its own end
    except Exception:
        record_features_run(settings, started=started, live_version=_live_version(features_dir))
        raise
    record_features_run(settings, started=started, result=result)
    return result


def _live_version(features_dir: Path) -> int | None:
    """The live feature version, for the metrics of a failed run (None when unreadable)."""
    try:
        return int((read_json(features_dir / MANIFEST_NAME) or {}).get("version", 0))
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class _Run:
    """One run's plan (what to read, on top of which version) and what it produced."""

    settings: Settings
    features_dir: Path
    current: dict | None  # the live manifest when the run started
    base: dict | None  # the manifest the run builds on; None = from scratch
    version: int
    ev_files: list[LogFile]
    it_files: list[LogFile]
    ev_wm: dict[int, int]
    it_wm: dict[int, int]
    tables: dict[str, list]
    ref_ts: int | None
    started: float
    new_events: int = 0
    users_touched: int = 0
    pair_deltas: int = 0  # co-visitation delta rows stage 1 sent to stage 2 (its shuffle volume)
    forgotten: list[str] = field(default_factory=list)  # the forget tombstones these tables honour
    forget_rebuild: bool = False  # rebuilt for new tombstones: no older version may stay on disk
    im_files: list[LogFile] = field(default_factory=list)  # new impression files (attribution reads them all)
    im_wm: dict[int, int] = field(default_factory=dict)
    attribution: dict = field(default_factory=dict)  # the manifest's `attribution` entry
    # Buckets compacted by this run: {"full": n, "segments": n} for sequence buckets, {"covisit_full": n,
    # "covisit_segments": n} for co-visitation buckets (manifest `last_run.compactions`).
    compactions: dict[str, int] = field(default_factory=dict)
    # Wall seconds per stage (manifest `last_run.stage_s`: where a run's time goes; bench/features_scale.py).
    stage_s: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.stage_s[name] = round(self.stage_s.get(name, 0.0) + time.monotonic() - t0, 3)

    @property
    def vdir(self) -> str:
        return version_name(self.version)

    @property
    def new_files(self) -> int:
        return len(self.ev_files) + len(self.it_files) + len(self.im_files)


def _run_locked(settings: Settings, features_dir: Path, full: bool, rlock: Any, progress: bool) -> FeatureRunResult:
    from tqdm.auto import tqdm

    started = time.monotonic()
    manifest_path = features_dir / MANIFEST_NAME
    current = read_json(manifest_path)
    base = None if full else current
    if base is not None and base.get("format") != MANIFEST_FORMAT:
        logger.warning("manifest format %s is not %s: rebuilding every table", base.get("format"), MANIFEST_FORMAT)
        base = None
    if base is not None and base.get("params") != _params(settings):
        before, after = base.get("params") or {}, _params(settings)
        if before.get("covisit_buckets") != after["covisit_buckets"]:
            # The co-visitation files are split by crc32(item_a) % buckets: files of another bucket count
            # hold other items, so no stored file is reused (never two layouts in one version).
            logger.warning("co-visitation buckets changed (%s -> %s, STREAMREC_COVISIT_BUCKETS): rebuilding every "
                           "table from the whole log in the new layout", before.get("covisit_buckets"),
                           after["covisit_buckets"])
        logger.warning("feature parameters changed (%s -> %s): rebuilding every table", before, after)
        base = None

    log = OfflineLog(settings.log_dir)
    # Forget tombstones the live tables do not honour yet (streaming.forget): purge the log once more
    # (a writer may not have seen them when it wrote) and rebuild every table from it, so the users'
    # events leave the aggregates (popularity, co-visitation) too, not only their sequences.
    tombstones = read_durable(log)
    unhonoured = tombstones.ids - set((current or {}).get("forgotten", []))
    if unhonoured:
        purge_user_logs(log, settings, tombstones)  # events and impressions
        if base is not None:
            logger.info("%d new forget tombstones: rebuilding every table from the log", len(unhonoured))
            base = None
    base_wm = (base or {}).get("watermarks", {})
    ev_wm = _wm_from_json(base_wm.get(settings.events_topic))
    it_wm = _wm_from_json(base_wm.get(settings.items_topic))
    ev_files, it_files = _new_files(log, settings.events_topic, ev_wm), _new_files(log, settings.items_topic, it_wm)
    im_wm = _wm_from_json(base_wm.get(settings.impressions_topic))
    im_files = _new_files(log, settings.impressions_topic, im_wm)

    if (not ev_files and not it_files and not im_files and (base is not None or current is None)
            and (current is None or not attribution_is_stale(base, settings))):
        version = int(current["version"]) if current else 0
        msg = (f"no new log files since {version_name(version)}: nothing to do" if current
               else "the offline log is empty and no features were published: nothing to do")
        logger.info(msg)  # and the result says noop=True (the CLI prints it)
        return FeatureRunResult(version, 0, 0, 0, True, manifest_path)

    base_tables = (base or {}).get("tables", {})
    run = _Run(
        settings=settings, features_dir=features_dir, current=current, base=base,
        version=store.next_version(features_dir, current),
        ev_files=ev_files, it_files=it_files, ev_wm=ev_wm, it_wm=it_wm,
        tables={name: list(base_tables.get(name, [])) for name in TABLE_NAMES},
        ref_ts=(base or {}).get("ref_ts"), started=started, forgotten=sorted(tombstones.ids),
        forget_rebuild=bool(unhonoured), im_files=im_files, im_wm=im_wm,
    )
    job = MergeJob(
        root=str(features_dir), vdir=run.vdir, user_buckets=settings.user_buckets,
        covisit_buckets=covisit_buckets(settings), window=settings.covisit_window, topk=settings.covisit_topk,
        half_life_ms=float(settings.trending_half_life_s) * MS_PER_S,
        old_sequences=_by_bucket(run.tables[SEQUENCES]),
        max_segments=merge_stage.MAX_SEGMENTS, compact_over_base=merge_stage.COMPACT_WHEN_APPENDED_OVER_BASE,
        old_counts=_by_bucket(run.tables[COVISIT_COUNTS]),  # the entries (streaming.features.tables)
        old_topk={b: e["path"] for b, e in _by_bucket(run.tables[COVISIT_TOPK]).items()},
    )
    # A corrupt log file stops the run, named, before anything is built (never a silent wrong table;
    # README "Chaos suite"): the footers here, the pages when a read below fails.
    _check_files(log, ev_files, it_files, read_pages=False)
    if ev_files or it_files:
        ensure_ray(settings.ray_address)
    # One line: files read (counted when their stage is done) and bucket files written.
    bar = tqdm(total=run.new_files, unit="file", desc=f"features {run.vdir}: events", disable=not progress,
               leave=True, dynamic_ncols=True, file=sys.stderr)
    bar.set_postfix(seq_buckets=0, covisit_buckets=0)
    try:
        with _ray_data_context():
            if ev_files:
                try:
                    _update_events(run, job, bar)
                except Exception:
                    _check_files(log, ev_files, [], read_pages=True)  # name the file when one is to blame
                    raise
            bar.update(len(ev_files))
            bar.set_description_str(f"features {run.vdir}: items")
            if it_files:
                with run.stage("items"):
                    _update_items(run, job)
            bar.update(len(it_files))
        bar.set_description_str(f"features {run.vdir}: attribution")
        with run.stage("attribution"):
            entries, run.attribution = publish_attribution(settings, features_dir, run.vdir)
        run.tables.update(entries)
        bar.update(len(im_files))
        bar.set_description_str(f"features {run.vdir}: publishing")
        path = _finish(run, rlock)
        bar.set_description_str(f"features {run.vdir}: published")
    finally:
        bar.close()
    return FeatureRunResult(run.version, run.new_files, run.new_events, run.users_touched, False, path)


def _finish(run: _Run, rlock: Any) -> Path:
    """Check we still own the run, then publish its manifest and collect garbage."""
    if rlock is not None:
        rlock.reacquire()  # raises LockNotOwnedError when the lock expired: never publish then
    live = read_json(run.features_dir / MANIFEST_NAME)
    if (live or {}).get("version") != (run.current or {}).get("version"):
        raise RuntimeError(f"the manifest changed during the run ({(run.current or {}).get('version')} -> "
                           f"{(live or {}).get('version')}); not publishing {run.vdir}")

    def total(name: str, key: str = "rows") -> int:
        return int(sum(e.get(key, 0) for e in run.tables[name]))

    s = run.settings
    im_wm = _wm_to_json(_advance(run.im_wm, run.im_files))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": run.version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "params": _params(s),
        "watermarks": {s.events_topic: _wm_to_json(_advance(run.ev_wm, run.ev_files)),
                       s.items_topic: _wm_to_json(_advance(run.it_wm, run.it_files)),
                       **({s.impressions_topic: im_wm} if im_wm else {})},
        "ref_ts": run.ref_ts,
        "forgotten": run.forgotten,
        "tables": run.tables,
        "attribution": run.attribution,
        "counts": {
            "users": total(SEQUENCES), "events": total(SEQUENCES, "events"), "items": total(ITEMS),
            "deleted_items": total(ITEMS, "deleted"), "popular_items": total(POPULARITY),
            "covisit_pairs": total(COVISIT_COUNTS), "covisit_items": total(COVISIT_TOPK),
        },
        # After a forget rebuild the older versions (which hold the forgotten users) are collected at once.
        "history": [*([] if run.forget_rebuild else (run.current or {}).get("history", [])[-(KEEP_VERSIONS - 1):]),
                    run.version],
        "last_run": {"full": run.base is None, "new_files": run.new_files, "new_events": run.new_events,
                     "users_touched": run.users_touched, "duration_s": round(time.monotonic() - run.started, 3),
                     "pair_deltas": run.pair_deltas, "stage_s": dict(run.stage_s),
                     "compactions": dict(run.compactions)},
    }
    # `store.` looked up at call time: the crash-safety test stands in for the publish step.
    path = store.publish_manifest(run.features_dir, manifest)
    store.collect_garbage(run.features_dir, manifest)
    logger.info("published features %s: %d new files, %d new events, %d users touched",
                run.vdir, run.new_files, run.new_events, run.users_touched)
    return path


def _update_events(run: _Run, job: MergeJob, bar: Any) -> None:
    """Sequences and co-visitation with Ray Data; popularity on the driver (each timed in `run.stage_s`)."""
    import ray.data

    tables = run.tables
    with run.stage("sequences"):
        ds = ray.data.read_parquet([f.path for f in run.ev_files], partitioning=None).select_columns(EVENT_COLUMNS_READ)
        ds = ds.map_batches(prepare_events, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"watermarks": run.ev_wm, "buckets": job.user_buckets})
        deltas = ds.groupby("bucket").map_groups(merge_user_bucket, batch_format="pyarrow",
                                                 fn_kwargs={"job": job}).materialize()
        small = _collect(deltas.map_batches(only_kind, batch_format="pyarrow", batch_size=None,
                                            fn_kwargs={"kinds": ("seq", "pop")}), DELTA_SCHEMA)
        seq = small.filter(pc.equal(small["kind"], "seq"))
        seq_buckets = _by_bucket(tables[SEQUENCES])
        for row in seq.to_pylist():
            entry = json.loads(row["key"])  # the bucket's new entry (merge_user_bucket)
            compacted = entry.pop("compacted", None)
            if compacted:
                run.compactions[compacted] = run.compactions.get(compacted, 0) + 1
            seq_buckets[row["bucket"]] = entry
        tables[SEQUENCES] = [seq_buckets[b] for b in sorted(seq_buckets)]
    bar.set_postfix(seq_buckets=seq.num_rows, covisit_buckets=0)
    if seq.num_rows == 0:
        return
    run.new_events = int(pc.sum(seq["read"]).as_py())
    run.users_touched = int(pc.sum(seq["touched"]).as_py())
    run.pair_deltas = int(pc.sum(seq["count"]).as_py() or 0)
    old_ref = run.ref_ts
    ref_ts = run.ref_ts = max(int(pc.max(seq["ts"]).as_py()), old_ref if old_ref is not None else -1)

    # Co-visitation: sum the pair deltas per item bucket into the stored counts (Ray Data).
    if pc.sum(seq["count"]).as_py():  # a seq row's `count` = the pair delta rows its bucket emitted
        with run.stage("covisit"):
            pairs = deltas.map_batches(only_kind, batch_format="pyarrow", batch_size=None,
                                       fn_kwargs={"kinds": ("pair",)})
            # The compaction thresholds as they are now (read here, so a test that lowers them reaches the workers).
            kwargs = {"job": job, "max_segments": covisit_stage.MAX_COVISIT_SEGMENTS,
                      "compact_over_base": covisit_stage.COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS}
            out = _collect(pairs.groupby("bucket").map_groups(covisit_stage.merge_covisit_bucket,
                                                                batch_format="pyarrow", fn_kwargs=kwargs),
                           COVISIT_OUT_SCHEMA)
            counts, topk = _by_bucket(tables[COVISIT_COUNTS]), _by_bucket(tables[COVISIT_TOPK])
            for row in out.to_pylist():
                b = row["bucket"]
                counts.pop(b, None)
                topk.pop(b, None)
                if row["compacted"]:
                    key = f"covisit_{row['compacted']}"
                    run.compactions[key] = run.compactions.get(key, 0) + 1
                if row["counts_entry"]:
                    counts[b] = json.loads(row["counts_entry"])  # base + segments + ids, exact `rows`
                    topk[b] = {"bucket": b, "path": row["topk_path"], "rows": row["topk_rows"]}
            tables[COVISIT_COUNTS] = [counts[b] for b in sorted(counts)]
            tables[COVISIT_TOPK] = [topk[b] for b in sorted(topk)]
        bar.set_postfix(seq_buckets=seq.num_rows, covisit_buckets=out.num_rows)

    with run.stage("popularity"):
        _update_popularity(run, job, small.filter(pc.equal(small["kind"], "pop")), old_ref, ref_ts)


def _update_popularity(run: _Run, job: MergeJob, pop: pa.Table, old_ref: int | None, ref_ts: int) -> None:
    """Popularity: at most one delta row per item per user bucket, so pyarrow on the driver."""
    tables = run.tables
    scale = np.exp2((pop["ts"].to_numpy() - ref_ts) / job.half_life_ms)
    delta = pa.table({"item_id": pop["key"], "count": pop["count"],
                      "trending": pa.array(pop["weight"].to_numpy() * scale, pa.float64())})
    old_pop = POPULARITY_SCHEMA.empty_table()
    if tables[POPULARITY]:
        old_pop = read_parquet(job.abspath(tables[POPULARITY][0]["path"]), POPULARITY_SCHEMA)
        decay = np.exp2((old_ref - ref_ts) / job.half_life_ms)
        old_pop = old_pop.set_column(2, "trending", pc.multiply(old_pop["trending"], decay))
    merged = (
        pa.concat_tables([old_pop, delta.cast(POPULARITY_SCHEMA)])
        .group_by("item_id", use_threads=False)
        .aggregate([("count", "sum"), ("trending", "sum")])
        .rename_columns(["item_id", "count", "trending"])
    )
    if merged.num_rows and pc.min(merged["count"]).as_py() < 0:
        raise RuntimeError("negative popularity count (stored tables are inconsistent)")
    # An item whose only event was replaced by a duplicate on another item drops out, as in a full run.
    merged = merged.filter(pc.greater(merged["count"], 0)).sort_by("item_id").cast(POPULARITY_SCHEMA)
    rel = f"{job.vdir}/{POPULARITY}.parquet"
    write_parquet(merged, job.abspath(rel))
    tables[POPULARITY] = [{"bucket": None, "path": rel, "rows": merged.num_rows}]


def _update_items(run: _Run, job: MergeJob) -> None:
    """The catalog, with pyarrow on the driver: item records are one per catalog change, orders of
    magnitude fewer than events, and a Ray Data job would cost more in scheduling than it saves."""
    tables = run.tables
    log = OfflineLog(run.settings.log_dir)
    new = above_watermarks(read_log_table(log, run.it_files, ITEM_LOG_SCHEMA), run.it_wm)
    if new.num_rows == 0:
        return
    old = read_parquet(job.abspath(tables[ITEMS][0]["path"]), ITEM_LOG_SCHEMA) if tables[ITEMS] else ITEM_LOG_SCHEMA.empty_table()
    both = pa.concat_tables([old, new]).combine_chunks()
    both = both.sort_by([("item_id", "ascending"), ("ts", "descending"), ("partition", "descending"),
                         ("offset", "descending")])
    _, starts = runs(both["item_id"])
    latest = both.take(pa.array(starts, pa.int64()))
    latest = latest.set_column(latest.schema.get_field_index("deleted"), "deleted",
                               pc.fill_null(latest["deleted"], False))
    rel = f"{job.vdir}/{ITEMS}.parquet"
    write_parquet(latest, job.abspath(rel))
    tables[ITEMS] = [{"bucket": None, "path": rel, "rows": latest.num_rows,
                      "deleted": int(pc.sum(pc.cast(latest["deleted"], pa.int64())).as_py() or 0)}]


@contextlib.contextmanager
def _ray_data_context() -> Iterator[None]:
    """Ray Data settings for this run only (restored afterwards: the context is process-wide).

    * Ray Data's own progress bars and per-dataset banners are off (we show one line).
    * groupby uses the sort-based pull shuffle: the default hash shuffle starts aggregator
      actors, a fixed ~6-8 s per groupby on a 2-CPU machine, while our groups are at most
      `user_buckets` / `COVISIT_BUCKETS` large blocks, which the sort shuffle handles in well
      under a second and still scales across a cluster.
    * read_parquet uses the V1 datasource: in Ray 2.60 the V2 pipeline's ListFiles step costs
      1-4 s of wall time per read even for an explicit list of a few files (measured), and we
      always pass the exact file list.
    """
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    wanted: dict[str, Any] = {n: False for n in (
        "enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start",
        "enable_auto_log_stats", "verbose_stats_logs") if hasattr(ctx, n)}
    wanted["shuffle_strategy"] = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if hasattr(ctx, "use_datasource_v2"):
        wanted["use_datasource_v2"] = False
    saved = {n: getattr(ctx, n) for n in wanted}
    ray_data_logger = logging.getLogger("ray.data")
    saved_level = ray_data_logger.level
    ray_data_logger.setLevel(max(logging.WARNING, saved_level))
    for n, v in wanted.items():
        setattr(ctx, n, v)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(ctx, n, v)
        ray_data_logger.setLevel(saved_level)


def _collect(ds: Any, schema: pa.Schema) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])


def covisit_buckets(settings: Settings) -> int:
    """The item-hash files of the co-visitation tables: `STREAMREC_COVISIT_BUCKETS` (`COVISIT_BUCKETS` with
    settings that predate the field). A change rebuilds every table (`_params`)."""
    n = getattr(settings, "covisit_buckets", COVISIT_BUCKETS)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_COVISIT_BUCKETS:
        raise ValueError(f"covisit_buckets must be an integer in 1..{MAX_COVISIT_BUCKETS}, got {n!r} "
                         "(STREAMREC_COVISIT_BUCKETS)")
    return n


def _params(settings: Settings) -> dict[str, Any]:
    return {
        "user_buckets": settings.user_buckets,
        "covisit_buckets": covisit_buckets(settings),
        "covisit_window": settings.covisit_window,
        "covisit_topk": settings.covisit_topk,
        "trending_half_life_s": float(settings.trending_half_life_s),
        "events_topic": settings.events_topic,
        "items_topic": settings.items_topic,
    }


def _check_files(log: OfflineLog, ev_files: list[LogFile], it_files: list[LogFile], *, read_pages: bool) -> None:
    """`CorruptLogFile` (logged as an ERROR naming the file) for the first unreadable new log file."""
    try:
        for f in ev_files:
            # (without request_id / position: log files written before they existed lack them)
            check_log_file(log, f, EVENT_SCHEMA_WITHOUT_ATTRIBUTION, read_pages=read_pages)
        for f in it_files:
            check_log_file(log, f, ITEM_LOG_SCHEMA, read_pages=read_pages)
    except CorruptLogFile as exc:
        logger.error("%s", exc)
        raise


def _new_files(log: OfflineLog, topic: str, watermarks: dict[int, int]) -> list[LogFile]:
    return [f for f in log.list_files(topic) if f.end > watermarks.get(f.partition, -1)]


def _advance(watermarks: dict[int, int], files: list[LogFile]) -> dict[int, int]:
    out = dict(watermarks)
    for f in files:
        out[f.partition] = max(out.get(f.partition, -1), f.end)
    return out


def _wm_from_json(d: dict | None) -> dict[int, int]:
    return {int(k): int(v) for k, v in (d or {}).items()}


def _wm_to_json(d: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(d.items())}


def _by_bucket(entries: list[dict]) -> dict[int, dict]:
    return {int(e["bucket"]): e for e in entries}

