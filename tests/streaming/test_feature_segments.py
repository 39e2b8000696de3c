"""Issue 18, sequence segments: a feature run appends a segment per touched user bucket instead of
rewriting it, readers merge base + segments on read, compaction folds them back -- and the tables still
equal a full recompute across many runs (compactions in between), late events, duplicate event ids across
runs, partitions whose files arrive in any interleaving, and a forget rebuild."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.features import load_feature_tables, merge, run_features
from streaming.features.tables import (
    REPLACE,
    SEGMENT_SCHEMA,
    SEQUENCE_SCHEMA,
    event_id_hashes,
    iter_sequence_parts,
    merge_sequence_rows,
    read_manifest,
    sequence_entry_files,
    table_paths,
)
from tests.streaming.test_features import (
    EVENTS,
    HALF_LIFE_S,
    ITEMS,
    assert_same_tables,
    make_settings,
    random_log,
    reference,
    write,
)

# --- unit: hashes, merge on read, size tiers -----------------------------------------------------


def test_event_id_hashes_are_stable_and_spread():
    ids = [f"e{n}" for n in range(20_000)] + ["", "é-ünïcode", "x" * 300]
    h, nulls = event_id_hashes(pa.array(ids))
    assert h.dtype == np.uint64 and not nulls.any()
    assert len(np.unique(h)) == len(ids)  # no collision among these (a collision would only cost time)
    # The same id hashes the same whatever array, chunking, slice or string type it comes in.
    chunked = pa.chunked_array([pa.array(ids[:7]), pa.array(ids[7:])])
    assert np.array_equal(event_id_hashes(chunked)[0], h)
    assert np.array_equal(event_id_hashes(pa.array(ids).slice(5, 100))[0], h[5:105])
    assert np.array_equal(event_id_hashes(pa.array(ids, pa.large_string()))[0], h)
    h2, n2 = event_id_hashes(pa.array(["e1", None, "e1"]))
    assert n2.tolist() == [False, True, False] and h2[0] == h2[2] == h[1]
    assert len(event_id_hashes(pa.array([], pa.string()))[0]) == 0


def _rows(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    full = []
    for r in rows:
        items = r["item_ids"]
        full.append({"user_id": r["user_id"], "item_ids": items, "ts": list(range(len(items))),
                     "types": ["click"] * len(items),
                     "event_ids": [f"{r['user_id']}-{i}" for i in items], "scenes": [None] * len(items),
                     "partitions": [0] * len(items), "offsets": list(range(len(items))), "n": len(items),
                     **({REPLACE: r.get(REPLACE, False)} if REPLACE in schema.names else {})})
    return pa.Table.from_pylist(full, schema=schema)


def test_merge_sequence_rows_takes_rows_from_the_newest_replacement():
    base = _rows(SEQUENCE_SCHEMA, [{"user_id": "a", "item_ids": ["1", "2"]}, {"user_id": "b", "item_ids": ["3"]}])
    seg1 = _rows(SEGMENT_SCHEMA, [{"user_id": "c", "item_ids": ["9"]}, {"user_id": "a", "item_ids": ["4"]}])
    seg2 = _rows(SEGMENT_SCHEMA, [{"user_id": "b", "item_ids": ["0", "3"], REPLACE: True},
                                  {"user_id": "a", "item_ids": ["5", "6"]}])
    seg3 = _rows(SEGMENT_SCHEMA, [{"user_id": "b", "item_ids": ["7"]}])
    out = merge_sequence_rows([base, seg1, seg2, seg3])
    assert out.schema == SEQUENCE_SCHEMA
    got = {r["user_id"]: (r["item_ids"], r["n"], len(r["ts"]), len(r["scenes"])) for r in out.to_pylist()}
    assert got == {"a": (["1", "2", "4", "5", "6"], 5, 5, 5), "b": (["0", "3", "7"], 3, 3, 3), "c": (["9"], 1, 1, 1)}
    assert out["user_id"].to_pylist() == ["a", "b", "c"]  # one row per user, sorted
    some = merge_sequence_rows([base, seg1, seg2, seg3], ["item_ids", "n"])
    assert some.column_names == ["item_ids", "n"] and some["n"].to_pylist() == [5, 3, 1]
    # Segments alone (what a segment merge sees): the user with a replacement keeps it and what follows.
    assert merge_sequence_rows([seg2, seg3])["item_ids"].to_pylist() == [["5", "6"], ["0", "3", "7"]]
    assert merge_sequence_rows([base]).equals(base)


def test_segment_size_tiers():
    assert merge.segments_to_merge([100, 1, 1]) == 1  # the newest two
    assert merge.segments_to_merge([100, 2, 1, 1]) == 1  # 2 <= 1 + 1: joins the run
    assert merge.segments_to_merge([3, 2, 1, 1]) == 0
    assert merge.segments_to_merge([1, 1]) == 0


def test_table_paths_refuses_sequences(tmp_path):
    s = make_settings(tmp_path)
    with pytest.raises(ValueError, match="iter_sequence_parts"):
        table_paths(s, {"tables": {"sequences": []}}, "sequences")


# --- integration: many runs, compactions, against a full recompute ------------------------------


def _interleaved_pieces(per_part: dict[int, list], pieces: int, rng: random.Random) -> list[list[dict]]:
    """Each partition's rows in `pieces` consecutive pieces (offset order kept within a partition), the
    partitions' pieces interleaved at random: runs see partitions at different points of their log."""
    queue = []
    for p, rows in per_part.items():
        size = math.ceil(len(rows) / pieces)
        queue.append([rows[c * size:(c + 1) * size] for c in range(pieces) if rows[c * size:(c + 1) * size]])
    runs = []
    while any(queue):
        run = []
        for q in queue:
            if q and rng.random() < 0.6:
                run += q.pop(0)
        if run:
            runs.append(run)
    return runs


def _check_one_row_per_user(settings) -> None:
    m = read_manifest(settings)
    seen: list[str] = []
    for part in iter_sequence_parts(settings, m, columns=["user_id", "item_ids", "n"]):
        users = part["user_id"].to_pylist()
        assert len(users) == len(set(users))
        assert part["n"].to_pylist() == [len(x) for x in part["item_ids"].to_pylist()]
        seen += users
    assert len(seen) == len(set(seen)) == m["counts"]["users"]
    assert sorted(seen) == sorted(load_feature_tables(settings).sequences["user_id"].to_pylist())
    # Without user_id (merged on it anyway) the same values come back.
    no_key = [r for part in iter_sequence_parts(settings, m, columns=["item_ids"])
              for r in part["item_ids"].to_pylist()]
    assert len(no_key) == len(seen)


@pytest.mark.integration
@pytest.mark.parametrize("max_segments,compact_over_base", [(2, 50.0), (3, 0.3)])
def test_segments_equal_a_full_recompute(tmp_path, ray_local, monkeypatch, max_segments, compact_over_base):
    """Many small runs; the first parameters make segment merges happen (full compaction almost never),
    the second full compactions often. After every few runs the incremental tables equal one full run over
    the same log and a plain-Python recompute."""
    monkeypatch.setattr(merge, "MAX_SEGMENTS", max_segments)
    monkeypatch.setattr(merge, "COMPACT_WHEN_APPENDED_OVER_BASE", compact_over_base)
    rng = random.Random(max_segments)
    per_part, item_rows = random_log(seed=13 + max_segments, n_events=700)
    runs = _interleaved_pieces(per_part, 8, rng)
    assert len(runs) >= 8
    inc = make_settings(tmp_path / "inc", user_buckets=2)
    write(inc, ITEMS, [r for rs in item_rows.values() for r in rs])
    compactions: Counter = Counter()
    replace_rows = append_rows = 0
    written: list[dict] = []
    for k, rows in enumerate(runs):
        write(inc, EVENTS, rows)
        written += rows
        run_features(inc)
        m = read_manifest(inc)
        compactions.update(m["last_run"]["compactions"])
        assert all(len(e["segments"]) <= max_segments for e in m["tables"]["sequences"])
        for e in m["tables"]["sequences"]:
            for seg in e["segments"]:
                flags = pq.read_table(inc.features_dir / seg["path"], columns=[REPLACE])[REPLACE].to_pylist()
                replace_rows += sum(flags)
                append_rows += len(flags) - sum(flags)
        if k % 3 == 2 or k == len(runs) - 1:
            full = make_settings(tmp_path / f"full{k}", user_buckets=2)
            write(full, ITEMS, [r for rs in item_rows.values() for r in rs])
            write(full, EVENTS, written)
            run_features(full)
            assert_same_tables(load_feature_tables(inc), load_feature_tables(full))
            _check_one_row_per_user(inc)
    # The runs did exercise both row kinds (seen in segments while they last) and the compaction the
    # parameters favour.
    if compact_over_base > 1:
        assert replace_rows > 0 and append_rows > 0
    assert compactions["full" if compact_over_base < 1 else "segments"] > 0, compactions

    t = load_feature_tables(inc)
    seqs, count, trending, pairs, *_ = reference(written, [r for rs in item_rows.values() for r in rs],
                                                 inc.covisit_window, inc.covisit_topk, HALF_LIFE_S)
    assert {r["user_id"]: r["item_ids"] for r in t.sequences.to_pylist()} == seqs
    assert {r["item_id"]: r["count"] for r in t.popularity.to_pylist()} == dict(count)
    assert {(r["item_a"], r["item_b"]): r["count"] for r in t.covisit_counts.to_pylist()} == dict(pairs)
    # Garbage collection kept every file the live manifest references (older versions' bases included).
    for e in t.manifest["tables"]["sequences"]:
        assert all((inc.features_dir / f).is_file() for f in sequence_entry_files(e))


@pytest.mark.integration
def test_duplicate_of_a_stored_event_takes_the_exact_path(tmp_path, ray_local, monkeypatch):
    """A retry with the same ts (sorts after the stored original: looks like an append) is dropped because its
    event id's hash is stored; a new user in the same run appends; a late event is merged in place."""
    monkeypatch.setattr(merge, "COMPACT_WHEN_APPENDED_OVER_BASE", 100.0)  # keep the segment to look at
    s = make_settings(tmp_path, user_buckets=1, covisit_window=2)
    write(s, EVENTS, [ev_("e1", "u1", "i1", 1000, 0), ev_("e2", "u1", "i2", 2000, 1), ev_("e3", "u2", "i1", 1000, 2)])
    run_features(s)
    write(s, EVENTS, [ev_("e2", "u1", "i2", 2000, 3),  # retry: same ts, later offset
                      ev_("e4", "u1", "i3", 3000, 4),
                      ev_("e5", "u3", "i2", 500, 5),  # a new user
                      ev_("e6", "u2", "i3", 500, 6)])  # late for u2
    run_features(s)
    t = load_feature_tables(s)
    seq = {r["user_id"]: r["event_ids"] for r in t.sequences.to_pylist()}
    assert seq == {"u1": ["e1", "e2", "e4"], "u2": ["e6", "e3"], "u3": ["e5"]}
    assert {r["item_id"]: r["count"] for r in t.popularity.to_pylist()} == {"i1": 2, "i2": 2, "i3": 2}
    seg = pq.read_table(s.features_dir / t.manifest["tables"]["sequences"][0]["segments"][0]["path"])
    assert dict(zip(seg["user_id"].to_pylist(), seg[REPLACE].to_pylist())) == {"u1": True, "u2": True, "u3": False}
    counts = {(r["item_a"], r["item_b"]): r["count"] for r in t.covisit_counts.to_pylist()}
    assert counts == {("i1", "i2"): 1, ("i2", "i1"): 1, ("i1", "i3"): 2, ("i3", "i1"): 2, ("i2", "i3"): 1,
                      ("i3", "i2"): 1}


def ev_(event_id: str, user: str, item: str, ts: int, offset: int) -> dict:
    return dict(event_id=event_id, user_id=user, item_id=item, type="click", ts=ts, scene=None, context=None,
                partition=0, offset=offset, ingest_ts=0)
