"""Stage 2 of a feature run (`merge_covisit_bucket`, one Ray Data task per item bucket): sum the pair
deltas of stage 1 (`streaming.features.merge`) into the stored co-visitation counts and write the counts
and top-K files -- linear in the stored bucket (a sorted merge on integer codes, no hash aggregation or
re-sort of the stored pairs), with top-K recomputed only for the items that have a delta.

Cost: a run reads and rewrites every item bucket its pair deltas touch, in full, and 10^5 new events
touch nearly every item of a catalog of 10^4-10^5 items: the stage follows the stored pairs (~0.3 s per
million on 2 cores, bench/features_scale.py), the part of an incremental run that is not flat
(docs/scaling.md says what would make it so).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.features.merge import MergeJob, list_array, one_array, runs
from streaming.features.store import write_parquet
from streaming.features.tables import (
    COVISIT_COUNTS,
    COVISIT_COUNTS_SCHEMA,
    COVISIT_TOPK,
    COVISIT_TOPK_SCHEMA,
    read_parquet,
)
from streaming.ray_runtime import run_as_batch_work

# What a co-visitation bucket task returns: the files it wrote and their rows.
COVISIT_OUT_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("counts_path", pa.string()),
        ("counts_rows", pa.int64()),
        ("topk_path", pa.string()),
        ("topk_rows", pa.int64()),
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


def _codes(col: pa.ChunkedArray | pa.Array, ids: pa.Array) -> np.ndarray:
    """Positions of `col`'s values in `ids` (sorted, unique, holding them all). A dictionary-encoded
    column is looked up once per dictionary value, not once per row."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = []
    for c in chunks:
        if pa.types.is_dictionary(c.type):
            lut = pc.index_in(c.dictionary, value_set=ids).to_numpy(zero_copy_only=False)
            out.append(lut[c.indices.to_numpy(zero_copy_only=False)])
        else:
            out.append(pc.index_in(c, value_set=ids).to_numpy(zero_copy_only=False))
    codes = np.concatenate(out) if out else np.empty(0, np.int64)
    if codes.dtype.kind == "f" and np.isnan(codes).any():  # index_in gave a null: an id outside `ids`
        raise RuntimeError("co-visitation merge: an id is missing from the bucket's id list (a bug)")
    return codes.astype(np.int64)


def _sorted_ids(*cols: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The distinct ids of `cols`, sorted bytewise (the order `sort_by` gives strings)."""
    parts = []
    for col in cols:
        for c in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
            parts.append(c.dictionary if pa.types.is_dictionary(c.type) else c)
    parts = [p.cast(pa.string()) for p in parts if len(p)]
    if not parts:
        return pa.array([], pa.string())
    ids = pc.unique(pa.concat_arrays(parts))
    return ids.take(pc.sort_indices(ids))


def merge_covisit_bucket(group: pa.Table, *, job: MergeJob) -> pa.Table:
    run_as_batch_work()
    """Add one item bucket's pair deltas to its stored counts; write counts and top-K files.

    Linear in the stored bucket (no hash aggregation or sort of the stored pairs): they are sorted and unique by
    (item_a, item_b), so ids become integer codes in one sorted id list (dictionary pages: one lookup
    per distinct id), the deltas land by binary search, new pairs join in a merge of two sorted runs
    (timsort), and top-K is recomputed only for items with a delta -- from their stored top-K plus
    their delta pairs when every delta of the item is positive (a neighbour outside the stored top-K
    whose count did not change cannot overtake members whose counts only grew), from all their pairs
    otherwise."""
    bucket = int(group["bucket"][0].as_py())
    delta = (
        pa.table({"item_a": group["key"], "item_b": group["item_b"], "count": group["count"]})
        .group_by(["item_a", "item_b"], use_threads=False)
        .aggregate([("count", "sum")])
        .rename_columns(["item_a", "item_b", "count"])
    )
    delta = delta.filter(pc.not_equal(delta["count"], 0))
    old_rel, topk_rel_old = job.old_counts.get(bucket), job.old_topk.get(bucket)
    if old_rel:
        old = pq.read_table(job.abspath(old_rel), columns=COVISIT_COUNTS_SCHEMA.names,
                            read_dictionary=["item_a", "item_b"])
    else:
        old = COVISIT_COUNTS_SCHEMA.empty_table()
    old_topk = (read_parquet(job.abspath(topk_rel_old), COVISIT_TOPK_SCHEMA) if old_rel and topk_rel_old
                else COVISIT_TOPK_SCHEMA.empty_table())

    ids = _sorted_ids(old["item_a"], old["item_b"], delta["item_a"], delta["item_b"])
    n_ids = max(len(ids), 1)
    old_keys = _codes(old["item_a"], ids) * n_ids + _codes(old["item_b"], ids)
    old_counts = old["count"].to_numpy().astype(np.int64)
    if len(old_keys) > 1 and not bool(np.all(old_keys[1:] > old_keys[:-1])):  # a file not written by this code
        order = np.argsort(old_keys, kind="stable")
        old_keys, old_counts = old_keys[order], old_counts[order]
        if not bool(np.all(old_keys[1:] > old_keys[:-1])):
            raise RuntimeError(f"co-visitation bucket {bucket}: duplicate pairs in {old_rel}")
    d_a, d_b = _codes(delta["item_a"], ids), _codes(delta["item_b"], ids)
    d_keys, d_counts = d_a * n_ids + d_b, delta["count"].to_numpy().astype(np.int64)

    pos = np.searchsorted(old_keys, d_keys)
    hit = pos < len(old_keys)
    hit[hit] = old_keys[pos[hit]] == d_keys[hit]
    counts = old_counts.copy()
    counts[pos[hit]] += d_counts[hit]  # d_keys are unique (summed above): no position twice
    new_keys, new_counts = d_keys[~hit], d_counts[~hit]
    new_order = np.argsort(new_keys)
    keys = np.concatenate([old_keys, new_keys[new_order]])
    counts = np.concatenate([counts, new_counts[new_order]])
    order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
    keys, counts = keys[order], counts[order]
    if len(counts) and counts.min() < 0:
        raise RuntimeError(f"co-visitation bucket {bucket}: negative pair count (stored tables are inconsistent)")
    nz = counts != 0
    keys, counts = keys[nz], counts[nz]
    merged = pa.Table.from_arrays(
        [ids.take(pa.array(keys // n_ids)), ids.take(pa.array(keys % n_ids)), pa.array(counts, pa.int64())],
        schema=COVISIT_COUNTS_SCHEMA)

    if old_rel and not topk_rel_old:  # (never written so; but then no stored top-K to start from)
        topk = topk_table(merged, job.topk)
    else:
        topk = _topk_update(old_topk, ids, keys, counts, d_a, d_b, d_counts, job.topk)
    counts_rel = topk_rel = None
    if merged.num_rows:
        counts_rel = f"{job.vdir}/{COVISIT_COUNTS}/bucket-{bucket:05d}.parquet"
        topk_rel = f"{job.vdir}/{COVISIT_TOPK}/bucket-{bucket:05d}.parquet"
        write_parquet(merged, job.abspath(counts_rel))
        write_parquet(topk, job.abspath(topk_rel))
    return pa.table(
        {"bucket": [bucket], "counts_path": [counts_rel], "counts_rows": [merged.num_rows],
         "topk_path": [topk_rel], "topk_rows": [topk.num_rows]},
        schema=COVISIT_OUT_SCHEMA,
    )


def _topk_update(old_topk: pa.Table, ids: pa.Array, keys: np.ndarray, counts: np.ndarray, d_a: np.ndarray,
                 d_b: np.ndarray, d_counts: np.ndarray, k: int) -> pa.Table:
    """The bucket's new top-K table: stored rows of items without a delta, recomputed rows for the others
    (see `merge_covisit_bucket`). `keys`/`counts`: the new counts, keys a * len(ids) + b, sorted."""
    n_ids = max(len(ids), 1)
    changed = np.unique(d_a)
    negative = np.unique(d_a[d_counts < 0])
    old_items = _codes(old_topk["item_id"], ids) if old_topk.num_rows else np.empty(0, np.int64)
    keep_old = ~np.isin(old_items, changed)
    # Candidates of the changed items: stored top-K pairs and delta pairs (positive-only items) ...
    lengths = pc.list_value_length(one_array(old_topk["neighbors"])).to_numpy(zero_copy_only=False) \
        if old_topk.num_rows else np.empty(0, np.int64)
    cand_a = np.repeat(old_items, lengths)
    cand_b = _codes(pc.list_flatten(one_array(old_topk["neighbors"])), ids) if old_topk.num_rows \
        else np.empty(0, np.int64)
    cand = np.concatenate([cand_a * n_ids + cand_b, d_a * n_ids + d_b])
    cand = cand[np.isin(cand // n_ids, changed) & ~np.isin(cand // n_ids, negative)]
    # ... and every pair of an item with a negative delta (rare: an event replaced by an earlier duplicate).
    if len(negative):
        cand = np.concatenate([cand, keys[np.isin(keys // n_ids, negative)]])
    cand = np.unique(cand)
    at = np.searchsorted(keys, cand)
    found = at < len(keys)
    found[found] = keys[at[found]] == cand[found]  # a pair whose count fell to 0 is gone
    cand, cand_counts = cand[found], counts[at[found]]
    ca, cb = cand // n_ids, cand % n_ids
    order = np.lexsort((cb, -cand_counts, ca))  # item asc, count desc, neighbour asc (ids sorted: codes too)
    ca, cb, cand_counts = ca[order], cb[order], cand_counts[order]
    first = np.ones(len(ca), dtype=bool)
    first[1:] = ca[1:] != ca[:-1]
    starts = np.flatnonzero(first)
    rank = np.arange(len(ca)) - np.repeat(starts, np.diff(np.append(starts, len(ca))))
    top = rank < k
    ca, cb, cand_counts = ca[top], cb[top], cand_counts[top]
    starts = np.flatnonzero(np.concatenate([[True], ca[1:] != ca[:-1]])) if len(ca) else np.empty(0, np.int64)
    offsets = np.concatenate([starts, [len(ca)]]).astype(np.int32)
    fresh = pa.Table.from_arrays(
        [ids.take(pa.array(ca[starts])), pa.ListArray.from_arrays(pa.array(offsets), ids.take(pa.array(cb))),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(cand_counts, pa.int64()))],
        schema=COVISIT_TOPK_SCHEMA)
    out = pa.concat_tables([old_topk.filter(pa.array(keep_old, pa.bool_())).cast(COVISIT_TOPK_SCHEMA), fresh])
    return out.sort_by("item_id")


__all__ = ["COVISIT_OUT_SCHEMA", "merge_covisit_bucket", "topk_table"]
