"""Issue 18, the feature job at scale: the co-visitation bucket count as a setting (a change rebuilds in
the new layout, never mixes two), the co-visitation merge (exact against a plain recompute, negative
deltas included; the many-run and compaction cases are in test_covisit_segments.py), and
bench/features_scale.py's entry on a tiny log (figures, not speed)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.features import load_feature_tables, run_features
from streaming.features.job import covisit_buckets
from streaming.features.covisit_merge import merge_covisit_bucket, topk_table
from streaming.features.merge import MergeJob
from streaming.features.tables import COVISIT_COUNTS_SCHEMA, COVISIT_TOPK_SCHEMA, bucket_of, read_covisit_counts
from streaming.settings import Settings
from tests.streaming.test_features import EVENTS, ITEMS, assert_same_tables, chunks, make_settings, random_log, write


def with_buckets(settings: Settings, n: int) -> Settings:
    """`settings` with `covisit_buckets=n` (a field of Settings once the lead adds it; read by getattr)."""
    return settings.model_copy(update={"covisit_buckets": n})


def assert_layout(settings: Settings, n: int) -> None:
    """Every co-visitation file of the live version is bucket b < n and holds only items of bucket b."""
    t = load_feature_tables(settings)
    assert t.manifest["params"]["covisit_buckets"] == n
    root = Path(settings.features_dir)
    for name, key in (("covisit_counts", "item_a"), ("covisit_topk", "item_id")):
        entries = t.manifest["tables"][name]
        assert entries and all(0 <= e["bucket"] < n for e in entries)
        for e in entries:
            rows = read_covisit_counts(root, e) if name == "covisit_counts" else pq.read_table(root / e["path"])
            ids = rows[key].to_pylist()
            assert {bucket_of(i, n) for i in ids} == {e["bucket"]}, (name, e["path"])


@pytest.mark.integration
def test_covisit_bucket_change_rebuilds_in_the_new_layout(tmp_path, ray_local, caplog):
    per_part, item_rows = random_log(seed=5, n_events=300)
    ev_chunks = chunks(per_part, 3)
    four = with_buckets(make_settings(tmp_path / "inc"), 4)
    write(four, ITEMS, [r for rs in item_rows.values() for r in rs])
    for c in ev_chunks[:2]:
        write(four, EVENTS, c)
        run_features(four)
    assert_layout(four, 4)

    # Same directory, 7 buckets: a logged full rebuild, every file in the new layout ...
    seven = with_buckets(four, 7)
    with caplog.at_level(logging.WARNING, logger="streaming.features.job"):
        r = run_features(seven)
    assert not r.noop and load_feature_tables(seven).manifest["last_run"]["full"] is True
    assert "co-visitation buckets changed (4 -> 7" in caplog.text
    assert_layout(seven, 7)
    fresh = with_buckets(make_settings(tmp_path / "fresh"), 7)
    write(fresh, ITEMS, [r for rs in item_rows.values() for r in rs])
    write(fresh, EVENTS, ev_chunks[0] + ev_chunks[1])
    run_features(fresh)
    assert_same_tables(load_feature_tables(seven), load_feature_tables(fresh))

    # ... on which later runs are incremental again, still equal to one run over everything.
    for s in (seven, fresh):
        write(s, EVENTS, ev_chunks[2])
    assert run_features(seven).new_events == len(ev_chunks[2])
    assert load_feature_tables(seven).manifest["last_run"]["full"] is False
    assert_layout(seven, 7)
    once = with_buckets(make_settings(tmp_path / "once"), 7)
    write(once, ITEMS, [r for rs in item_rows.values() for r in rs])
    write(once, EVENTS, [e for c in ev_chunks for e in c])
    run_features(once)
    assert_same_tables(load_feature_tables(seven), load_feature_tables(once))

    # Back to the default layout: rebuilt again, same tables.
    default = with_buckets(seven, 16)
    assert load_feature_tables(default).manifest["params"]["covisit_buckets"] == 7
    run_features(default)
    assert_layout(default, 16)
    assert_same_tables(load_feature_tables(default), load_feature_tables(once))


@pytest.mark.parametrize("bad", [0, 4097, -3, True, 2.5])
def test_covisit_buckets_out_of_bounds_is_named(tmp_path, bad):
    s = make_settings(tmp_path).model_copy(update={"covisit_buckets": bad})
    with pytest.raises(ValueError, match=f"covisit_buckets .* got {bad!r}"):
        covisit_buckets(s)


def _reference(old: dict, deltas: list[tuple[str, str, int]]) -> dict:
    out = dict(old)
    for a, b, c in deltas:
        out[(a, b)] = out.get((a, b), 0) + c
    return {k: v for k, v in out.items() if v}


def _counts_table(counts: dict) -> pa.Table:
    rows = sorted(counts.items())
    return pa.table({"item_a": [a for (a, _), _ in rows], "item_b": [b for (_, b), _ in rows],
                     "count": [c for _, c in rows]}, schema=COVISIT_COUNTS_SCHEMA)


@pytest.mark.parametrize("seed", range(20))
def test_covisit_merge_equals_a_recompute(tmp_path, seed):
    """One run of the merge on a stored bucket (written by a first run; a base of integer pair keys,
    tests/streaming/test_covisit_segments.py has the many-run cases) against a dict sum and a full top-K;
    with negative deltas (an event replaced by an earlier duplicate), pairs that fall to zero, new pairs
    and items, and an empty stored bucket."""
    rng = random.Random(seed)
    items = [f"i{n}" for n in range(rng.choice([3, 12, 40]))]
    k = rng.choice([1, 2, 3, 5])
    old = {} if seed == 0 else {(a, b): rng.randint(1, 4) for a in items for b in items
                                if a != b and rng.random() < 0.5}
    deltas = []
    for _ in range(rng.randint(1, 80)):
        if old and rng.random() < 0.3:  # take some away (never below zero, as the job guarantees)
            (a, b), c = rng.choice(sorted(old.items()))
            deltas.append((a, b, -rng.randint(1, c)))
            old_after = _reference(old, deltas)
            if any(v < 0 for v in old_after.values()):
                deltas.pop()
        else:
            a, b = rng.sample(items + ["new1", "new2"], 2)
            deltas.append((a, b, rng.randint(1, 3)))
    root = tmp_path / "features"

    def run(vdir: str, rows: list[tuple[str, str, int]], old_counts: dict, old_topk: dict) -> dict:
        job = MergeJob(root=str(root), vdir=vdir, user_buckets=1, covisit_buckets=1, window=2, topk=k,
                       half_life_ms=1.0, old_counts=old_counts, old_topk=old_topk)
        group = pa.table({"bucket": pa.array([0] * len(rows), pa.int32()), "key": [r[0] for r in rows],
                          "item_b": [r[1] for r in rows], "count": pa.array([r[2] for r in rows], pa.int64())})
        return merge_covisit_bucket(group, job=job).to_pylist()[0]

    old_counts, old_topk = {}, {}
    if old:
        first = run("v1", [(a, b, c) for (a, b), c in sorted(old.items())], {}, {})
        old_counts, old_topk = {0: json.loads(first["counts_entry"])}, {0: first["topk_path"]}
    order = list(range(len(deltas)))
    rng.shuffle(order)  # the stage gets deltas in any order, a pair several times
    out = run("v2", [deltas[i] for i in order], old_counts, old_topk)
    want = _reference(old, deltas)
    if not want:
        assert out["counts_entry"] is None and out["counts_rows"] == 0
        return
    got = read_covisit_counts(root, json.loads(out["counts_entry"]))
    assert got.equals(_counts_table(want))  # sorted by (item_a, item_b), no zero rows
    got_topk = pq.read_table(root / out["topk_path"], schema=COVISIT_TOPK_SCHEMA)
    assert got_topk.to_pylist() == topk_table(_counts_table(want), k).to_pylist()
    assert out["counts_rows"] == len(want) and out["topk_rows"] == got_topk.num_rows


@pytest.mark.integration
def test_bench_entry_on_a_tiny_log(tmp_path, ray_local, monkeypatch):
    """bench/ingest.py merges this dict into its JSON: the keys it promises, figures that add up."""
    from bench import features_scale as fs

    monkeypatch.setattr(fs, "CHUNK_EVENTS", 700)
    monkeypatch.setattr(fs, "INCREMENT_EVENTS", 300)
    monkeypatch.setattr(fs, "INCREMENT_REPEATS", 1)
    settings = make_settings(tmp_path, user_buckets=2)
    out = fs.measure_feature_job(settings, events=2_000, users=40, items=25, checkpoints=[500, 2_000], keep=True)
    assert set(out) >= {"features_full_s", "features_incremental_s_per_100k", "covisit_rows", "covisit_bytes",
                        "covisit_build_s"}
    assert list(out["features_incremental_s_per_100k"]) == ["500", "2000"]
    assert all(v > 0 for v in out["features_incremental_s_per_100k"].values())
    runs = out["features_details"]["runs"]
    assert [r["full"] for r in runs] == [True, False, True, False]
    assert [r["new_events"] for r in runs] == [500, 300, 2_000 + 0, 300]
    t = load_feature_tables(settings.model_copy(update={"data_dir": tmp_path / fs.SUBDIR}))
    assert t.manifest["counts"]["events"] == 2_300 and out["covisit_rows"] > 0 and out["covisit_bytes"] > 0
    assert out["covisit_build_s"] == runs[2]["stage_s"]["covisit"]
    assert all(r["cpu_s"] is None or r["cpu_s"] > 0 for r in runs)
    # The synthetic log is in ingest's layout: offset-named files, contiguous offsets per partition.
    from streaming.offline_log import OfflineLog

    files = OfflineLog(tmp_path / fs.SUBDIR / "log").list_files(settings.events_topic)
    by_part: dict[int, list] = {}
    for f in files:
        by_part.setdefault(f.partition, []).append(f)
    for fs_ in by_part.values():
        assert fs_[0].start == 0 and all(b.start == a.end + 1 for a, b in zip(fs_, fs_[1:]))
    assert np.sum([pq.read_metadata(f.path).num_rows for f in files]) == 2_300
    # Without keep=True the work directory goes when the figures are in.
    fs.measure_feature_job(settings, events=600, users=10, items=5, checkpoints=[600])
    assert not (tmp_path / fs.SUBDIR).exists()
