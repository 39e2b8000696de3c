"""Reading the feature tables part by part with a deterministic user sample (`Corpus.from_feature_parts`).

The tables are written here as the feature job lays them out (a manifest listing one Parquet file per
user bucket in `SEQUENCE_SCHEMA`, an items file in `ITEM_LOG_SCHEMA`), so these tests need no Ray and
no feature run.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.events import ITEM_LOG_SCHEMA
from streaming.features.tables import SEQUENCE_SCHEMA, load_tables, read_manifest
from streaming.settings import Settings
from training.corpus import Corpus, CorpusError, NotEnoughData, load_corpus, user_sample_keys

BUCKETS = 3
N_USERS = 40
N_ITEMS = 12
WATERMARKS = {"events": {"0": 499, "1": 388}}
FORGOTTEN = ["tomb-1"]


def _items_table(n: int) -> pa.Table:
    ids = [f"i{k}" for k in range(n)]
    return pa.table({
        "item_id": ids, "title": [f"title {k}" for k in range(n)], "text": pa.nulls(n, pa.string()),
        "attributes": pa.nulls(n, pa.string()), "ts": pa.array(np.zeros(n, np.int64)),
        "deleted": pa.array([k == 3 for k in range(n)]), "partition": pa.array(np.zeros(n, np.int32)),
        "offset": pa.array(np.arange(n), pa.int64()), "ingest_ts": pa.array(np.zeros(n, np.int64)),
    }, schema=ITEM_LOG_SCHEMA)


def _user_row(u: int, rng: np.random.Generator) -> dict:
    n = int(rng.integers(0, 9))  # 0: a user row with no events still reads as an empty sequence
    # a few events name items the catalog lacks: they extend it, sorted by id, as from_feature_tables does
    items = [f"i{k}" if k < N_ITEMS else f"zz{k}" for k in rng.integers(0, N_ITEMS + 3, n)]
    scenes = [None if s < 0 else ("home", "search")[s] for s in rng.integers(-1, 2, n)]
    part = u % 2
    return {"user_id": f"u{u:03d}", "item_ids": items, "ts": sorted(int(t) for t in rng.integers(0, 10**6, n)),
            "types": ["click"] * n, "event_ids": [f"e{u}-{k}" for k in range(n)], "scenes": scenes,
            "partitions": [part] * n, "offsets": [u * 10 + k for k in range(n)], "n": n}


def write_tables(root: Path, *, n_users: int = N_USERS, seed: int = 0) -> Settings:
    """Feature tables of `n_users` users (one Parquet file per bucket, rows sorted by user_id) and a catalog."""
    settings = Settings(data_dir=root, user_buckets=BUCKETS)
    features = settings.features_dir
    (features / "v000001" / "sequences").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = [_user_row(u, rng) for u in range(n_users)]
    entries = []
    for b in range(BUCKETS):
        mine = sorted((r for r in rows if zlib.crc32(r["user_id"].encode()) % BUCKETS == b),
                      key=lambda r: r["user_id"])
        if not mine:
            continue
        rel = f"v000001/sequences/bucket-{b:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(mine, schema=SEQUENCE_SCHEMA), features / rel)
        entries.append({"bucket": b, "path": rel, "rows": len(mine)})
    pq.write_table(_items_table(N_ITEMS), features / "v000001" / "items.parquet")
    manifest = {"format": 1, "version": 1, "watermarks": WATERMARKS, "forgotten": FORGOTTEN,
                "tables": {"sequences": entries, "items": [{"path": "v000001/items.parquet", "rows": N_ITEMS}]}}
    (features / "manifest.json").write_text(json.dumps(manifest))
    return settings


def assert_same_corpus(a: Corpus, b: Corpus) -> None:
    assert a.user_ids == b.user_ids
    assert a.catalog.item_ids == b.catalog.item_ids
    assert a.catalog.texts == b.catalog.texts
    assert np.array_equal(a.catalog.live, b.catalog.live)
    for name in ("items", "ts", "partitions", "offsets", "scenes"):
        xs, ys = getattr(a, name), getattr(b, name)
        assert len(xs) == len(ys), name
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype, name
            assert list(x) == list(y), name
    assert a.watermarks == b.watermarks and a.forgotten == b.forgotten


def test_whole_read_equals_from_feature_tables(tmp_path):
    settings = write_tables(tmp_path)
    manifest = read_manifest(settings)
    whole = Corpus.from_feature_tables(load_tables(settings, manifest))
    assert len(whole.catalog) > N_ITEMS  # the unknown items path is exercised
    for max_users in (0, N_USERS, N_USERS + 5):
        parts = Corpus.from_feature_parts(settings, manifest, max_users=max_users)
        assert_same_corpus(parts, whole)
        assert parts.users_in_tables == whole.users_in_tables == N_USERS
    assert whole.watermarks == WATERMARKS and whole.forgotten == tuple(FORGOTTEN)


def test_sample_is_the_smallest_keys_and_stable(tmp_path):
    settings = write_tables(tmp_path)
    manifest = read_manifest(settings)
    whole = Corpus.from_feature_tables(load_tables(settings, manifest))
    keys = user_sample_keys(pa.array(whole.user_ids))
    k = 15
    expected = {whole.user_ids[i] for i in np.argsort(keys)[:k]}

    first = Corpus.from_feature_parts(settings, manifest, max_users=k)
    assert set(first.user_ids) == expected and len(first.user_ids) == k
    assert first.users_in_tables == N_USERS
    again = load_corpus(settings, max_users=k)
    assert_same_corpus(again, first)
    # each sampled user's events are exactly theirs in the whole corpus (the catalog may be smaller:
    # unknown items of unsampled users are not added), in the whole corpus's user order
    pos = {u: i for i, u in enumerate(whole.user_ids)}
    assert [pos[u] for u in first.user_ids] == sorted(pos[u] for u in first.user_ids)
    for u, items, ts, offs in zip(first.user_ids, first.items, first.ts, first.offsets):
        w = pos[u]
        assert [first.catalog.item_ids[i] for i in items] == [whole.catalog.item_ids[i] for i in whole.items[w]]
        assert list(ts) == list(whole.ts[w]) and list(offs) == list(whole.offsets[w])


def test_sample_follows_the_users_not_the_table_size(tmp_path):
    """Bottom-k: with more users in the tables, a user leaves the sample only for one with a smaller key."""
    small = write_tables(tmp_path / "small", n_users=30)
    large = write_tables(tmp_path / "large", n_users=60)
    k = 10
    a = set(load_corpus(small, max_users=k).user_ids)
    b = set(load_corpus(large, max_users=k).user_ids)
    key = dict(zip(sorted(a | b), user_sample_keys(pa.array(sorted(a | b)))))
    assert len(b) == k
    assert all(key[u] < min(key[v] for v in a - b) for u in b - a)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CorpusError, match="no feature tables yet"):
        load_corpus(Settings(data_dir=tmp_path / "none"))
    settings = write_tables(tmp_path / "t")
    with pytest.raises(CorpusError, match="max_users=-1"):
        load_corpus(settings, max_users=-1)
    empty = write_tables(tmp_path / "empty", n_users=0)
    with pytest.raises(NotEnoughData, match="no sequences"):
        load_corpus(empty, max_users=5)
