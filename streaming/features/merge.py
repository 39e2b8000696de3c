"""The two Ray Data stages of a feature run; they run in Ray workers and write files directly.

Stage 1 (`merge_user_bucket`, one task per user bucket): fold the bucket's new events into its stored
sequences (segments, `streaming.features.tables`), write the bucket's new files, and return the
bucket's deltas -- popularity +-counts and trending contributions, co-visitation +-pair counts, the
bucket's new manifest entry.
Stage 2 (`streaming.features.covisit_merge.merge_covisit_bucket`, one task per item bucket): the pair
deltas into the co-visitation counts and top-K files.

Stage 1, per touched user, one of two paths:

* Append (the usual case): every new event of the user sorts after the user's stored last event (the
  bucket's state file keeps its (ts, partition, offset)) and no new event id's 64-bit hash is among the
  bucket's stored hashes. Then the new sequence is the stored one + the new events (sorted, deduplicated
  among themselves), exactly: popularity +1 per kept event, co-visitation + the pairs that involve a new
  position, which reach back at most `covisit_window` stored events (the state's tail). The segment gets
  an append row. Cost: O(new events + window) per user, no stored sequence read.
* Exact (a late event, a hash hit -- a duplicate or, rarely, a collision -- or a null event id): read the
  bucket's stored rows of these users (base + segments, merged; only the Parquet row groups that hold
  them), explode, re-sort, dedup the union by
  (user, event_id) keeping the first in (ts, partition, offset) order, and emit exact per-user
  differences: an event that the merge *added* counts +1 and one it *removed* (an older stored event
  replaced by an earlier-ordered duplicate) counts -1; co-visitation subtracts the pairs of the user's old
  sequence and adds those of the new one, restricted to pairs touching the first changed position (the
  prefix before it is identical in both). The segment gets a replacement row (the whole sequence).

So integer columns equal a full recompute exactly, whatever order files arrive in.

Cost of stage 1 per touched bucket: the new events, plus reading the bucket's state file (one row per
stored user) and its event-id hashes (8 bytes per stored event; read, never rewritten), plus writing the
state file (per user) and one segment and hash file with only this run's rows. The stored sequences are
read only for exact-path users (the row groups, of `SEQUENCE_ROW_GROUP_USERS` users, that hold them).
Compaction (`_write_bucket`): past `MAX_SEGMENTS` segments the newest ones merge into one (size tiers);
when the segments outgrow `COMPACT_WHEN_APPENDED_OVER_BASE` x the base, the bucket is rewritten into a
new base. A run that compacts costs more (up to a full bucket rewrite); amortized, each stored byte is
rewritten a bounded number of times per doubling of the history, so the mean per run follows the new
data (bench/features_scale.py reports the mean and the max over its repeats).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.events import EVENT_FEATURE_COLUMNS
from streaming.features.store import write_array, write_parquet
from streaming.features.tables import (
    REPLACE,
    SEGMENT_SCHEMA,
    SEQUENCE_ROW_GROUP_USERS,
    SEQUENCE_SCHEMA,
    SEQUENCE_STATE_SCHEMA,
    SEQUENCES,
    bucket_of,
    event_id_hashes,
    merge_sequence_rows,
    read_parquet,
    read_sequence_bucket,
)
from streaming.ray_runtime import run_as_batch_work

# Sequence segments (streaming.features.tables): past this many segments in a bucket, the newest ones are
# merged into one (size tiers, `segments_to_merge`), so a reader opens at most this many + 1 files.
MAX_SEGMENTS = 8
# A bucket whose segments hold more bytes than this x its base's is compacted into a new base. Each full
# compaction at base size B is followed by at least B appended bytes before the next: amortized, a byte
# is rewritten a constant number of times (about 1 / this).
COMPACT_WHEN_APPENDED_OVER_BASE = 1.0

# The log columns a merge reads, as a list (what Ray Data's and pyarrow's `select` take).
EVENT_COLUMNS_READ = list(EVENT_FEATURE_COLUMNS)
_SORT_KEYS = [("user_id", "ascending"), ("ts", "ascending"), ("partition", "ascending"), ("offset", "ascending")]

# What a user-bucket task returns, one table of three kinds of rows (one schema, so Ray Data
# can carry them as one dataset):
#   "seq":  key = the bucket file it wrote, rows/events = users/events in it, read = new event
#           rows it read, touched = users they touched, ts = their max ts, count = pair rows emitted;
#   "pop":  key = item, count = count delta, trending delta = weight * 2^((ts - ref_ts)/half_life);
#   "pair": key = item_a, item_b, count = pair-count delta, bucket = the item bucket of item_a.
DELTA_SCHEMA = pa.schema(
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
def _buckets_of(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    return np.fromiter((bucket_of(v, buckets) for v in values.to_pylist()), dtype=np.int32, count=len(values))


def one_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one contiguous array (what `take`, `is_in` value sets and list builders need)."""
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def runs(sorted_col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """For a sorted column: the run index of every row and the first row of every run."""
    n = len(sorted_col)
    change = np.ones(n, dtype=bool)
    if n > 1:
        col = one_array(sorted_col)
        change[1:] = pc.fill_null(pc.not_equal(col.slice(1), col.slice(0, n - 1)), True).to_numpy(
            zero_copy_only=False
        )
    starts = np.flatnonzero(change)
    return np.cumsum(change) - 1, starts


def list_array(values: pa.Array | pa.ChunkedArray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), one_array(values))


@dataclass(frozen=True)
class MergeJob:
    """What a Ray task needs to know about the run (pickled into every task)."""

    root: str  # features_dir, absolute
    vdir: str  # this run's version directory name
    user_buckets: int
    covisit_buckets: int
    window: int
    topk: int
    half_life_ms: float
    old_sequences: dict[int, dict] = field(default_factory=dict)  # bucket -> its manifest entry (tables.py)
    old_counts: dict[int, dict] = field(default_factory=dict)  # item bucket -> its covisit_counts manifest entry (tables.py)
    old_topk: dict[int, str] = field(default_factory=dict)
    # Compaction of sequence segments (the job passes `MAX_SEGMENTS` / `COMPACT_WHEN_APPENDED_OVER_BASE`
    # as they are when the run starts: a test can lower them for the workers too).
    max_segments: int = 8
    compact_over_base: float = 1.0

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)


# --------------------------------------------------------------------------------------------
# Ray Data stage 1: new events -> per-user-bucket merge
# --------------------------------------------------------------------------------------------


def above_watermarks(batch: pa.Table, watermarks: dict[int, int]) -> pa.Table:
    """The rows whose offset is above their partition's watermark ({partition: last offset done})."""
    if batch.num_rows == 0 or not watermarks:
        return batch
    part = batch["partition"].to_numpy()
    uniq, inv = np.unique(part, return_inverse=True)
    wm = np.array([watermarks.get(int(p), -1) for p in uniq], dtype=np.int64)
    return batch.filter(pa.array(batch["offset"].to_numpy() > wm[inv]))


def prepare_events(batch: pa.Table, *, watermarks: dict[int, int], buckets: int) -> pa.Table:
    run_as_batch_work()  # a Ray Data task: serving on the same machine keeps its CPU share
    """Stage 1's input: new event rows (the columns features read), tagged with their user bucket."""
    batch = above_watermarks(batch.select(EVENT_COLUMNS_READ), watermarks)
    return batch.append_column("bucket", pa.array(_buckets_of(batch["user_id"], buckets), pa.int32()))


# The `sequences` list column that holds each event column read (`user_id` is the row's key).
SEQUENCE_LIST_OF = {"event_id": "event_ids", "item_id": "item_ids", "type": "types", "ts": "ts",
                    "scene": "scenes", "partition": "partitions", "offset": "offsets"}


# The sequence columns worth a Parquet dictionary (few distinct values). Event ids, user ids, times and
# offsets are (nearly) unique: trying a dictionary on them first costs time for nothing. Measured on a
# 75k-event bucket: writes 2x faster, file 30% smaller.
SEQUENCE_DICTIONARY_COLUMNS = [f"{c}.list.element" for c in ("item_ids", "types", "scenes", "partitions")]


def _explode(seq: pa.Table) -> pa.Table:
    """Stored sequences -> one row per event, columns as read from the log (+ its position
    `old_pos` in the user's list)."""
    lengths = pc.list_value_length(one_array(seq["item_ids"])).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(seq.num_rows), lengths)
    starts = np.cumsum(lengths) - lengths
    old_pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    users = one_array(seq["user_id"]).take(pa.array(rows, pa.int64()))
    columns = {c: users if c == "user_id" else pc.list_flatten(one_array(seq[SEQUENCE_LIST_OF[c]]))
               for c in EVENT_COLUMNS_READ}
    return pa.table({**columns, "old_pos": pa.array(old_pos, pa.int64())})


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
    """`n` rows of `DELTA_SCHEMA` of one kind; columns not given are null."""
    arrays = [pa.array([kind] * n, pa.string())]
    for f in list(DELTA_SCHEMA)[1:]:
        v = cols.get(f.name)
        if v is None:
            arrays.append(pa.nulls(n, f.type))
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arrays.append(v.cast(f.type))
        else:
            arrays.append(pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=DELTA_SCHEMA)


def merge_user_bucket(group: pa.Table, *, job: MergeJob) -> pa.Table:
    run_as_batch_work()
    """Fold one user bucket's new events into its stored segments; write the bucket's new files;
    return the bucket's deltas (see `DELTA_SCHEMA`; the "seq" row's `key` is the new manifest entry, JSON).

    Reads the bucket's state and hash files, not its sequences, unless a user needs the exact path
    (module docstring)."""
    group = group.combine_chunks()
    bucket = int(group["bucket"][0].as_py())
    new = group.select(EVENT_COLUMNS_READ)
    n_read = new.num_rows
    max_ts = pc.max(new["ts"]).as_py()
    entry = job.old_sequences.get(bucket)
    state = (read_parquet(job.abspath(entry["state"]), SEQUENCE_STATE_SCHEMA) if entry and entry.get("state")
             else SEQUENCE_STATE_SCHEMA.empty_table())
    stored_hashes = [np.load(job.abspath(h)) for h in _hash_files(entry)]

    # Which users take the exact path: an event that sorts at or before the user's stored last event
    # (late), or whose event-id hash is stored in the bucket already (maybe a duplicate), or a null id.
    new_h, new_null = event_id_hashes(new["event_id"])
    suspect = new_null.copy()
    for stored in stored_hashes:
        at = np.searchsorted(stored, new_h)
        inside = at < len(stored)
        suspect[inside] |= stored[at[inside]] == new_h[inside]
    if state.num_rows:
        has, si = _lookup(new["user_id"], state)
        lts, lp, lo = (state[c].to_numpy()[si] for c in ("last_ts", "last_partition", "last_offset"))
        ts, part, off = (new[c].to_numpy() for c in ("ts", "partition", "offset"))
        late = has & ((ts < lts) | ((ts == lts) & ((part < lp) | ((part == lp) & (off <= lo)))))
        suspect |= late
    slow_users = pc.unique(new["user_id"].filter(pa.array(suspect))) if suspect.any() else pa.array([], pa.string())
    is_slow = pc.is_in(new["user_id"], value_set=slow_users)
    fast_new, slow_new = new.filter(pc.invert(is_slow)), new.filter(is_slow)

    out: list[pa.Table] = []
    rows: list[pa.Table] = []
    states: list[pa.Table] = []
    n_pairs = 0
    if fast_new.num_rows:
        seg_rows, st, deltas, n = _append_users(fast_new, state, job)
        rows.append(seg_rows)
        states.append(st)
        out += deltas
        n_pairs += n
    if slow_new.num_rows:
        old = (read_sequence_bucket(job.root, entry, users=one_array(slow_users)) if entry
               else SEQUENCE_SCHEMA.empty_table())
        full_rows, deltas, n = _exact_merge(old, slow_new, job)
        rows.append(full_rows.append_column(REPLACE, pa.array(np.ones(full_rows.num_rows, bool))))
        states.append(_state_of(full_rows, job.window))
        out += deltas
        n_pairs += n
    seg = pa.concat_tables(rows).sort_by("user_id")
    touched = one_array(seg["user_id"])
    state = pa.concat_tables([state.filter(pc.invert(pc.is_in(state["user_id"], value_set=touched))),
                              *states]).sort_by("user_id")
    new_entry = _write_bucket(job, bucket, entry, seg, np.unique(new_h[~new_null]), state)
    out.append(_delta_rows("seq", 1, bucket=[bucket], key=[json.dumps(new_entry, sort_keys=True)], count=[n_pairs],
                           ts=[max_ts], rows=[new_entry["rows"]], events=[new_entry["events"]], read=[n_read],
                           touched=[seg.num_rows]))
    return pa.concat_tables(out)


def _lookup(users: pa.Array | pa.ChunkedArray, state: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """For each of `users`: whether `state` has a row for it, and that row (0 when not)."""
    si = pc.index_in(users, value_set=one_array(state["user_id"]))
    has = pc.is_valid(si).to_numpy(zero_copy_only=False)
    return has, pc.fill_null(si, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _hash_files(entry: dict | None) -> list[str]:
    if not entry:
        return []
    return [f for f in [entry.get("hashes"), *(s.get("hashes") for s in entry.get("segments", []))] if f]


def _pop_deltas(items: pa.Array, codes: np.ndarray, ts: np.ndarray, sign: np.ndarray, job: MergeJob) -> list[pa.Table]:
    """"pop" rows: per item, the summed +-1 and trending weight of the changed events (`codes` into `items`)."""
    if not len(codes):
        return []
    n_codes = max(len(items), 1)
    ref = int(ts.max())  # local reference; the driver rescales to the global ref_ts
    weight = sign * np.exp2((ts - ref) / job.half_life_ms)
    cnt = np.bincount(codes, weights=sign, minlength=n_codes)
    wsum = np.bincount(codes, weights=weight, minlength=n_codes)
    nz = np.flatnonzero((cnt != 0) | (wsum != 0))
    return [_delta_rows("pop", len(nz), key=items.take(pa.array(nz, pa.int64())),
                        count=cnt[nz].round().astype(np.int64), ts=np.full(len(nz), ref, dtype=np.int64),
                        weight=wsum[nz])]


def _pair_deltas(items: pa.Array, plus: np.ndarray, minus: np.ndarray, job: MergeJob) -> tuple[list[pa.Table], int]:
    """"pair" rows from directed pair keys (a * len(items) + b) added / removed."""
    if not len(plus) and not len(minus):
        return [], 0
    n_codes = max(len(items), 1)
    keys, inv = np.unique(np.concatenate([plus, minus]), return_inverse=True)
    delta = np.bincount(inv, weights=np.concatenate([np.ones(len(plus)), -np.ones(len(minus))]))
    delta = delta.round().astype(np.int64)
    nz = np.flatnonzero(delta != 0)
    a, b = keys[nz] // n_codes, keys[nz] % n_codes
    code_bucket = _buckets_of(items, job.covisit_buckets)
    return [_delta_rows("pair", len(nz), bucket=code_bucket[a], key=items.take(pa.array(a, pa.int64())),
                        item_b=items.take(pa.array(b, pa.int64())), count=delta[nz])], len(nz)


def _dedup_first(sorted_events: pa.Table) -> np.ndarray:
    """Rows (sorted by user, ts, partition, offset) to keep: the first of each (user, event_id)."""
    n = sorted_events.num_rows
    event_id = sorted_events["event_id"]
    if event_id.null_count:  # the contract forbids it; never let such events collapse into one
        position = pc.binary_join_element_wise(pc.cast(sorted_events["partition"], pa.string()),
                                               pc.cast(sorted_events["offset"], pa.string()), "\x00:")
        event_id = pc.coalesce(event_id, position)
    first = (
        pa.table({"u": sorted_events["user_id"], "e": event_id, "i": np.arange(n, dtype=np.int64)})
        .group_by(["u", "e"], use_threads=False)
        .aggregate([("i", "min")])["i_min"]
        .to_numpy()
    )
    kept = np.zeros(n, dtype=bool)
    kept[first] = True
    return kept


def _append_users(new: pa.Table, state: pa.Table, job: MergeJob) -> tuple[pa.Table, pa.Table, list[pa.Table], int]:
    """The plain appends: users whose new events all sort after their stored last event and hit no stored
    event-id hash. Their sequences are the stored ones + the new events (sorted, deduplicated among
    themselves), so the segment gets append rows, popularity +1 per kept event, and co-visitation the
    pairs that involve a new position: with the stored tail only (state), never the stored sequence.
    Returns (segment rows, the users' new state rows, delta tables, pair delta rows)."""
    new = new.sort_by(_SORT_KEYS)
    kept = new.filter(pa.array(_dedup_first(new))).combine_chunks()
    uidx, ustart = runs(kept["user_id"])
    users = one_array(kept["user_id"]).take(pa.array(ustart, pa.int64()))
    counts = np.bincount(uidx, minlength=len(ustart)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    seg_cols = {"user_id": users, **{lists: list_array(kept[col], offsets) for col, lists in SEQUENCE_LIST_OF.items()},
                "n": pa.array(counts, pa.int64()), REPLACE: pa.array(np.zeros(len(users), bool))}
    seg_rows = pa.Table.from_arrays([seg_cols[c] for c in SEGMENT_SCHEMA.names], schema=SEGMENT_SCHEMA)

    # The users' stored n and tail (none for a user new to the bucket).
    if state.num_rows:
        has, idx = _lookup(users, state)
        old_n = np.where(has, state["n"].to_numpy()[idx], 0).astype(np.int64)
        # (a user new to the bucket: a null tail, i.e. none)
        tails = one_array(state["tail"]).take(pa.array(idx, mask=~has))
    else:
        old_n = np.zeros(len(users), np.int64)
        tails = pa.nulls(len(users), pa.list_(pa.string()))
    tail_len = pc.fill_null(pc.list_value_length(tails), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    tail_uidx = np.repeat(np.arange(len(users)), tail_len)
    tail_pos = old_n[tail_uidx] - tail_len[tail_uidx] + (np.arange(len(tail_uidx)) - np.repeat(
        np.cumsum(tail_len) - tail_len, tail_len))
    new_pos = old_n[uidx] + (np.arange(len(uidx)) - offsets[:-1][uidx])
    all_items = pa.concat_arrays([pc.list_flatten(tails).cast(pa.string()), one_array(kept["item_id"])])
    all_uidx = np.concatenate([tail_uidx, uidx])
    all_pos = np.concatenate([tail_pos, new_pos])
    order = np.lexsort((all_pos, all_uidx))
    all_uidx, all_pos = all_uidx[order], all_pos[order]
    item_dict = pc.dictionary_encode(all_items).combine_chunks() if isinstance(all_items, pa.ChunkedArray) \
        else pc.dictionary_encode(all_items)
    all_codes = item_dict.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    items = item_dict.dictionary
    new_codes = all_codes[len(tail_uidx):]
    all_codes = all_codes[order]

    deltas = _pop_deltas(items, new_codes, kept["ts"].to_numpy(), np.ones(len(new_codes)), job)
    plus = _pair_keys(all_uidx, all_pos, all_codes, old_n.astype(np.int64), job.window, max(len(items), 1))
    pairs, n_pairs = _pair_deltas(items, plus, np.empty(0, np.int64), job)

    # New state: n grows, the last event is the last kept one, the tail is the last `window` of tail + new.
    last = offsets[1:] - 1
    total = tail_len + counts
    within = all_pos - (old_n - tail_len)[all_uidx]  # 0-based position inside the user's tail + new
    in_tail = within >= (total - np.minimum(total, job.window))[all_uidx]
    tail_out = all_items.take(pa.array(order[in_tail]))
    tail_offsets = np.concatenate([[0], np.cumsum(np.minimum(total, job.window))])
    st = pa.Table.from_arrays(
        [users, pa.array(old_n + counts, pa.int64()),
         *(one_array(kept[c]).take(pa.array(last)) for c in ("ts", "partition", "offset")),
         pa.ListArray.from_arrays(pa.array(tail_offsets, pa.int32()), tail_out)],
        schema=SEQUENCE_STATE_SCHEMA)
    return seg_rows, st, deltas + pairs, n_pairs


def _state_of(seq: pa.Table, window: int) -> pa.Table:
    """`SEQUENCE_STATE_SCHEMA` rows of full sequence rows (the users that took the exact path)."""
    lengths = pc.list_value_length(one_array(seq["item_ids"])).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(lengths)
    last = pa.array(ends - 1, pa.int64())
    keep_n = np.minimum(lengths, window)
    idx = np.concatenate([np.arange(e - k, e) for e, k in zip(ends, keep_n)]) if len(ends) else np.empty(0, np.int64)
    tail = pc.list_flatten(one_array(seq["item_ids"])).take(pa.array(idx.astype(np.int64)))
    return pa.Table.from_arrays(
        [one_array(seq["user_id"]), pa.array(lengths, pa.int64()),
         *(pc.list_flatten(one_array(seq[c])).take(last) for c in ("ts", "partitions", "offsets")),
         pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(keep_n)]), pa.int32()), tail)],
        schema=SEQUENCE_STATE_SCHEMA)


def _exact_merge(old: pa.Table, new: pa.Table, job: MergeJob) -> tuple[pa.Table, list[pa.Table], int]:
    """The exact path for `new` events of users whose `old` full sequences (SEQUENCE_SCHEMA rows) are given:
    explode, re-sort, dedup the union; full replacement rows and exact +-deltas (module docstring).
    Returns (full rows of the touched users, delta tables, pair delta rows)."""
    old_events = _explode(old)
    new = new.append_column("old_pos", pa.array(np.full(new.num_rows, -1, dtype=np.int64)))
    combined = pa.concat_tables([old_events, new.cast(old_events.schema)]).combine_chunks()
    combined = combined.take(pc.sort_indices(combined, sort_keys=_SORT_KEYS))
    kept = _dedup_first(combined)
    old_pos = combined["old_pos"].to_numpy()
    is_old = old_pos >= 0
    uidx, ustart = runs(combined["user_id"])
    n_users = len(ustart)

    new_rows = np.flatnonzero(kept)
    new_uidx = uidx[new_rows]
    new_counts = np.bincount(new_uidx, minlength=n_users)
    new_first = np.concatenate([[0], np.cumsum(new_counts)[:-1]])
    new_pos = np.arange(len(new_rows), dtype=np.int64) - new_first[new_uidx]
    added_new = ~is_old[new_rows]  # over new_rows
    removed = np.flatnonzero(is_old & ~kept)  # over combined rows

    kept_t = combined.take(pa.array(new_rows, pa.int64()))
    offsets = np.concatenate([[0], np.cumsum(new_counts)])
    columns = {
        "user_id": one_array(combined["user_id"]).take(pa.array(ustart, pa.int64())),
        **{lists: list_array(kept_t[col], offsets) for col, lists in SEQUENCE_LIST_OF.items()},
        "n": pa.array(new_counts, pa.int64()),
    }
    full_rows = pa.Table.from_arrays([columns[c] for c in SEQUENCE_SCHEMA.names], schema=SEQUENCE_SCHEMA)

    item_dict = pc.dictionary_encode(combined["item_id"]).combine_chunks()
    codes = item_dict.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    items = item_dict.dictionary
    n_codes = max(len(items), 1)
    ts = combined["ts"].to_numpy()

    # Popularity: +1 per added event, -1 per removed one.
    changed = np.concatenate([new_rows[added_new], removed])
    sign = np.concatenate([np.ones(int(added_new.sum())), -np.ones(len(removed))])
    deltas = _pop_deltas(items, codes[changed], ts[changed], sign, job)

    # Co-visitation: pairs(new sequence) - pairs(old sequence) per touched user, from the first change on.
    never = np.iinfo(np.int64).max // 2
    first_changed = np.full(n_users, never, dtype=np.int64)
    np.minimum.at(first_changed, new_uidx[added_new], new_pos[added_new])
    np.minimum.at(first_changed, uidx[removed], old_pos[removed])
    old_rows = np.flatnonzero(is_old)
    plus = _pair_keys(new_uidx, new_pos, codes[new_rows], first_changed, job.window, n_codes)
    minus = _pair_keys(uidx[old_rows], old_pos[old_rows], codes[old_rows], first_changed, job.window, n_codes)
    pairs, n_pairs = _pair_deltas(items, plus, minus, job)
    return full_rows, deltas + pairs, n_pairs


def _write_bucket(job: MergeJob, bucket: int, entry: dict | None, seg: pa.Table, new_hashes: np.ndarray,
                  state: pa.Table) -> dict:
    """Write this run's files of one bucket and return its new manifest entry: a new base when the bucket
    had none, else a new segment -- then compaction (module docstring): a full one into a new base when the
    appended bytes exceed `job.compact_over_base` (`COMPACT_WHEN_APPENDED_OVER_BASE`) x the base's, else, past
    `job.max_segments` (`MAX_SEGMENTS`), a merge of the newest segments (`segments_to_merge`)."""
    prefix = f"{job.vdir}/{SEQUENCES}/bucket-{bucket:05d}"
    state_rel = f"{prefix}.state.parquet"
    write_parquet(state, job.abspath(state_rel))
    common = {"bucket": bucket, "state": state_rel, "rows": state.num_rows,
              "events": int(pc.sum(state["n"]).as_py() or 0)}
    if not entry or not entry.get("path"):
        return {**common, **_write_base(job, prefix, seg.drop_columns([REPLACE]), new_hashes)}
    seg_rel, hashes_rel = f"{prefix}.seg.parquet", f"{prefix}.seg.hashes.npy"
    write_parquet(seg, job.abspath(seg_rel), use_dictionary=SEQUENCE_DICTIONARY_COLUMNS,
                  row_group_size=SEQUENCE_ROW_GROUP_USERS)
    write_array(new_hashes, job.abspath(hashes_rel))
    segments = [*entry.get("segments", []),
                {"path": seg_rel, "hashes": hashes_rel, "bytes": os.path.getsize(job.abspath(seg_rel))}]
    base_bytes = int(entry.get("base_bytes") or 0)
    if sum(s["bytes"] for s in segments) > job.compact_over_base * base_bytes:
        merged = read_sequence_bucket(job.root, {"path": entry["path"], "segments": segments})
        hashes = np.unique(np.concatenate([np.load(job.abspath(h)) for h in _hash_files(
            {"hashes": entry.get("hashes"), "segments": segments})]))
        _remove(job, seg_rel, hashes_rel)  # merged into the base: referenced by no manifest
        return {**common, **_write_base(job, prefix, merged, hashes), "compacted": "full"}
    if len(segments) > job.max_segments:
        i = segments_to_merge([s["bytes"] for s in segments])
        merged = _merge_segments(job, segments[i:])
        m_rel, mh_rel = f"{prefix}.seg-merged.parquet", f"{prefix}.seg-merged.hashes.npy"
        write_parquet(merged, job.abspath(m_rel), use_dictionary=SEQUENCE_DICTIONARY_COLUMNS,
                      row_group_size=SEQUENCE_ROW_GROUP_USERS)
        write_array(np.unique(np.concatenate([np.load(job.abspath(s["hashes"])) for s in segments[i:]])),
                    job.abspath(mh_rel))
        _remove(job, seg_rel, hashes_rel)
        segments = [*segments[:i], {"path": m_rel, "hashes": mh_rel, "bytes": os.path.getsize(job.abspath(m_rel))}]
        return {**common, "path": entry["path"], "hashes": entry.get("hashes"), "base_bytes": base_bytes,
                "segments": segments, "compacted": "segments"}
    return {**common, "path": entry["path"], "hashes": entry.get("hashes"), "base_bytes": base_bytes,
            "segments": segments}


def _remove(job: MergeJob, *rels: str) -> None:
    for rel in rels:
        os.remove(job.abspath(rel))


def _write_base(job: MergeJob, prefix: str, rows: pa.Table, hashes: np.ndarray) -> dict:
    rel, hashes_rel = f"{prefix}.parquet", f"{prefix}.hashes.npy"
    write_parquet(rows.cast(SEQUENCE_SCHEMA), job.abspath(rel), use_dictionary=SEQUENCE_DICTIONARY_COLUMNS,
                  row_group_size=SEQUENCE_ROW_GROUP_USERS)
    write_array(hashes, job.abspath(hashes_rel))
    return {"path": rel, "hashes": hashes_rel, "base_bytes": os.path.getsize(job.abspath(rel)), "segments": []}


def segments_to_merge(sizes: list[int]) -> int:
    """Where the newest segments to merge start (at least the last two): extend the run backwards while
    the next older segment is no larger than the run -- size tiers, so a byte is merged O(log) times
    between full compactions, and the segments stay few."""
    i = len(sizes) - 2
    run = sizes[-1] + sizes[-2]
    while i > 0 and sizes[i - 1] <= run:
        i -= 1
        run += sizes[i]
    return i


def _merge_segments(job: MergeJob, segments: list[dict]) -> pa.Table:
    """Consecutive segments -> one segment (`SEGMENT_SCHEMA`): per user, the rows from its newest replacement
    on, concatenated, flagged `replace` when such a replacement is among them."""
    parts = [pq.read_table(job.abspath(s["path"]), schema=SEGMENT_SCHEMA) for s in segments]
    merged = merge_sequence_rows(parts)
    flags = pa.concat_tables([p.select(["user_id", REPLACE]) for p in parts]).combine_chunks()
    replaced = flags.filter(pc.fill_null(flags[REPLACE], False))
    flag = pc.is_in(merged["user_id"], value_set=one_array(pc.unique(replaced["user_id"])))
    return merged.append_column(REPLACE, flag)


def only_kind(batch: pa.Table, *, kinds: tuple[str, ...]) -> pa.Table:
    """The delta rows of the given kinds ("seq", "pop", "pair")."""
    return batch.filter(pc.is_in(batch["kind"], value_set=pa.array(kinds, pa.string())))

