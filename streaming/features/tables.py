"""The feature tables: their schemas, where they live, and how to read the live version.

This is the feature store's read side, what training and tools import. A version is readable
only through its manifest (`manifest.json` under `Settings.features_dir`), which lists every
file of every table; nothing is found by listing directories.

Tables
------
* ``sequences`` -- one row per user: ``user_id``, ``item_ids``, ``ts``, ``types``,
  ``event_ids``, ``scenes`` (values nullable), ``partitions``, ``offsets`` (lists, one
  element per event) and ``n``. Events are ordered by (ts, partition, offset) and deduplicated
  by event_id within the user, keeping the first in that order. ``partitions``/``offsets``
  are the events' log positions: they make the merge of late events exact. Split into
  ``user_buckets`` buckets by ``zlib.crc32(user_id) % user_buckets`` (`bucket_of`). Read it with
  `iter_sequence_parts` / `load_tables` only (never the files): a bucket is stored as segments,
  merged on read (below).
* ``items`` -- the catalog: the latest record per item_id by (ts, partition, offset), with
  ``ITEM_LOG_SCHEMA`` columns; deleted items stay, flagged ``deleted=True`` (never null).
* ``popularity`` -- ``item_id``, ``count`` (deduplicated interactions, all time) and
  ``trending`` = sum over those events of 2^(-(ref_ts - ts) / half_life), where ``ref_ts``
  (manifest ``ref_ts``, epoch ms) is the largest event ts read so far (it never decreases).
  Deleted items keep their counts here; readers filter them with the ``items`` table.
* ``covisit_counts`` -- ``item_a``, ``item_b``, ``count``: how often the two items sit at most
  ``covisit_window`` positions apart in a user's deduplicated sequence, summed over users;
  symmetric (both directions stored), an item never pairs with itself. Stored as integer pair keys,
  a base + delta segments merged on read (below): read it with `read_covisit_counts` / `load_tables`
  only, never the files.
* ``covisit_topk`` -- ``item_id``, ``neighbors``, ``scores``: the ``covisit_topk`` strongest
  neighbours by count desc, then item id asc. Both co-visitation tables are split into
  ``covisit_buckets`` files (`STREAMREC_COVISIT_BUCKETS`, default ``COVISIT_BUCKETS``) by
  ``crc32(item_a) % covisit_buckets``, rows sorted by (item_a, item_b) / item_id, so a run writes only
  the buckets it touches. A changed bucket count is a changed parameter: the next run rebuilds every
  table in the new layout (`streaming.features.job`), never mixing two layouts in one version.

Layout::

    features_dir/manifest.json                     the only entry point (atomically replaced)
    features_dir/.lock                             fcntl lock of a run
    features_dir/v000007/manifest.json             copy of the manifest that published v7
    features_dir/v000005/sequences/bucket-00003.parquet          a bucket's base (SEQUENCE_SCHEMA)
    features_dir/v000005/sequences/bucket-00003.hashes.npy       its event-id hashes (sorted uint64)
    features_dir/v000007/sequences/bucket-00003.seg.parquet      a segment (+ ``replace``), newer runs
    features_dir/v000007/sequences/bucket-00003.seg.hashes.npy   the event-id hashes it added
    features_dir/v000007/sequences/bucket-00003.state.parquet    per-user state (`SEQUENCE_STATE_SCHEMA`)
    features_dir/v000004/covisit_counts/bucket-00011.ids.parquet      the bucket's item ids (code = row)
    features_dir/v000004/covisit_counts/bucket-00011.base.keys.npy    sorted int64 pair keys (a << 32 | b)
    features_dir/v000004/covisit_counts/bucket-00011.base.counts.npy  their int64 counts
    features_dir/v000007/covisit_counts/bucket-00011.seg.keys.npy     a delta segment: one run's summed
    features_dir/v000007/covisit_counts/bucket-00011.seg.counts.npy   pair deltas (signed), newer runs
    features_dir/v000007/covisit_topk/bucket-00011.parquet
    features_dir/v000007/items.parquet, popularity.parquet

The manifest holds ``format``, ``version``, ``created_at``, ``params`` (bucket counts, window,
top-K, half-life, topics: a change forces a full rebuild), ``watermarks`` ({topic: {partition:
last offset processed}}), ``ref_ts``, ``tables`` ({name: [{"bucket", "path", "rows", ...}]},
paths relative to features_dir; a bucket with no rows has no entry), ``counts`` (totals),
``history`` (the last published versions) and ``last_run``.

Sequence segments (issue 18: a run's cost follows its new events, not the stored history)
------------------------------------------------------------------------------------------
A ``sequences`` entry is ``{"bucket", "path": base file, "hashes": base hash file, "segments":
[{"path", "hashes", "bytes"}, ...] oldest first, "state": state file, "base_bytes", "rows", "events"}``
(`sequence_entry_files` lists its files). The base holds one full row per user. A segment holds at
most one row per user, with a ``replace`` flag: an *append* row (``replace`` false) carries only
events that sort after everything stored for the user (its ``n`` counts them); a *replacement* row
(true) carries the user's whole sequence (a late event or a duplicate event id took the exact merge).
A reader takes, per user, the rows from its newest replacement (the base row counts as one) onward
and concatenates their lists in segment order (`merge_sequence_rows`): the result is one row per
user in `SEQUENCE_SCHEMA`, as a single file would give. The hash files hold 64-bit hashes of the
bucket's event ids (`event_id_hashes`) and the state file holds, per user, ``n``, the sort key of
the last stored event and the item ids of its last ``covisit_window`` events: what the job needs to
decide that new events are plain appends and to compute their deltas without reading the sequences
(`streaming.features.merge`). Segments are compacted by the job (`streaming.features.merge`:
`MAX_SEGMENTS`, `COMPACT_WHEN_APPENDED_OVER_BASE`).

Co-visitation count segments (issue 18: the co-visitation stage's cost follows the new pairs)
---------------------------------------------------------------------------------------------
A ``covisit_counts`` entry (manifest format 3) is ``{"bucket", "ids": id file, "n_ids", "path": base keys,
"counts": base counts, "base_rows", "segments": [{"keys", "counts", "rows"}, ...] oldest first, "rows"}``
(`covisit_entry_files` lists its files). The id file (Parquet, one ``item_id`` column) holds every item id
that appears as item_a or item_b in the bucket; an id's *code* is its row, ids are only ever appended (a
run that meets new ids writes a longer copy: its size follows the catalog, not the history). A pair is
the int64 key ``code_a << COVISIT_CODE_BITS | code_b``. The base is two ``.npy`` arrays, sorted unique keys
and their counts; a segment is the same for one run's summed pair deltas (signed: an event replaced by an
earlier duplicate subtracts; no zero deltas). The count of a pair is the base count plus the segments'
deltas; ``rows`` is the exact number of pairs whose count is not zero (`counts.covisit_pairs` sums it).
The arrays are memory-mapped (`covisit_parts`), so the job looks up the counts of its delta pairs by
binary search (sorted needles, `covisit_lookup`) without reading or decoding the bucket, and
`read_covisit_counts` sums all parts into ``COVISIT_COUNTS_SCHEMA`` rows sorted by (item_a, item_b), zero
counts dropped: what a single file gave. A file that is missing raises `FileNotFoundError` and one that
does not hold what its entry says `CovisitFileError`, naming the file. Segments are compacted by the job
(`streaming.features.covisit_merge`: `MAX_COVISIT_SEGMENTS`, `COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS`).
A ``covisit_counts`` entry without ``ids`` (format 2: one Parquet of strings) is still read by
`read_covisit_counts`, for a reader of a store that the next run has not rebuilt yet.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.events import ITEM_LOG_SCHEMA
from streaming.settings import Settings
from streaming.versioned_store import read_json

MANIFEST_NAME = "manifest.json"
# Item-hash files of the co-visitation tables when the settings carry no `covisit_buckets`
# (STREAMREC_COVISIT_BUCKETS); a change of the count rebuilds every table.
COVISIT_BUCKETS = 16

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
# Rows (users) per Parquet row group of a sequence file: a read of a few users' rows (the job's exact path)
# decodes only their row groups.
SEQUENCE_ROW_GROUP_USERS = 1024
# A sequence segment row: a SEQUENCE_SCHEMA row plus whether it replaces the user's stored sequence
# (true) or appends to it (false; its `n` counts only the appended events).
REPLACE = "replace"
SEGMENT_SCHEMA = SEQUENCE_SCHEMA.append(pa.field(REPLACE, pa.bool_()))


def sequence_schema(columns) -> pa.Schema:
    """The `SEQUENCE_SCHEMA` fields named by `columns`, in that order (what a read of some columns returns)."""
    return pa.schema([SEQUENCE_SCHEMA.field(c) for c in columns])

# Per-user state of a sequence bucket (one row per stored user, sorted by user_id): the stored length,
# the (ts, partition, offset) key of the user's last event and the item ids of its last `covisit_window`
# events (the only stored events a plain append pairs with).
SEQUENCE_STATE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("n", pa.int64()),
        ("last_ts", pa.int64()),
        ("last_partition", pa.int32()),
        ("last_offset", pa.int64()),
        ("tail", pa.list_(pa.string())),
    ]
)
POPULARITY_SCHEMA = pa.schema([("item_id", pa.string()), ("count", pa.int64()), ("trending", pa.float64())])
COVISIT_COUNTS_SCHEMA = pa.schema([("item_a", pa.string()), ("item_b", pa.string()), ("count", pa.int64())])
COVISIT_TOPK_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("neighbors", pa.list_(pa.string())), ("scores", pa.list_(pa.int64()))]
)
# A co-visitation bucket's id file (module docstring): one row per item id, the row is the id's code.
COVISIT_IDS_SCHEMA = pa.schema([("item_id", pa.string())])
# Bits of item_b's code in a pair key (code_a << this | code_b): up to 2^31 ids per bucket, keys stay int64.
COVISIT_CODE_BITS = 32
COVISIT_CODE_MASK = (1 << COVISIT_CODE_BITS) - 1
TABLE_SCHEMAS = {
    SEQUENCES: SEQUENCE_SCHEMA,
    ITEMS: ITEM_LOG_SCHEMA,
    POPULARITY: POPULARITY_SCHEMA,
    COVISIT_COUNTS: COVISIT_COUNTS_SCHEMA,
    COVISIT_TOPK: COVISIT_TOPK_SCHEMA,
}


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


def bucket_of(key: str, buckets: int) -> int:
    """Stable bucket of a user or item id (crc32, the same on every host and Python run)."""
    return zlib.crc32(key.encode("utf-8")) % buckets


def read_manifest(settings: Settings) -> dict | None:
    """The live manifest, or None when no version was ever published."""
    return read_json(Path(settings.features_dir) / MANIFEST_NAME)


def table_paths(settings: Settings, manifest: dict, name: str) -> list[str]:
    """Absolute paths of the files of table `name` in `manifest` (e.g. for `ray.data.read_parquet`).
    Not for ``sequences`` or ``covisit_counts``: their buckets are segments merged on read
    (`iter_sequence_parts`, `read_covisit_counts`)."""
    if name == SEQUENCES:
        raise ValueError("table_paths: the sequences table is stored as segments merged on read; "
                         "read it with iter_sequence_parts / load_tables")
    if name == COVISIT_COUNTS:
        raise ValueError("table_paths: the covisit_counts table is stored as integer-key segments merged on "
                         "read; read it with read_covisit_counts / load_tables")
    root = Path(settings.features_dir).absolute()
    return [str(root / e["path"]) for e in manifest["tables"].get(name, [])]


def sequence_entry_files(entry: dict) -> list[str]:
    """Every file (relative to features_dir) a ``sequences`` manifest entry references."""
    files = [entry["path"]] if entry.get("path") else []
    files += [entry[k] for k in ("hashes", "state") if entry.get(k)]
    for seg in entry.get("segments", []):
        files += [seg["path"], *([seg["hashes"]] if seg.get("hashes") else [])]
    return files


def covisit_entry_files(entry: dict) -> list[str]:
    """Every file (relative to features_dir) a ``covisit_counts`` manifest entry references (ids, base,
    segments; a format-2 entry: its one Parquet file)."""
    files = [entry[k] for k in ("ids", "path", "counts") if entry.get(k)]
    for seg in entry.get("segments", []):
        files += [seg["keys"], seg["counts"]]
    return files


def entry_files(name: str, entry: dict) -> list[str]:
    """Every file (relative to features_dir) a manifest entry of table `name` references."""
    if name == SEQUENCES:
        return sequence_entry_files(entry)
    return covisit_entry_files(entry) if name == COVISIT_COUNTS else [entry["path"]]


class CovisitFileError(RuntimeError):
    """A co-visitation counts file that does not hold what its manifest entry says (torn, overwritten, of
    another table): the message names the file. A missing file is a `FileNotFoundError` instead."""


def read_covisit_ids(root: Path | str, entry: dict) -> pa.Array:
    """A co-visitation bucket's item ids in code order (`entry["ids"]`, `n_ids` of them)."""
    path = Path(root) / entry["ids"]
    try:
        ids = pq.read_table(path, schema=COVISIT_IDS_SCHEMA)["item_id"].combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CovisitFileError(f"co-visitation id file {path} is unreadable: {exc}") from exc
    if len(ids) != int(entry["n_ids"]) or ids.null_count:
        raise CovisitFileError(f"co-visitation id file {path} holds {len(ids)} ids ({ids.null_count} null), "
                               f"its manifest entry says {entry['n_ids']}")
    return ids


def load_covisit_array(path: Path | str, rows: int) -> np.ndarray:
    """One int64 array of a co-visitation bucket, memory-mapped (read only where indexed), checked against
    the `rows` its manifest entry records."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise CovisitFileError(f"co-visitation file {path} is unreadable: {exc}") from exc
    if arr.dtype != np.int64 or arr.ndim != 1 or len(arr) != rows:
        raise CovisitFileError(f"co-visitation file {path} holds {arr.dtype} {arr.shape}, its manifest entry "
                               f"says int64 ({rows},)")
    return arr


def covisit_parts(root: Path | str, entry: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """A format-3 ``covisit_counts`` entry's (keys, counts) arrays, memory-mapped: the base, then the
    segments oldest first."""
    root = Path(root)
    parts = [(entry["path"], entry["counts"], int(entry["base_rows"]))]
    parts += [(g["keys"], g["counts"], int(g["rows"])) for g in entry.get("segments", [])]
    return [(load_covisit_array(root / k, n), load_covisit_array(root / c, n)) for k, c, n in parts]


def covisit_lookup(parts: list[tuple[np.ndarray, np.ndarray]], needles: np.ndarray) -> np.ndarray:
    """The stored counts (base + segments) of the pair keys `needles` (sorted, unique; 0 for an absent
    pair): a binary search per part, which reads only the pages it lands on."""
    out = np.zeros(len(needles), np.int64)
    for keys, counts in parts:
        if not len(keys) or not len(needles):
            continue
        pos = np.minimum(np.searchsorted(keys, needles), len(keys) - 1)
        hit = np.asarray(keys[pos]) == needles
        out[hit] += np.asarray(counts[pos[hit]])
    return out


def sum_by_key(keys: np.ndarray, counts: np.ndarray, sort_kind: str | None = "stable"
               ) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) -> keys sorted unique with their counts summed, zero counts dropped. `sort_kind`:
    numpy's argsort kind -- "stable" (timsort: linear time on concatenated sorted runs), "quicksort" (the
    fastest for keys in any order) -- or None when `keys` are already sorted unique."""
    if sort_kind is not None and len(keys):
        order = np.argsort(keys, kind=sort_kind)
        keys, counts = keys[order], counts[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        starts = np.flatnonzero(first)
        keys, counts = keys[starts], np.add.reduceat(counts, starts)
    nz = counts != 0
    return keys[nz], counts[nz]


def sum_covisit_parts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted-unique (keys, counts) parts -> one: keys sorted unique, counts summed, zero counts dropped.
    The parts are sorted runs, so the stable sort (timsort) merges them in linear time."""
    parts = [(np.asarray(k), np.asarray(c)) for k, c in parts if len(k)]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    keys = np.concatenate([k for k, _ in parts]).astype(np.int64, copy=False)
    counts = np.concatenate([c for _, c in parts]).astype(np.int64, copy=False)
    return sum_by_key(keys, counts, "stable" if len(parts) > 1 else None)


def string_ranks(ids: pa.Array) -> np.ndarray:
    """Each id's position in bytewise order (the order `sort_by` gives strings): codes -> sort order."""
    order = pc.sort_indices(ids).to_numpy()
    ranks = np.empty(len(ids), np.int64)
    ranks[order] = np.arange(len(ids), dtype=np.int64)
    return ranks


def read_covisit_counts(root: Path | str, entry: dict) -> pa.Table:
    """One ``covisit_counts`` bucket (manifest `entry`), merged on read: ``COVISIT_COUNTS_SCHEMA`` rows sorted
    by (item_a, item_b), zero counts dropped -- the table one file gave before (module docstring)."""
    root = Path(root)
    if not entry.get("ids"):  # format 2: one Parquet of strings
        return pq.read_table(root / entry["path"], schema=COVISIT_COUNTS_SCHEMA)
    ids = read_covisit_ids(root, entry)
    keys, counts = sum_covisit_parts(covisit_parts(root, entry))
    if len(counts) and counts.min() < 0:
        raise CovisitFileError(f"co-visitation bucket {entry['bucket']}: a negative pair count in {entry['path']} "
                               "and its segments (the files are inconsistent)")
    a, b = keys >> COVISIT_CODE_BITS, keys & COVISIT_CODE_MASK
    if len(keys) and max(int(a.max()), int(b.max())) >= len(ids):
        raise CovisitFileError(f"co-visitation bucket {entry['bucket']}: a pair code beyond the "
                               f"{len(ids)} ids of {entry['ids']}")
    ranks = string_ranks(ids)
    order = np.argsort((ranks[a] << COVISIT_CODE_BITS) | ranks[b])
    a, b, counts = a[order], b[order], counts[order]
    return pa.Table.from_arrays([ids.take(pa.array(a)), ids.take(pa.array(b)), pa.array(counts, pa.int64())],
                                schema=COVISIT_COUNTS_SCHEMA)


def event_id_hashes(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of event ids (uint64) and their null mask, vectorized over the Arrow buffers (no
    Python call per id). A polynomial hash mod 2^64 with a splitmix64 finish: stable across hosts and runs.
    The job treats a hash hit as "maybe a duplicate" and takes the exact path, so a collision costs time,
    never a wrong table."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    arr = arr.cast(pa.large_string())
    n = len(arr)
    if n == 0:
        return np.empty(0, np.uint64), np.empty(0, bool)
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(n, bool)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    lengths = np.diff(offsets)
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(bufs[2], dtype=np.uint8)[lo:hi] if bufs[2] is not None and hi > lo else np.empty(0, np.uint8)
    max_len = int(lengths.max()) if n else 0
    powers = np.cumprod(np.full(max(max_len, 1), _HASH_MULT, dtype=np.uint64), dtype=np.uint64)
    within = np.arange(hi - lo, dtype=np.int64) - np.repeat(offsets[:-1] - lo, lengths)
    with np.errstate(over="ignore"):
        contrib = (data.astype(np.uint64) + np.uint64(1)) * powers[within]
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(contrib, dtype=np.uint64)])
        h = prefix[offsets[1:] - lo] - prefix[offsets[:-1] - lo]
        h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h, nulls


_HASH_MULT = 0x100000001B3  # FNV-1a's 64-bit prime, as the polynomial base of `event_id_hashes`


def merge_sequence_rows(parts: list[pa.Table], columns: list[str] | None = None) -> pa.Table:
    """One bucket's stored rows -> one row per user (`SEQUENCE_SCHEMA`, or `columns` of it).

    `parts`: the base (`SEQUENCE_SCHEMA`) then the segments (`SEGMENT_SCHEMA`), oldest first, each with
    ``user_id`` (and ``replace`` for segments; base rows replace). Per user: the rows from its newest
    replacement onward, lists concatenated in segment order, ``n`` summed. Rows sorted by user_id."""
    names = list(SEQUENCE_SCHEMA.names if columns is None else columns)
    if len(parts) == 1 and REPLACE not in parts[0].column_names:
        return parts[0].select(names)
    tabs, seg_no, replace = [], [], []
    want = ["user_id", *[c for c in names if c != "user_id"]]
    for k, t in enumerate(parts):
        tabs.append(t.select(want).cast(sequence_schema(want)))
        seg_no.append(np.full(t.num_rows, k, np.int64))
        replace.append(t[REPLACE].to_numpy(zero_copy_only=False).astype(bool) if REPLACE in t.column_names
                       else np.ones(t.num_rows, bool))
    t = pa.concat_tables(tabs).combine_chunks()
    if t.num_rows == 0:
        return sequence_schema(names).empty_table()
    seg = np.concatenate(seg_no)
    rep = np.concatenate(replace)
    order = pc.sort_indices(pa.table({"u": t["user_id"], "s": seg}),
                            sort_keys=[("u", "ascending"), ("s", "ascending")]).to_numpy()
    t, seg, rep = t.take(pa.array(order)), seg[order], rep[order]
    users = t["user_id"].combine_chunks() if isinstance(t["user_id"], pa.ChunkedArray) else t["user_id"]
    n_rows = t.num_rows
    change = np.ones(n_rows, dtype=bool)
    if n_rows > 1:
        change[1:] = pc.not_equal(users.slice(1), users.slice(0, n_rows - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(change)
    uidx = np.cumsum(change) - 1
    newest_rep = np.maximum.reduceat(np.where(rep, seg, -1), starts)
    keep = seg >= newest_rep[uidx]
    if not keep.all():
        t, uidx = t.filter(pa.array(keep)), uidx[keep]
        starts = np.flatnonzero(np.concatenate([[True], uidx[1:] != uidx[:-1]]))
    n_users = len(starts)
    out = {"user_id": t["user_id"].take(pa.array(starts))}
    for c in names:
        if c in ("user_id",):
            continue
        col = t[c].combine_chunks() if isinstance(t[c], pa.ChunkedArray) else t[c]
        if c == "n":
            out[c] = pa.array(np.add.reduceat(col.to_numpy(), starts) if n_users else np.empty(0, np.int64), pa.int64())
            continue
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        per_user = np.add.reduceat(lengths, starts) if n_users else np.empty(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int32)
        out[c] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pc.list_flatten(col))
    schema = sequence_schema(names)
    return pa.Table.from_arrays([out[c] for c in names], schema=schema)


def read_sequence_bucket(root: Path | str, entry: dict, columns: list[str] | None = None,
                         users: pa.Array | None = None) -> pa.Table:
    """One ``sequences`` bucket (manifest `entry`), merged on read: one row per user. `users`: only these
    (row groups of other users are skipped by their user_id statistics: files are sorted by user_id and
    written in row groups of `SEQUENCE_ROW_GROUP_USERS`)."""
    root = Path(root)
    want = list(SEQUENCE_SCHEMA.names if columns is None else columns)
    read_cols = ["user_id", *[c for c in want if c != "user_id"]]
    base_schema = sequence_schema(read_cols)
    where = None if users is None else [("user_id", "in", users.to_pylist())]

    def read(rel: str, schema: pa.Schema, cols: list[str]) -> pa.Table:
        t = pq.read_table(root / rel, schema=schema, columns=cols, filters=where)
        return t if users is None else t.filter(pc.is_in(t["user_id"], value_set=users))

    parts = [read(entry["path"], base_schema, read_cols)] if entry.get("path") else []
    seg_schema = base_schema.append(SEGMENT_SCHEMA.field(REPLACE))
    for seg in entry.get("segments", []):
        parts.append(read(seg["path"], seg_schema, [*read_cols, REPLACE]))
    if not parts:
        return sequence_schema(want).empty_table()
    return merge_sequence_rows(parts, want)


def read_parquet(path: str, schema: pa.Schema) -> pa.Table:
    """One table file, read as `schema`."""
    return pq.read_table(path, schema=schema)


def iter_sequence_parts(settings: Settings, manifest: dict, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The `sequences` table of `manifest` one part at a time (one row per user, `SEQUENCE_SCHEMA`, each user in
    exactly one part): what a reader that must not hold every sequence at once iterates (training at 10^6
    users). `columns`: read only these (``user_id`` first is cheapest to filter on)."""
    root = Path(settings.features_dir).absolute()
    for entry in manifest["tables"].get(SEQUENCES, []):
        yield read_sequence_bucket(root, entry, columns)  # one bucket: base + segments, merged


def load_tables(settings: Settings, manifest: dict, names: tuple[str, ...] = TABLE_NAMES) -> FeatureTables:
    """The tables `names` of the version `manifest` published (the others empty)."""
    loaded = {}
    for name in TABLE_NAMES:
        schema = TABLE_SCHEMAS[name]
        if name == SEQUENCES and name in names:
            parts = list(iter_sequence_parts(settings, manifest))
        elif name == COVISIT_COUNTS and name in names:
            root = Path(settings.features_dir).absolute()
            parts = [read_covisit_counts(root, e) for e in manifest["tables"].get(name, [])]
        else:
            paths = table_paths(settings, manifest, name) if name in names else []
            parts = [read_parquet(p, schema) for p in paths]
        loaded[name] = pa.concat_tables(parts) if parts else schema.empty_table()
    return FeatureTables(manifest=manifest, **loaded)


def load_feature_tables(settings: Settings) -> FeatureTables | None:
    """The tables of the live version (through the manifest), or None when none was published."""
    for attempt in range(2):
        manifest = read_manifest(settings)
        if manifest is None:
            return None
        try:
            return load_tables(settings, manifest)
        except FileNotFoundError:
            # A run published twice more and collected our version while we read: read the new one.
            if attempt:
                raise
    return None
