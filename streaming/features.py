"""Incremental feature tables from the offline event log (Ray Data) -- `streamrec features`.

Command::

    streamrec features           # fold the log files that are new since the last run into the tables
    streamrec features --full    # rebuild every table from the whole log, as a new version

(The CLI calls `run_features(settings, full=..., redis_client=..., progress=True)`;
`streamrec ingest` calls it every `features_interval_s`.)

Tables (Parquet under `Settings.features_dir`; read them only through `manifest.json`,
e.g. with `load_feature_tables` or `table_paths`)
--------------------------------------------------------------------------------------
* ``sequences`` -- one row per user: ``user_id``, ``item_ids``, ``ts``, ``types``,
  ``event_ids``, ``scenes`` (values nullable), ``partitions``, ``offsets`` (lists, one
  element per event) and ``n``. Events are ordered by (ts, partition, offset) and deduplicated
  by event_id within the user, keeping the first in that order. ``partitions``/``offsets``
  are the events' log positions: they make the merge of late events exact. Split into
  ``user_buckets`` files by ``zlib.crc32(user_id) % user_buckets`` (`bucket_of`), rows sorted
  by user_id.
* ``items`` -- the catalog: the latest record per item_id by (ts, partition, offset), with
  ``ITEM_SCHEMA`` columns; deleted items stay, flagged ``deleted=True`` (never null).
* ``popularity`` -- ``item_id``, ``count`` (deduplicated interactions, all time) and
  ``trending`` = sum over those events of 2^(-(ref_ts - ts) / half_life), where ``ref_ts``
  (manifest ``ref_ts``, epoch ms) is the largest event ts read so far (it never decreases).
  Deleted items keep their counts here; readers filter them with the ``items`` table.
* ``covisit_counts`` -- ``item_a``, ``item_b``, ``count``: how often the two items sit at most
  ``covisit_window`` positions apart in a user's deduplicated sequence, summed over users;
  symmetric (both directions stored), an item never pairs with itself.
* ``covisit_topk`` -- ``item_id``, ``neighbors``, ``scores``: the ``covisit_topk`` strongest
  neighbours by count desc, then item id asc. Both co-visitation tables are split into
  ``COVISIT_BUCKETS`` files by ``crc32(item_a)`` so a run rewrites only what it touches.

Layout::

    features_dir/manifest.json                     the only entry point (atomically replaced)
    features_dir/.lock                             fcntl lock of a run
    features_dir/v000007/manifest.json             copy of the manifest that published v7
    features_dir/v000007/sequences/bucket-00003.parquet
    features_dir/v000007/covisit_counts/bucket-00011.parquet
    features_dir/v000007/covisit_topk/bucket-00011.parquet
    features_dir/v000007/items.parquet, popularity.parquet

The manifest holds ``version``, ``created_at``, ``params`` (bucket counts, window, top-K,
half-life, topics: a change forces a full rebuild), ``watermarks`` ({topic: {partition:
last offset processed}}), ``ref_ts``, ``tables`` ({name: [{"bucket", "path", "rows", ...}]},
paths relative to features_dir; a bucket with no rows has no entry), ``counts`` (totals),
``history`` (the last published versions) and ``last_run``.

Design: what is exact, and why
------------------------------
* Input: a file is new when its last offset is above its partition's watermark; rows at or
  below the watermark are dropped too (a file never overlaps another, so that is only a guard).
  Files appear whole, so a listed file is complete.
* Sequences: each run merges, per touched user, the stored sequence with the new events
  and re-sorts/dedups the union -- the result is the same as sorting the whole log, whatever
  order files arrive in (late events included).
* Popularity and co-visitation are updated from exact per-user differences: an event that
  the merge *added* counts +1 and one it *removed* (an older stored event replaced by an
  earlier-ordered duplicate) counts -1; co-visitation subtracts the pairs of the user's old
  sequence and adds those of the new one, restricted to pairs touching the first changed
  position (the prefix before it is identical in both). So integer columns equal a full
  recompute exactly; trending equals it within float rounding (old * 2^(-(new_ref -
  old_ref)/half_life) + new contributions; ref_ts only grows).
* Crash safety: a run writes only into a fresh version directory and publishes it by
  replacing manifest.json (tmp + fsync + os.replace). A crash before that leaves the previous
  manifest live and the half-written directory unreferenced (collected by a later run), so
  nothing is double counted: the watermarks move only with the manifest.
* Idempotence: with no new log files a run is a no-op (nothing written) and says so.
* Concurrency: a run holds an fcntl lock on ``features_dir/.lock`` (one host or a shared
  filesystem with working locks) and, when a redis client is given, also a redis-py `Lock`
  (``<prefix>feat:lock``; short TTL, renewed by a thread while the run lives) so runs on several
  hosts exclude each other; it is re-checked right before publishing, and a run that lost it aborts.
* Garbage collection: after publishing, version directories that none of the last
  ``KEEP_VERSIONS`` published manifests reference are deleted (a reader that loaded one of
  them can still finish).

Redis (when a client is given): after a run -- or a no-op, when ``<prefix>feat:meta`` does
not show the live version, e.g. after a Redis restart -- the top ``popular_push_n`` non-deleted
items by count go to the sorted set ``<prefix>feat:popular`` and by trending to
``<prefix>feat:trending``, with ``<prefix>feat:meta`` = {version, ref_ts, created_at}; all three
swap together (temp keys, RENAMEd in one MULTI). Serving falls back on them.

Ray Data does the heavy lifting: ``read_parquet`` over the new event files, a watermark filter
that tags each row with its user bucket, ``groupby(bucket).map_groups`` that merges the old
bucket file with the new events, writes the new bucket file and returns its deltas
(popularity +-counts / trending contributions, co-visitation +-pair counts, bucket stats);
then ``groupby(item bucket).map_groups`` sums the pair deltas into the co-visitation bucket
files. Popularity deltas (at most one row per item per user bucket) and the item records
are merged with pyarrow on the driver. Workers write the files directly, so on a multi-host
Ray cluster ``features_dir`` must be a filesystem every node mounts (a PVC) and the
``streaming`` package must be importable on every node.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.versioned_store import fsync_dir
from streaming.file_lock import flock_exclusive
from streaming.offline_log import ITEM_SCHEMA, LogFile, OfflineLog
from streaming.offline_log import read_table as read_log_table
from streaming.online_store import popular_key, trending_key
from streaming.ray_runtime import ensure_ray
from streaming.settings import Settings

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
VERSION_DIGITS = 6  # v000007
_VERSION_DIR = re.compile(r"^v(\d{%d,})$" % VERSION_DIGITS)
KEEP_VERSIONS = 3  # published versions whose files survive garbage collection
COVISIT_BUCKETS = 16  # item-hash files of the co-visitation tables (fixed; a change = full rebuild)
LOCK_FILE_NAME = ".lock"
LOCK_WAIT_S = 600.0  # how long a run waits for another run to finish before giving up
LOCK_POLL_S = 0.2
REDIS_LOCK_TTL_S = 120  # a crashed holder's redis lock expires after this long...
REDIS_LOCK_RENEW_S = 30  # ...while a live holder renews it this often
REDIS_TMP_TTL_S = 3600  # temp keys of a push that died before its RENAME expire after this long
REDIS_PUSH_CHUNK = 5000  # members per ZADD
MS_PER_S = 1000.0
PARQUET_COMPRESSION = "zstd"

SEQUENCES = "sequences"
ITEMS = "items"
POPULARITY = "popularity"
COVISIT_COUNTS = "covisit_counts"
COVISIT_TOPK = "covisit_topk"
TABLE_NAMES = (SEQUENCES, ITEMS, POPULARITY, COVISIT_COUNTS, COVISIT_TOPK)

SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_ids", pa.list_(pa.string())),
        ("ts", pa.list_(pa.int64())),
        ("types", pa.list_(pa.string())),
        ("event_ids", pa.list_(pa.string())),
        ("scenes", pa.list_(pa.string())),
        ("partitions", pa.list_(pa.int32())),
        ("offsets", pa.list_(pa.int64())),
        ("n", pa.int64()),
    ]
)
POPULARITY_SCHEMA = pa.schema([("item_id", pa.string()), ("count", pa.int64()), ("trending", pa.float64())])
COVISIT_COUNTS_SCHEMA = pa.schema([("item_a", pa.string()), ("item_b", pa.string()), ("count", pa.int64())])
COVISIT_TOPK_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("neighbors", pa.list_(pa.string())), ("scores", pa.list_(pa.int64()))]
)
TABLE_SCHEMAS = {
    SEQUENCES: SEQUENCE_SCHEMA,
    ITEMS: ITEM_SCHEMA,
    POPULARITY: POPULARITY_SCHEMA,
    COVISIT_COUNTS: COVISIT_COUNTS_SCHEMA,
    COVISIT_TOPK: COVISIT_TOPK_SCHEMA,
}

# Event columns that feed the features (context and ingest_ts stay out).
_EVENT_COLS = ["event_id", "user_id", "item_id", "type", "ts", "scene", "partition", "offset"]
_SORT_KEYS = [("user_id", "ascending"), ("ts", "ascending"), ("partition", "ascending"), ("offset", "ascending")]

# What a user-bucket task returns, one table of three kinds of rows (one schema, so Ray Data
# can carry them as one dataset):
#   "seq":  key = the bucket file it wrote, rows/events = users/events in it, read = new event
#           rows it read, touched = users they touched, ts = their max ts, count = pair rows emitted;
#   "pop":  key = item, count = count delta, trending delta = weight * 2^((ts - ref_ts)/half_life);
#   "pair": key = item_a, item_b, count = pair-count delta, bucket = the item bucket of item_a.
_DELTA_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("bucket", pa.int32()),
        ("key", pa.string()),
        ("item_b", pa.string()),
        ("count", pa.int64()),
        ("ts", pa.int64()),
        ("weight", pa.float64()),
        ("rows", pa.int64()),
        ("events", pa.int64()),
        ("read", pa.int64()),
        ("touched", pa.int64()),
    ]
)
_COVISIT_OUT_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("counts_path", pa.string()),
        ("counts_rows", pa.int64()),
        ("topk_path", pa.string()),
        ("topk_rows", pa.int64()),
    ]
)


class FeaturesBusyError(RuntimeError):
    """Another feature run holds the lock for longer than `LOCK_WAIT_S`."""


@dataclass(frozen=True)
class FeatureRunResult:
    version: int
    new_files: int
    new_events: int
    users_touched: int
    noop: bool
    manifest_path: Path


@dataclass(frozen=True)
class FeatureTables:
    """The tables of one published version (see the module docstring for their columns)."""

    manifest: dict
    sequences: pa.Table
    items: pa.Table
    popularity: pa.Table
    covisit_counts: pa.Table
    covisit_topk: pa.Table

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def ref_ts(self) -> int | None:
        return self.manifest.get("ref_ts")


# --------------------------------------------------------------------------------------------
# small helpers (used on the driver and in Ray workers)
# --------------------------------------------------------------------------------------------


def bucket_of(key: str, buckets: int) -> int:
    """Stable bucket of a user or item id (crc32, the same on every host and Python run)."""
    return zlib.crc32(key.encode("utf-8")) % buckets


def _buckets_of(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    return np.fromiter(
        (zlib.crc32(v.encode("utf-8")) % buckets for v in values.to_pylist()), dtype=np.int32, count=len(values)
    )


def version_dir_name(version: int) -> str:
    return f"v{version:0{VERSION_DIGITS}d}"


def _arr(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _runs(sorted_col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """For a sorted column: the run index of every row and the first row of every run."""
    n = len(sorted_col)
    change = np.ones(n, dtype=bool)
    if n > 1:
        col = _arr(sorted_col)
        change[1:] = pc.fill_null(pc.not_equal(col.slice(1), col.slice(0, n - 1)), True).to_numpy(
            zero_copy_only=False
        )
    starts = np.flatnonzero(change)
    return np.cumsum(change) - 1, starts


def _lists(values: pa.Array | pa.ChunkedArray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _arr(values))


def _write_parquet(table: pa.Table, path: str) -> None:
    # fsync'd: the manifest that will point at this file must never outlive it.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        pq.write_table(table, fh, compression=PARQUET_COMPRESSION)
        fh.flush()
        os.fsync(fh.fileno())


def _read_parquet(path: str, schema: pa.Schema) -> pa.Table:
    return pq.read_table(path, schema=schema)


@dataclass(frozen=True)
class _Job:
    """What a Ray task needs to know about the run (pickled into every task)."""

    root: str  # features_dir, absolute
    vdir: str  # this run's version directory name
    user_buckets: int
    covisit_buckets: int
    window: int
    topk: int
    half_life_ms: float
    old_sequences: dict[int, str] = field(default_factory=dict)  # bucket -> path relative to root
    old_counts: dict[int, str] = field(default_factory=dict)

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)


# --------------------------------------------------------------------------------------------
# Ray Data stage 1: new events -> per-user-bucket merge
# --------------------------------------------------------------------------------------------


def _above_watermarks(batch: pa.Table, watermarks: dict[int, int]) -> pa.Table:
    if batch.num_rows == 0 or not watermarks:
        return batch
    part = batch["partition"].to_numpy()
    uniq, inv = np.unique(part, return_inverse=True)
    wm = np.array([watermarks.get(int(p), -1) for p in uniq], dtype=np.int64)
    return batch.filter(pa.array(batch["offset"].to_numpy() > wm[inv]))


def _prepare_events(batch: pa.Table, *, watermarks: dict[int, int], buckets: int) -> pa.Table:
    batch = _above_watermarks(batch.select(_EVENT_COLS), watermarks)
    return batch.append_column("bucket", pa.array(_buckets_of(batch["user_id"], buckets), pa.int32()))


def _explode(seq: pa.Table) -> pa.Table:
    """Stored sequences -> one row per event (+ its position `old_pos` in the user's list)."""
    lengths = pc.list_value_length(_arr(seq["item_ids"])).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(seq.num_rows), lengths)
    starts = np.cumsum(lengths) - lengths
    old_pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)

    def flat(name: str) -> pa.Array:
        return pc.list_flatten(_arr(seq[name]))

    return pa.table(
        {
            "event_id": flat("event_ids"),
            "user_id": _arr(seq["user_id"]).take(pa.array(rows, pa.int64())),
            "item_id": flat("item_ids"),
            "type": flat("types"),
            "ts": flat("ts"),
            "scene": flat("scenes"),
            "partition": flat("partitions"),
            "offset": flat("offsets"),
            "old_pos": pa.array(old_pos, pa.int64()),
        }
    )


def _pair_keys(uidx: np.ndarray, pos: np.ndarray, codes: np.ndarray, first_changed: np.ndarray,
               window: int, n_codes: int) -> np.ndarray:
    """Directed pair keys (a * n_codes + b, both directions) of the pairs that involve a position
    at or after the user's first changed position. Rows: users' sequences back to back, in order."""
    # Rows more than `window` before the first change can only pair inside the unchanged prefix.
    keep = pos >= first_changed[uidx] - window
    uidx, pos, codes = uidx[keep], pos[keep], codes[keep].astype(np.int64)
    out = []
    n = len(codes)
    for d in range(1, min(window, n - 1) + 1):
        j = np.arange(d, n)
        i = j - d
        ok = (uidx[j] == uidx[i]) & (pos[j] >= first_changed[uidx[j]]) & (codes[i] != codes[j])
        a, b = codes[i[ok]], codes[j[ok]]
        out += [a * n_codes + b, b * n_codes + a]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _delta_rows(kind: str, n: int, **cols: Any) -> pa.Table:
    """`n` rows of `_DELTA_SCHEMA` of one kind; columns not given are null."""
    arrays = [pa.array([kind] * n, pa.string())]
    for f in list(_DELTA_SCHEMA)[1:]:
        v = cols.get(f.name)
        if v is None:
            arrays.append(pa.nulls(n, f.type))
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arrays.append(v.cast(f.type))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=_DELTA_SCHEMA)


def _merge_user_bucket(group: pa.Table, *, job: _Job) -> pa.Table:
    """Merge one user bucket's stored sequences with its new events; write the new bucket file;
    return the bucket's deltas (see `_DELTA_SCHEMA`)."""
    group = group.combine_chunks()
    bucket = int(group["bucket"][0].as_py())
    new = group.select(_EVENT_COLS)
    n_read = new.num_rows
    max_ts = pc.max(new["ts"]).as_py()
    touched = pc.unique(new["user_id"])

    old_rel = job.old_sequences.get(bucket)
    old = _read_parquet(job.abspath(old_rel), SEQUENCE_SCHEMA) if old_rel else SEQUENCE_SCHEMA.empty_table()
    in_touched = pc.is_in(old["user_id"], value_set=touched)
    untouched_old = old.filter(pc.invert(in_touched))
    old_events = _explode(old.filter(in_touched))

    new = new.append_column("old_pos", pa.array(np.full(n_read, -1, dtype=np.int64)))
    combined = pa.concat_tables([old_events, new.cast(old_events.schema)]).combine_chunks()
    combined = combined.take(pc.sort_indices(combined, sort_keys=_SORT_KEYS))
    n = combined.num_rows

    # Dedup by (user, event_id), keeping the first row in (ts, partition, offset) order.
    event_id = combined["event_id"]
    if event_id.null_count:  # the contract forbids it; never let such events collapse into one
        position = pc.binary_join_element_wise(pc.cast(combined["partition"], pa.string()),
                                               pc.cast(combined["offset"], pa.string()), "\x00:")
        event_id = pc.coalesce(event_id, position)
    first = (
        pa.table({"u": combined["user_id"], "e": event_id, "i": np.arange(n, dtype=np.int64)})
        .group_by(["u", "e"], use_threads=False)
        .aggregate([("i", "min")])["i_min"]
        .to_numpy()
    )
    kept = np.zeros(n, dtype=bool)
    kept[first] = True
    old_pos = combined["old_pos"].to_numpy()
    is_old = old_pos >= 0
    uidx, ustart = _runs(combined["user_id"])
    n_users = len(ustart)

    new_rows = np.flatnonzero(kept)
    new_uidx = uidx[new_rows]
    new_counts = np.bincount(new_uidx, minlength=n_users)
    new_first = np.concatenate([[0], np.cumsum(new_counts)[:-1]])
    new_pos = np.arange(len(new_rows), dtype=np.int64) - new_first[new_uidx]
    added_new = ~is_old[new_rows]  # over new_rows
    removed = np.flatnonzero(is_old & ~kept)  # over combined rows

    # --- the bucket file ------------------------------------------------------------------
    kept_t = combined.take(pa.array(new_rows, pa.int64()))
    offsets = np.concatenate([[0], np.cumsum(new_counts)])
    touched_seq = pa.Table.from_arrays(
        [
            _arr(combined["user_id"]).take(pa.array(ustart, pa.int64())),
            _lists(kept_t["item_id"], offsets),
            _lists(kept_t["ts"], offsets),
            _lists(kept_t["type"], offsets),
            _lists(kept_t["event_id"], offsets),
            _lists(kept_t["scene"], offsets),
            _lists(kept_t["partition"], offsets),
            _lists(kept_t["offset"], offsets),
            pa.array(new_counts, pa.int64()),
        ],
        schema=SEQUENCE_SCHEMA,
    )
    seq = pa.concat_tables([untouched_old, touched_seq]).sort_by("user_id")
    rel = f"{job.vdir}/{SEQUENCES}/bucket-{bucket:05d}.parquet"
    _write_parquet(seq, job.abspath(rel))

    out: list[pa.Table] = []
    item_dict = pc.dictionary_encode(combined["item_id"]).combine_chunks()
    codes = item_dict.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    items = item_dict.dictionary
    n_codes = max(len(items), 1)
    ts = combined["ts"].to_numpy()

    # --- popularity deltas: +1 per added event, -1 per removed one --------------------------
    changed = np.concatenate([new_rows[added_new], removed])
    if len(changed):
        sign = np.concatenate([np.ones(int(added_new.sum())), -np.ones(len(removed))])
        ref = int(ts[changed].max())  # local reference; the driver rescales to the global ref_ts
        weight = sign * np.exp2((ts[changed] - ref) / job.half_life_ms)
        cnt = np.bincount(codes[changed], weights=sign, minlength=n_codes)
        wsum = np.bincount(codes[changed], weights=weight, minlength=n_codes)
        nz = np.flatnonzero((cnt != 0) | (wsum != 0))
        out.append(_delta_rows("pop", len(nz), key=items.take(pa.array(nz, pa.int64())),
                               count=cnt[nz].round().astype(np.int64), ts=np.full(len(nz), ref, dtype=np.int64),
                               weight=wsum[nz]))

    # --- co-visitation deltas: pairs(new sequence) - pairs(old sequence) per touched user ----
    never = np.iinfo(np.int64).max // 2
    first_changed = np.full(n_users, never, dtype=np.int64)
    np.minimum.at(first_changed, new_uidx[added_new], new_pos[added_new])
    np.minimum.at(first_changed, uidx[removed], old_pos[removed])
    old_rows = np.flatnonzero(is_old)
    n_pairs = 0
    plus = _pair_keys(new_uidx, new_pos, codes[new_rows], first_changed, job.window, n_codes)
    minus = _pair_keys(uidx[old_rows], old_pos[old_rows], codes[old_rows], first_changed, job.window, n_codes)
    if len(plus) or len(minus):
        keys, inv = np.unique(np.concatenate([plus, minus]), return_inverse=True)
        delta = np.bincount(inv, weights=np.concatenate([np.ones(len(plus)), -np.ones(len(minus))]))
        delta = delta.round().astype(np.int64)
        nz = np.flatnonzero(delta != 0)
        n_pairs = len(nz)
        a, b = keys[nz] // n_codes, keys[nz] % n_codes
        code_bucket = _buckets_of(items, job.covisit_buckets)
        out.append(_delta_rows("pair", n_pairs, bucket=code_bucket[a], key=items.take(pa.array(a, pa.int64())),
                               item_b=items.take(pa.array(b, pa.int64())), count=delta[nz]))
    out.append(_delta_rows("seq", 1, bucket=[bucket], key=[rel], count=[n_pairs], ts=[max_ts], rows=[seq.num_rows],
                           events=[int(pc.sum(seq["n"]).as_py() or 0)], read=[n_read], touched=[n_users]))
    return pa.concat_tables(out)


# --------------------------------------------------------------------------------------------
# Ray Data stage 2: pair deltas -> co-visitation bucket files
# --------------------------------------------------------------------------------------------


def _topk(counts: pa.Table, k: int) -> pa.Table:
    if counts.num_rows == 0:
        return COVISIT_TOPK_SCHEMA.empty_table()
    t = counts.sort_by([("item_a", "ascending"), ("count", "descending"), ("item_b", "ascending")])
    uidx, starts = _runs(t["item_a"])
    t = t.filter(pa.array((np.arange(t.num_rows) - starts[uidx]) < k))
    uidx, starts = _runs(t["item_a"])
    offsets = np.concatenate([starts, [t.num_rows]])
    return pa.Table.from_arrays(
        [_arr(t["item_a"]).take(pa.array(starts, pa.int64())), _lists(t["item_b"], offsets),
         _lists(t["count"], offsets)],
        schema=COVISIT_TOPK_SCHEMA,
    )


def _merge_covisit_bucket(group: pa.Table, *, job: _Job) -> pa.Table:
    """Add one item bucket's pair deltas to its stored counts; write counts and top-K files."""
    bucket = int(group["bucket"][0].as_py())
    delta = pa.table({"item_a": group["key"], "item_b": group["item_b"], "count": group["count"]})
    old_rel = job.old_counts.get(bucket)
    old = _read_parquet(job.abspath(old_rel), COVISIT_COUNTS_SCHEMA) if old_rel else COVISIT_COUNTS_SCHEMA.empty_table()
    merged = (
        pa.concat_tables([old, delta.cast(COVISIT_COUNTS_SCHEMA)])
        .group_by(["item_a", "item_b"], use_threads=False)
        .aggregate([("count", "sum")])
        .rename_columns(["item_a", "item_b", "count"])
    )
    merged = merged.filter(pc.not_equal(merged["count"], 0))
    if merged.num_rows and pc.min(merged["count"]).as_py() < 0:
        raise RuntimeError(f"co-visitation bucket {bucket}: negative pair count (stored tables are inconsistent)")
    merged = merged.sort_by([("item_a", "ascending"), ("item_b", "ascending")]).cast(COVISIT_COUNTS_SCHEMA)
    topk = _topk(merged, job.topk)
    counts_rel = topk_rel = None
    if merged.num_rows:
        counts_rel = f"{job.vdir}/{COVISIT_COUNTS}/bucket-{bucket:05d}.parquet"
        topk_rel = f"{job.vdir}/{COVISIT_TOPK}/bucket-{bucket:05d}.parquet"
        _write_parquet(merged, job.abspath(counts_rel))
        _write_parquet(topk, job.abspath(topk_rel))
    return pa.table(
        {"bucket": [bucket], "counts_path": [counts_rel], "counts_rows": [merged.num_rows],
         "topk_path": [topk_rel], "topk_rows": [topk.num_rows]},
        schema=_COVISIT_OUT_SCHEMA,
    )


def _only_kind(batch: pa.Table, *, kinds: tuple[str, ...]) -> pa.Table:
    return batch.filter(pc.is_in(batch["kind"], value_set=pa.array(kinds, pa.string())))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


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


def _params(settings: Settings) -> dict[str, Any]:
    return {
        "user_buckets": settings.user_buckets,
        "covisit_buckets": COVISIT_BUCKETS,
        "covisit_window": settings.covisit_window,
        "covisit_topk": settings.covisit_topk,
        "trending_half_life_s": float(settings.trending_half_life_s),
        "events_topic": settings.events_topic,
        "items_topic": settings.items_topic,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_manifest(settings: Settings) -> dict | None:
    """The live manifest, or None when no version was ever published."""
    return _read_json(Path(settings.features_dir) / MANIFEST_NAME)


def table_paths(settings: Settings, manifest: dict, name: str) -> list[str]:
    """Absolute paths of the files of table `name` in `manifest` (e.g. for `ray.data.read_parquet`)."""
    root = Path(settings.features_dir).absolute()
    return [str(root / e["path"]) for e in manifest["tables"].get(name, [])]


def _publish_manifest(features_dir: Path, manifest: dict) -> Path:
    """Make `manifest` the live one: a copy in its version directory, then an atomic replace."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    vdir = features_dir / version_dir_name(manifest["version"])
    vdir.mkdir(parents=True, exist_ok=True)
    for target in (vdir / MANIFEST_NAME, features_dir / MANIFEST_NAME):
        tmp = target.parent / f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    return features_dir / MANIFEST_NAME


def _collect_garbage(features_dir: Path, manifest: dict) -> None:
    keep: set[str] = set()
    for v in manifest["history"][-KEEP_VERSIONS:]:
        m = manifest if v == manifest["version"] else _read_json(features_dir / version_dir_name(v) / MANIFEST_NAME)
        keep.add(version_dir_name(v))
        for entries in (m or {}).get("tables", {}).values():
            keep.update(e["path"].split("/", 1)[0] for e in entries)
    for entry in features_dir.iterdir():
        if entry.is_dir() and _VERSION_DIR.match(entry.name) and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and entry.name.startswith(f".{MANIFEST_NAME}.") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _run_lock(features_dir: Path, redis_client: Any, settings: Settings) -> Iterator[Any]:
    """Exclusive right to run: a redis lock when a client is given (hosts), then an fcntl lock."""
    with contextlib.ExitStack() as stack:
        rlock = None
        if redis_client is not None:
            rlock = _acquire_redis_lock(redis_client, f"{settings.redis_prefix}feat:lock")
            stack.callback(_release_redis_lock, rlock, _renew_in_background(rlock))
        path = features_dir / LOCK_FILE_NAME
        fh = stack.enter_context(open(path, "a+"))
        if not flock_exclusive(fh, LOCK_WAIT_S, LOCK_POLL_S):
            raise FeaturesBusyError(f"another feature run holds {path}")
        stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
        yield rlock


def _acquire_redis_lock(redis_client: Any, name: str) -> Any:
    rlock = redis_client.lock(name, timeout=REDIS_LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S, thread_local=False)
    if not rlock.acquire():
        raise FeaturesBusyError(f"another feature run holds the redis lock {name}")
    return rlock


def _renew_in_background(rlock: Any) -> threading.Event:
    """A short TTL frees the lock soon after a crash; renewing it keeps a long run's lock. If a
    renewal fails, `_finish` notices (`reacquire` raises) and refuses to publish."""
    from redis.exceptions import LockError

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(REDIS_LOCK_RENEW_S):
            try:
                rlock.reacquire()
            except (LockError, OSError) as exc:
                logger.warning("could not renew the feature-run lock: %s", exc)
                return

    threading.Thread(target=renew, name="features-lock-renew", daemon=True).start()
    return stop


def _release_redis_lock(rlock: Any, stop_renewing: threading.Event) -> None:
    from redis.exceptions import LockError

    stop_renewing.set()
    with contextlib.suppress(LockError):
        rlock.release()


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


def run_features(settings: Settings, *, full: bool = False, redis_client: Any = None,
                 progress: bool = False) -> FeatureRunResult:
    """Fold the log files that are new since the last run into the feature tables and publish
    a new version (see the module docstring). With nothing new, a no-op. `full=True` rebuilds
    every table from the whole log. With `redis_client`, runs under a redis lock too and pushes
    popularity / trending to Redis (`push_popularity_to_redis`)."""
    features_dir = Path(settings.features_dir).absolute()
    features_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(features_dir, redis_client, settings) as rlock:
        result = _run_locked(settings, features_dir, full, rlock, progress)
        # Also after a no-op: Redis may have restarted empty since the last push. Under the
        # lock, so an older version never overwrites a newer one.
        if redis_client is not None:
            manifest = read_manifest(settings)
            if manifest is not None and _pushed_version(redis_client, settings) != manifest["version"]:
                push_popularity_to_redis(_load(settings, manifest, (ITEMS, POPULARITY)), redis_client, settings)
    return result


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

    @property
    def vdir(self) -> str:
        return version_dir_name(self.version)

    @property
    def new_files(self) -> int:
        return len(self.ev_files) + len(self.it_files)


def _run_locked(settings: Settings, features_dir: Path, full: bool, rlock: Any, progress: bool) -> FeatureRunResult:
    from tqdm.auto import tqdm

    started = time.monotonic()
    manifest_path = features_dir / MANIFEST_NAME
    current = _read_json(manifest_path)
    base = None if full else current
    if base is not None and base.get("format") != MANIFEST_FORMAT:
        logger.warning("manifest format %s is not %s: rebuilding every table", base.get("format"), MANIFEST_FORMAT)
        base = None
    if base is not None and base.get("params") != _params(settings):
        logger.warning("feature parameters changed (%s -> %s): rebuilding every table",
                       base.get("params"), _params(settings))
        base = None

    log = OfflineLog(settings.log_dir)
    base_wm = (base or {}).get("watermarks", {})
    ev_wm = _wm_from_json(base_wm.get(settings.events_topic))
    it_wm = _wm_from_json(base_wm.get(settings.items_topic))
    ev_files, it_files = _new_files(log, settings.events_topic, ev_wm), _new_files(log, settings.items_topic, it_wm)

    if not ev_files and not it_files and (base is not None or current is None):
        version = int(current["version"]) if current else 0
        msg = (f"no new log files since {version_dir_name(version)}: nothing to do" if current
               else "the offline log is empty and no features were published: nothing to do")
        logger.info(msg)  # and the result says noop=True (the CLI prints it)
        return FeatureRunResult(version, 0, 0, 0, True, manifest_path)

    # Never reuse a directory number: a crashed run's leftovers stay unreferenced until collected.
    existing = [int(m.group(1)) for e in features_dir.iterdir() if (m := _VERSION_DIR.match(e.name))]
    base_tables = (base or {}).get("tables", {})
    run = _Run(
        settings=settings, features_dir=features_dir, current=current, base=base,
        version=max([int(current["version"]) if current else 0, *existing]) + 1,
        ev_files=ev_files, it_files=it_files, ev_wm=ev_wm, it_wm=it_wm,
        tables={name: list(base_tables.get(name, [])) for name in TABLE_NAMES},
        ref_ts=(base or {}).get("ref_ts"), started=started,
    )
    job = _Job(
        root=str(features_dir), vdir=run.vdir, user_buckets=settings.user_buckets,
        covisit_buckets=COVISIT_BUCKETS, window=settings.covisit_window, topk=settings.covisit_topk,
        half_life_ms=float(settings.trending_half_life_s) * MS_PER_S,
        old_sequences={b: e["path"] for b, e in _by_bucket(run.tables[SEQUENCES]).items()},
        old_counts={b: e["path"] for b, e in _by_bucket(run.tables[COVISIT_COUNTS]).items()},
    )
    if run.new_files:
        ensure_ray(settings.ray_address)
    # One line: files read (counted when their stage is done) and bucket files written.
    bar = tqdm(total=run.new_files, unit="file", desc=f"features {run.vdir}: events", disable=not progress,
               leave=True, dynamic_ncols=True, file=sys.stderr)
    bar.set_postfix(seq_buckets=0, covisit_buckets=0)
    try:
        with _ray_data_context():
            if ev_files:
                _update_events(run, job, bar)
            bar.update(len(ev_files))
            bar.set_description_str(f"features {run.vdir}: items")
            if it_files:
                _update_items(run, job)
            bar.update(len(it_files))
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
    live = _read_json(run.features_dir / MANIFEST_NAME)
    if (live or {}).get("version") != (run.current or {}).get("version"):
        raise RuntimeError(f"the manifest changed during the run ({(run.current or {}).get('version')} -> "
                           f"{(live or {}).get('version')}); not publishing {run.vdir}")

    def total(name: str, key: str = "rows") -> int:
        return int(sum(e.get(key, 0) for e in run.tables[name]))

    s = run.settings
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": run.version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "params": _params(s),
        "watermarks": {s.events_topic: _wm_to_json(_advance(run.ev_wm, run.ev_files)),
                       s.items_topic: _wm_to_json(_advance(run.it_wm, run.it_files))},
        "ref_ts": run.ref_ts,
        "tables": run.tables,
        "counts": {
            "users": total(SEQUENCES), "events": total(SEQUENCES, "events"), "items": total(ITEMS),
            "deleted_items": total(ITEMS, "deleted"), "popular_items": total(POPULARITY),
            "covisit_pairs": total(COVISIT_COUNTS), "covisit_items": total(COVISIT_TOPK),
        },
        "history": [*((run.current or {}).get("history", []))[-(KEEP_VERSIONS - 1):], run.version],
        "last_run": {"full": run.base is None, "new_files": run.new_files, "new_events": run.new_events,
                     "users_touched": run.users_touched, "duration_s": round(time.monotonic() - run.started, 3)},
    }
    path = _publish_manifest(run.features_dir, manifest)
    _collect_garbage(run.features_dir, manifest)
    logger.info("published features %s: %d new files, %d new events, %d users touched",
                run.vdir, run.new_files, run.new_events, run.users_touched)
    return path


def _update_events(run: _Run, job: _Job, bar: Any) -> None:
    """Sequences and co-visitation with Ray Data; popularity on the driver."""
    import ray.data

    tables = run.tables
    ds = ray.data.read_parquet([f.path for f in run.ev_files], partitioning=None).select_columns(_EVENT_COLS)
    ds = ds.map_batches(_prepare_events, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"watermarks": run.ev_wm, "buckets": job.user_buckets})
    deltas = ds.groupby("bucket").map_groups(_merge_user_bucket, batch_format="pyarrow",
                                             fn_kwargs={"job": job}).materialize()
    small = _collect(deltas.map_batches(_only_kind, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs={"kinds": ("seq", "pop")}), _DELTA_SCHEMA)
    seq = small.filter(pc.equal(small["kind"], "seq"))
    seq_buckets = _by_bucket(tables[SEQUENCES])
    for row in seq.to_pylist():
        seq_buckets[row["bucket"]] = {"bucket": row["bucket"], "path": row["key"], "rows": row["rows"],
                                      "events": row["events"]}
    tables[SEQUENCES] = [seq_buckets[b] for b in sorted(seq_buckets)]
    bar.set_postfix(seq_buckets=seq.num_rows, covisit_buckets=0)
    if seq.num_rows == 0:
        return
    run.new_events = int(pc.sum(seq["read"]).as_py())
    run.users_touched = int(pc.sum(seq["touched"]).as_py())
    old_ref = run.ref_ts
    ref_ts = run.ref_ts = max(int(pc.max(seq["ts"]).as_py()), old_ref if old_ref is not None else -1)

    # Co-visitation: sum the pair deltas per item bucket into the stored counts (Ray Data).
    if pc.sum(seq["count"]).as_py():  # a seq row's `count` = the pair delta rows its bucket emitted
        pairs = deltas.map_batches(_only_kind, batch_format="pyarrow", batch_size=None,
                                   fn_kwargs={"kinds": ("pair",)})
        out = _collect(pairs.groupby("bucket").map_groups(_merge_covisit_bucket, batch_format="pyarrow",
                                                            fn_kwargs={"job": job}), _COVISIT_OUT_SCHEMA)
        counts, topk = _by_bucket(tables[COVISIT_COUNTS]), _by_bucket(tables[COVISIT_TOPK])
        for row in out.to_pylist():
            b = row["bucket"]
            counts.pop(b, None)
            topk.pop(b, None)
            if row["counts_path"]:
                counts[b] = {"bucket": b, "path": row["counts_path"], "rows": row["counts_rows"]}
                topk[b] = {"bucket": b, "path": row["topk_path"], "rows": row["topk_rows"]}
        tables[COVISIT_COUNTS] = [counts[b] for b in sorted(counts)]
        tables[COVISIT_TOPK] = [topk[b] for b in sorted(topk)]
        bar.set_postfix(seq_buckets=seq.num_rows, covisit_buckets=out.num_rows)

    # Popularity: at most one delta row per item per user bucket, so pyarrow on the driver.
    pop = small.filter(pc.equal(small["kind"], "pop"))
    scale = np.exp2((pop["ts"].to_numpy() - ref_ts) / job.half_life_ms)
    delta = pa.table({"item_id": pop["key"], "count": pop["count"],
                      "trending": pa.array(pop["weight"].to_numpy() * scale, pa.float64())})
    old_pop = POPULARITY_SCHEMA.empty_table()
    if tables[POPULARITY]:
        old_pop = _read_parquet(job.abspath(tables[POPULARITY][0]["path"]), POPULARITY_SCHEMA)
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
    _write_parquet(merged, job.abspath(rel))
    tables[POPULARITY] = [{"bucket": None, "path": rel, "rows": merged.num_rows}]


def _update_items(run: _Run, job: _Job) -> None:
    """The catalog, with pyarrow on the driver: item records are one per catalog change, orders of
    magnitude fewer than events, and a Ray Data job would cost more in scheduling than it saves."""
    tables = run.tables
    log = OfflineLog(run.settings.log_dir)
    new = _above_watermarks(read_log_table(log, run.it_files, ITEM_SCHEMA), run.it_wm)
    if new.num_rows == 0:
        return
    old = _read_parquet(job.abspath(tables[ITEMS][0]["path"]), ITEM_SCHEMA) if tables[ITEMS] else ITEM_SCHEMA.empty_table()
    both = pa.concat_tables([old, new]).combine_chunks()
    both = both.sort_by([("item_id", "ascending"), ("ts", "descending"), ("partition", "descending"),
                         ("offset", "descending")])
    _, starts = _runs(both["item_id"])
    latest = both.take(pa.array(starts, pa.int64()))
    latest = latest.set_column(latest.schema.get_field_index("deleted"), "deleted",
                               pc.fill_null(latest["deleted"], False))
    rel = f"{job.vdir}/{ITEMS}.parquet"
    _write_parquet(latest, job.abspath(rel))
    tables[ITEMS] = [{"bucket": None, "path": rel, "rows": latest.num_rows,
                      "deleted": int(pc.sum(pc.cast(latest["deleted"], pa.int64())).as_py() or 0)}]


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


def _load(settings: Settings, manifest: dict, names: tuple[str, ...] = TABLE_NAMES) -> FeatureTables:
    loaded = {}
    for name in TABLE_NAMES:
        schema = TABLE_SCHEMAS[name]
        paths = table_paths(settings, manifest, name) if name in names else []
        parts = [_read_parquet(p, schema) for p in paths]
        loaded[name] = pa.concat_tables(parts) if parts else schema.empty_table()
    return FeatureTables(manifest=manifest, **loaded)


def load_feature_tables(settings: Settings) -> FeatureTables | None:
    """The tables of the live version (through the manifest), or None when none was published."""
    for attempt in range(2):
        manifest = read_manifest(settings)
        if manifest is None:
            return None
        try:
            return _load(settings, manifest)
        except FileNotFoundError:
            # A run published twice more and collected our version while we read: read the new one.
            if attempt:
                raise
    return None


# --------------------------------------------------------------------------------------------
# Redis push (serving's fallback)
# --------------------------------------------------------------------------------------------


def _pushed_version(redis_client: Any, settings: Settings) -> int | None:
    raw = redis_client.hget(f"{settings.redis_prefix}feat:meta", "version")
    return int(raw) if raw is not None else None


def push_popularity_to_redis(tables: FeatureTables, redis_client: Any, settings: Settings) -> None:
    """Top `popular_push_n` live items by count -> sorted set `<prefix>feat:popular`, by trending ->
    `<prefix>feat:trending` (score = the value; ties broken by item id), and `<prefix>feat:meta`
    (version, ref_ts, created_at). Deleted items are left out: this is what serving shows when it
    cannot filter. All three keys change together (temp keys, then RENAME inside one MULTI)."""
    prefix = settings.redis_prefix
    pop = tables.popularity
    deleted = tables.items.filter(pc.equal(tables.items["deleted"], True))["item_id"]
    if len(deleted):
        pop = pop.filter(pc.invert(pc.is_in(pop["item_id"], value_set=_arr(deleted))))
    n = settings.popular_push_n
    plan = {}
    for key, col in ((popular_key(prefix), "count"), (trending_key(prefix), "trending")):
        top = pop.sort_by([(col, "descending"), ("item_id", "ascending")]).slice(0, n)
        plan[key] = list(zip(top["item_id"].to_pylist(), (float(v) for v in top[col].to_pylist())))

    tmp_keys = {}
    for key, members in plan.items():
        if not members:
            continue
        tmp = f"{key}:tmp:{uuid.uuid4().hex}"
        tmp_keys[key] = tmp
        pipe = redis_client.pipeline(transaction=False)
        for i in range(0, len(members), REDIS_PUSH_CHUNK):
            pipe.zadd(tmp, dict(members[i:i + REDIS_PUSH_CHUNK]))
        pipe.expire(tmp, REDIS_TMP_TTL_S)
        pipe.execute()
    tx = redis_client.pipeline(transaction=True)
    for key in plan:
        if key in tmp_keys:
            tx.rename(tmp_keys[key], key)
            tx.persist(key)  # RENAME carries the temp key's TTL over
        else:
            tx.delete(key)
    meta = f"{prefix}feat:meta"
    tx.delete(meta)
    tx.hset(meta, mapping={"version": tables.version, "ref_ts": "" if tables.ref_ts is None else tables.ref_ts,
                           "created_at": tables.manifest.get("created_at", "")})
    tx.execute()
