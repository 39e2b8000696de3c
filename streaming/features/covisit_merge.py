"""Stage 2 of a feature run (`merge_covisit_bucket`, one Ray Data task per item bucket): sum the pair
deltas of stage 1 (`streaming.features.merge`) into the stored co-visitation counts and rewrite the
bucket's top-K file -- at a cost that follows the run's pair deltas, not the stored pairs.

Storage (`streaming.features.tables`, "Co-visitation count segments"): per bucket an append-only id file
(item id -> integer code), a base of sorted unique int64 pair keys ``code_a << 32 | code_b`` with their
counts, and delta segments of the same shape, one per run, all ``.npy`` files memory-mapped on read. A run:

1. encodes its pair deltas on the bucket's codes (ids it has not seen are appended, sorted bytewise, and
   the id file is rewritten: its size follows the catalog, not the history) and sums them per pair;
2. looks up the stored count of each delta pair by binary search in the base and every segment (sorted
   needles on memory maps: only the pages it lands on are read, nothing is decoded), which gives the
   exact new count of the touched pairs and the exact number of pairs (``rows``: +1 for a pair that
   appears, -1 for one whose count falls to zero; `counts.covisit_pairs`);
3. writes the summed deltas as one new segment -- or compacts (below);
4. updates top-K for the items with a delta only: from their stored top-K (each neighbour's stored score,
   or its new count when the delta touches it) plus their delta pairs when every delta of the item is
   positive (a neighbour outside the stored top-K whose count did not change cannot overtake members
   whose counts only grew), and from all of the item's pairs -- the key range ``[a << 32, (a + 1) << 32)``
   of the base and of each segment, plus the delta -- when one of its deltas is negative (the exact path
   replaced an event: rare). ``covisit_topk`` stays one Parquet file per bucket in ``COVISIT_TOPK_SCHEMA``,
   rewritten by every run that touches the bucket: its size is bounded by items x ``covisit_topk``.

Compaction, decided before anything is written (so a compacting run writes no segment it then deletes):

* when the segments' rows (this run's included) exceed `COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS` x the
  base's rows, base + segments + deltas become a new base (a linear merge of sorted runs). A full
  compaction at base size B follows at least fraction x B delta rows, so full compactions rewrite
  about 1 / fraction rows per delta row: amortized constant. The merged base's length must equal the
  tracked ``rows`` (checked: an error, never a silent drift);
* else, past `MAX_COVISIT_SEGMENTS` segments, the newest segments and this run's deltas merge into one
  segment by size tiers (`segments_to_merge`, as for the sequences), so a lookup searches at most that
  many + 1 arrays; a delta row is merged O(log(segment rows / run rows)) times between two full
  compactions. In all, the rows written stay a small multiple of the delta rows: 3.0x over 60 runs and
  3.9x over 240 runs of a growing bucket (tests/streaming/test_covisit_segments.py).

Cost: per touched bucket, the run's deltas (encode, sort, sum), one binary search per delta pair per
part, the top-K file (items x K) and the segment it writes; compaction amortized as above. A bucket
that a run does not touch is neither read nor written: its entry carries over. In process, one bucket
with ~60k delta rows takes ~0.05 CPU-s whether it stores 0.7M or 1.6M pairs. Measured
(bench/features_scale.py, 100k users, 20k items, 2 cores, quiet machine, 2026-12-04): the stage takes
1.0-1.4 s per 100k new events at 10^6 stored events (3.8M pairs) and 1.2-1.5 s at 10^7 (30.4M pairs),
mostly Ray Data's shuffle of the ~870k pair-delta rows; the previous layout, same machine and hour:
1.55 s and 3.6-3.9 s. The price is disk: 16 bytes a pair uncompressed (486 MB at 30.4M pairs, was 70 MB
of zstd Parquet), so that the arrays can be memory-mapped and searched in place.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.features.merge import MergeJob, list_array, one_array, runs, segments_to_merge
from streaming.features.store import write_array, write_parquet
from streaming.features.tables import (
    COVISIT_CODE_BITS,
    COVISIT_CODE_MASK,
    COVISIT_COUNTS,
    COVISIT_IDS_SCHEMA,
    COVISIT_TOPK,
    COVISIT_TOPK_SCHEMA,
    covisit_lookup,
    covisit_parts,
    read_covisit_ids,
    read_parquet,
    string_ranks,
    sum_by_key,
    sum_covisit_parts,
)
from streaming.ray_runtime import run_as_batch_work

# Past this many delta segments in a bucket, the newest merge into one (size tiers), so a lookup searches
# at most this many + 1 sorted arrays.
MAX_COVISIT_SEGMENTS = 8
# A bucket whose segments hold more rows than this x its base's rows is compacted into a new base: each
# stored row is rewritten about 1 / this times per doubling of the bucket (amortized constant per pair).
COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS = 1.0

# What a co-visitation bucket task returns: the bucket's new manifest entries and what it compacted.
COVISIT_OUT_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("counts_entry", pa.string()),  # JSON of the new covisit_counts entry; null: no pair left
        ("counts_rows", pa.int64()),
        ("topk_path", pa.string()),
        ("topk_rows", pa.int64()),
        ("compacted", pa.string()),  # "full", "segments" or null
    ]
)


def topk_table(counts: pa.Table, k: int) -> pa.Table:
    """The top-`k` table of `counts` (every item's strongest neighbours): a reference for tests and tools;
    the job maintains top-K incrementally (`merge_covisit_bucket`)."""
    if counts.num_rows == 0:
        return COVISIT_TOPK_SCHEMA.empty_table()
    t = counts.sort_by([("item_a", "ascending"), ("count", "descending"), ("item_b", "ascending")])
    uidx, starts = runs(t["item_a"])
    t = t.filter(pa.array((np.arange(t.num_rows) - starts[uidx]) < k))
    uidx, starts = runs(t["item_a"])
    offsets = np.concatenate([starts, [t.num_rows]])
    return pa.Table.from_arrays(
        [one_array(t["item_a"]).take(pa.array(starts, pa.int64())), list_array(t["item_b"], offsets),
         list_array(t["count"], offsets)],
        schema=COVISIT_TOPK_SCHEMA,
    )


def _plain(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A string column as one plain (not dictionary-encoded) array."""
    arr = one_array(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr.cast(pa.string())


def _codes(col: pa.Array, ids: pa.Array, what: str) -> np.ndarray:
    """Positions of `col`'s values in `ids` (which must hold them all)."""
    idx = pc.index_in(col, value_set=ids)
    if idx.null_count:
        raise RuntimeError(f"co-visitation merge: {what} holds ids missing from the bucket's id file, e.g. "
                           f"{col.filter(pc.is_null(idx))[0].as_py()!r} (the stored files are inconsistent)")
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


def encode(cols: list[pa.Array | pa.ChunkedArray], ids: pa.Array) -> tuple[pa.Array, list[np.ndarray]]:
    """The codes of `cols`' values in the bucket's id list `ids`, ids it lacks appended (sorted bytewise, so
    the file does not depend on the order deltas arrive in): (the new id list, codes per column). One hash
    pass per value (dictionary encoding), then lookups per distinct value only."""
    encoded = []
    for col in cols:
        for chunk in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
            d = chunk if pa.types.is_dictionary(chunk.type) else chunk.dictionary_encode()
            if d.null_count:
                raise RuntimeError("co-visitation merge: a pair delta with a null item id (a bug in stage 1)")
            encoded.append(d)
    values = [d.dictionary.cast(pa.string()) for d in encoded]
    found = [pc.index_in(v, value_set=ids) for v in values]
    missing = [v.filter(pc.is_null(f)) for v, f in zip(values, found) if f.null_count]
    if missing:
        new = pc.unique(pa.concat_arrays(missing))
        ids = pa.concat_arrays([ids, new.take(pc.sort_indices(new))])
        found = [pc.index_in(v, value_set=ids) for v in values]
    codes, k = [], 0
    for col in cols:
        n_chunks = len(col.chunks) if isinstance(col, pa.ChunkedArray) else 1
        parts = [f.to_numpy(zero_copy_only=False).astype(np.int64)[d.indices.to_numpy(zero_copy_only=False)]
                 for d, f in zip(encoded[k:k + n_chunks], found[k:k + n_chunks])]
        codes.append(np.concatenate(parts) if parts else np.empty(0, np.int64))
        k += n_chunks
    return ids, codes


def sum_deltas(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair deltas (a pair any number of times, any order) -> sorted unique keys with summed, non-zero counts."""
    if not len(keys):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # any order of equal keys will do (they are summed): numpy's fastest sort, SIMD when it has one
    return sum_by_key(keys, counts, "quicksort")


def _write_part(job: MergeJob, rel_prefix: str, keys: np.ndarray, counts: np.ndarray) -> tuple[str, str]:
    keys_rel, counts_rel = f"{rel_prefix}.keys.npy", f"{rel_prefix}.counts.npy"
    write_array(keys, job.abspath(keys_rel), dtype="int64")
    write_array(counts, job.abspath(counts_rel), dtype="int64")
    return keys_rel, counts_rel


def merge_covisit_bucket(group: pa.Table, *, job: MergeJob, max_segments: int = MAX_COVISIT_SEGMENTS,
                         compact_over_base: float = COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS) -> pa.Table:
    """Add one item bucket's pair deltas to its stored counts (a new segment, or a compaction) and rewrite its
    top-K file (module docstring). `job.old_counts` / `job.old_topk`: the stored buckets' ``covisit_counts``
    manifest entries / top-K paths. `max_segments` / `compact_over_base`: `MAX_COVISIT_SEGMENTS` /
    `COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS` as the job read them when it started (a test can lower them
    for the workers too)."""
    run_as_batch_work()
    bucket = int(group["bucket"][0].as_py())
    entry, topk_rel_old = job.old_counts.get(bucket), job.old_topk.get(bucket)
    if entry and not entry.get("ids"):
        raise RuntimeError(f"co-visitation bucket {bucket}: {entry.get('path')} is in the format-2 layout, which "
                           "a run does not extend (a format change rebuilds every table; a bug if reached)")
    if entry and not topk_rel_old:
        raise RuntimeError(f"co-visitation bucket {bucket}: counts in {entry['path']} but no top-K file "
                           "(the manifest is inconsistent)")
    parts = covisit_parts(job.root, entry) if entry else []
    stored_ids = read_covisit_ids(job.root, entry) if entry else pa.array([], pa.string())
    ids, (d_a, d_b) = encode([group["key"], group["item_b"]], stored_ids)
    d_keys, d_counts = sum_deltas((d_a << COVISIT_CODE_BITS) | d_b,
                                  group["count"].to_numpy().astype(np.int64))
    stored = covisit_lookup(parts, d_keys)
    new = stored + d_counts
    if len(new) and new.min() < 0:
        at = int(np.argmin(new))
        raise RuntimeError(f"co-visitation bucket {bucket}: pair ({ids[int(d_keys[at] >> COVISIT_CODE_BITS)]}, "
                           f"{ids[int(d_keys[at] & COVISIT_CODE_MASK)]}) would count {int(new[at])} (the stored "
                           "tables are inconsistent)")
    rows = int((entry or {}).get("rows", 0)) + int(np.count_nonzero((stored == 0) & (new != 0))) \
        - int(np.count_nonzero((stored != 0) & (new == 0)))

    old_topk = (read_parquet(job.abspath(topk_rel_old), COVISIT_TOPK_SCHEMA) if entry
                else COVISIT_TOPK_SCHEMA.empty_table())
    topk = topk_update(old_topk, ids, parts, d_keys, d_counts, new, job.topk)

    out = {"bucket": [bucket], "counts_entry": [None], "counts_rows": [0], "topk_path": [None],
           "topk_rows": [0], "compacted": [None]}
    if rows == 0:  # every pair of the bucket fell to zero: no entry (its old files go with their version)
        return pa.table(out, schema=COVISIT_OUT_SCHEMA)
    new_entry, compacted = _write_counts(job, bucket, entry, parts, ids, len(stored_ids), d_keys, d_counts, rows,
                                         max_segments, compact_over_base)
    topk_rel = f"{job.vdir}/{COVISIT_TOPK}/bucket-{bucket:05d}.parquet"
    write_parquet(topk, job.abspath(topk_rel))
    out.update(counts_entry=[json.dumps(new_entry)], counts_rows=[rows], topk_path=[topk_rel],
               topk_rows=[topk.num_rows], compacted=[compacted])
    return pa.table(out, schema=COVISIT_OUT_SCHEMA)


def _write_counts(job: MergeJob, bucket: int, entry: dict | None, parts: list, ids: pa.Array, n_stored_ids: int,
                  d_keys: np.ndarray, d_counts: np.ndarray, rows: int, max_segments: int,
                  compact_over_base: float) -> tuple[dict, str | None]:
    """Write the bucket's new count files (base, segment or merged segment; the id file when ids were added)
    and return its new entry and what was compacted (module docstring)."""
    prefix = f"{job.vdir}/{COVISIT_COUNTS}/bucket-{bucket:05d}"
    if entry and len(ids) == n_stored_ids:
        ids_rel = entry["ids"]
    else:
        ids_rel = f"{prefix}.ids.parquet"
        write_parquet(pa.Table.from_arrays([ids], schema=COVISIT_IDS_SCHEMA), job.abspath(ids_rel))
    common = {"bucket": bucket, "ids": ids_rel, "n_ids": len(ids), "rows": rows}

    def base(keys: np.ndarray, counts: np.ndarray) -> dict:
        if len(keys) != rows or (len(counts) and counts.min() <= 0):
            raise RuntimeError(f"co-visitation bucket {bucket}: the merged counts hold {len(keys)} pairs "
                               f"(min count {counts.min() if len(counts) else None}), the tracked count is {rows} "
                               "(the stored files are inconsistent)")
        keys_rel, counts_rel = _write_part(job, f"{prefix}.base", keys, counts)
        return {**common, "path": keys_rel, "counts": counts_rel, "base_rows": len(keys), "segments": []}

    if not entry:  # a new bucket: its deltas are its counts (all positive: nothing was stored)
        return base(d_keys, d_counts), None
    segments = list(entry.get("segments", []))
    kept = {"path": entry["path"], "counts": entry["counts"], "base_rows": int(entry["base_rows"])}
    if not len(d_keys):  # every delta cancelled out: nothing to add
        return {**common, **kept, "segments": segments}, None
    seg_rows = [int(g["rows"]) for g in segments] + [len(d_keys)]
    if sum(seg_rows) > compact_over_base * int(entry["base_rows"]):
        return base(*sum_covisit_parts([*parts, (d_keys, d_counts)])), "full"
    if len(seg_rows) > max_segments:
        i = segments_to_merge(seg_rows)
        keys, counts = sum_covisit_parts([*parts[1 + i:], (d_keys, d_counts)])
        keys_rel, counts_rel = _write_part(job, f"{prefix}.seg-merged", keys, counts)
        merged = {"keys": keys_rel, "counts": counts_rel, "rows": len(keys)}
        return {**common, **kept, "segments": [*segments[:i], *([merged] if len(keys) else [])]}, "segments"
    keys_rel, counts_rel = _write_part(job, f"{prefix}.seg", d_keys, d_counts)
    return {**common, **kept, "segments": [*segments, {"keys": keys_rel, "counts": counts_rel,
                                                        "rows": len(d_keys)}]}, None


def item_pairs(parts: list, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every stored pair of the items `items` (sorted unique codes): the key range [a << 32, (a + 1) << 32)
    of each part, summed (zero counts dropped)."""
    lo_keys, hi_keys = items << COVISIT_CODE_BITS, (items + 1) << COVISIT_CODE_BITS
    out = []
    for keys, counts in parts:
        lo, hi = np.searchsorted(keys, lo_keys), np.searchsorted(keys, hi_keys)
        sel = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(items) else np.empty(0, np.int64)
        out.append((np.asarray(keys[sel]), np.asarray(counts[sel])))
    return sum_covisit_parts(out)


def topk_update(old_topk: pa.Table, ids: pa.Array, parts: list, d_keys: np.ndarray, d_counts: np.ndarray,
                new_counts: np.ndarray, k: int) -> pa.Table:
    """The bucket's new top-K table: stored rows of items without a delta, recomputed rows for the others
    (module docstring). `d_keys` / `d_counts`: this run's summed deltas (sorted keys), `new_counts` their
    pairs' counts after it; `parts`: the stored (keys, counts) arrays."""
    d_a = d_keys >> COVISIT_CODE_BITS
    changed = np.unique(d_a)
    negative = np.unique(d_a[d_counts < 0])
    positive = np.setdiff1d(changed, negative, assume_unique=True)
    if old_topk.num_rows:
        items = _codes(_plain(old_topk["item_id"]), ids, "the top-K file")
        lengths = pc.list_value_length(one_array(old_topk["neighbors"])).to_numpy(zero_copy_only=False)
        t_keys = (np.repeat(items, lengths) << COVISIT_CODE_BITS) | _codes(
            _plain(pc.list_flatten(one_array(old_topk["neighbors"]))), ids, "the top-K file")
        t_counts = pc.list_flatten(one_array(old_topk["scores"])).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        items = t_keys = t_counts = np.empty(0, np.int64)
    # Positive-only items: stored top-K members (their stored score, unless the delta touches them) ...
    sel = np.isin(t_keys >> COVISIT_CODE_BITS, positive)
    t_keys, t_counts = t_keys[sel], t_counts[sel]
    at = np.minimum(np.searchsorted(d_keys, t_keys), max(len(d_keys) - 1, 0))
    fresh_member = ~(np.asarray(d_keys[at] == t_keys) if len(d_keys) else np.zeros(len(t_keys), bool))
    d_sel = np.isin(d_a, positive)
    cand = [(t_keys[fresh_member], t_counts[fresh_member]), (d_keys[d_sel], new_counts[d_sel])]
    # ... plus the delta pairs with their new counts; every pair of an item with a negative delta.
    if len(negative):
        n_sel = np.isin(d_a, negative)
        cand.append(sum_covisit_parts([item_pairs(parts, negative), (d_keys[n_sel], d_counts[n_sel])]))
    keys = np.concatenate([c[0] for c in cand])
    counts = np.concatenate([c[1] for c in cand])
    keys, counts = keys[counts > 0], counts[counts > 0]  # a pair whose count fell to 0 is gone
    ranks = string_ranks(ids)
    ca, cb = keys >> COVISIT_CODE_BITS, keys & COVISIT_CODE_MASK
    order = np.lexsort((ranks[cb], -counts, ranks[ca]))  # item asc, count desc, neighbour asc (bytewise)
    ca, cb, counts = ca[order], cb[order], counts[order]
    first = np.ones(len(ca), dtype=bool)
    first[1:] = ca[1:] != ca[:-1]
    starts = np.flatnonzero(first)
    rank = np.arange(len(ca)) - np.repeat(starts, np.diff(np.append(starts, len(ca))))
    top = rank < k
    ca, cb, counts = ca[top], cb[top], counts[top]
    starts = np.flatnonzero(np.concatenate([[True], ca[1:] != ca[:-1]])) if len(ca) else np.empty(0, np.int64)
    offsets = np.concatenate([starts, [len(ca)]]).astype(np.int32)
    fresh = pa.Table.from_arrays(
        [ids.take(pa.array(ca[starts])), pa.ListArray.from_arrays(pa.array(offsets), ids.take(pa.array(cb))),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(counts, pa.int64()))],
        schema=COVISIT_TOPK_SCHEMA)
    keep_old = pa.array(~np.isin(items, changed), pa.bool_())
    out = pa.concat_tables([old_topk.filter(keep_old).cast(COVISIT_TOPK_SCHEMA), fresh])
    return out.sort_by("item_id")


__all__ = ["COMPACT_WHEN_SEGMENT_ROWS_OVER_BASE_ROWS", "COVISIT_OUT_SCHEMA", "MAX_COVISIT_SEGMENTS",
           "merge_covisit_bucket", "topk_table"]
