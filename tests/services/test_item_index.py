"""FAISS item index: exact and HNSW search, upserts, tombstones, exclusions, bad input."""

import numpy as np
import pytest

from services.item_index import MIN_GROWTH_ROWS, ItemIndex


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_matches_brute_force_and_skips_excluded():
    rng = np.random.default_rng(0)
    vec = _unit(rng.normal(size=(300, 16)).astype(np.float32))
    ids = [f"i{k}" for k in range(300)]
    idx = ItemIndex(ids, vec)
    assert idx.exact and idx.recall == 1.0
    q = vec[:3]
    res = idx.search(q, 5, exclude=[{"i0"}, set(), {"i2", "i7"}])
    truth = np.argsort(-(q @ vec.T), axis=1)
    assert res.item_ids[0] == [ids[j] for j in truth[0] if j != 0][:5]
    assert res.item_ids[1] == [ids[j] for j in truth[1]][:5]
    assert res.item_ids[2] == [ids[j] for j in truth[2] if ids[j] not in {"i2", "i7"}][:5]
    assert np.all(np.diff(res.scores, axis=1) <= 1e-6)


def test_upsert_and_remove():
    vec = np.eye(4, dtype=np.float32)
    idx = ItemIndex(["a", "b", "c", "d"], vec)
    idx.upsert("e", np.array([0.9, 0.1, 0, 0], dtype=np.float32))
    assert idx.search(vec[:1], 2).item_ids[0] == ["a", "e"]
    assert idx.remove("a") and not idx.remove("a")
    assert idx.search(vec[:1], 2).item_ids[0][0] == "e" and idx.vector("a") is None and idx.size == 4
    idx.upsert("b", np.array([1.0, 0, 0, 0], dtype=np.float32))  # new vector for a known item
    assert idx.search(vec[:1], 1).item_ids[0] == ["b"] and idx.size == 4


def test_hnsw_above_the_threshold_measures_its_recall():
    rng = np.random.default_rng(1)
    vec = _unit(rng.normal(size=(2000, 16)).astype(np.float32))
    idx = ItemIndex([str(k) for k in range(2000)], vec, exact_max_items=1000)
    assert not idx.exact and 0.9 <= idx.recall <= 1.0


@pytest.mark.parametrize("ids,vec,msg", [
    (["a", "b"], np.zeros((3, 4), np.float32), "do not match"),
    (["a", "a"], np.zeros((2, 4), np.float32), "duplicate"),
    (["a"], np.array([[np.nan, 0, 0, 0]], np.float32), "NaN"),
])
def test_bad_embeddings_are_refused(ids, vec, msg):
    with pytest.raises(ValueError, match=msg):
        ItemIndex(ids, vec)


def test_bulk_single_upserts_grow_the_buffer_geometrically_and_search_like_a_fresh_index():
    """10,000 one-by-one upserts reallocate the vector buffer O(log n) times (not once per insert),
    and exact search over the grown index equals search over an index built from the same rows."""
    rng = np.random.default_rng(2)
    vec = _unit(rng.normal(size=(10_004, 16)).astype(np.float32))
    ids = [f"i{k}" for k in range(len(vec))]
    idx = ItemIndex(ids[:4], vec[:4])
    for item, v in zip(ids[4:], vec[4:]):
        idx.upsert(item, v)
    assert idx.reallocations <= int(np.ceil(np.log2(len(vec) / MIN_GROWTH_ROWS))) + 1
    assert idx.capacity >= len(vec) and idx.size == len(vec) and idx.vectors.shape == vec.shape
    np.testing.assert_array_equal(idx.vectors, vec)
    fresh = ItemIndex(ids, vec)
    q = vec[:20]
    got, want = idx.search(q, 10, exclude=[{"i0"}] * 20), fresh.search(q, 10, exclude=[{"i0"}] * 20)
    assert got.item_ids == want.item_ids
    np.testing.assert_array_equal(got.scores, want.scores)


def test_a_view_taken_before_upserts_stays_a_consistent_snapshot():
    idx = ItemIndex(["a", "b"], np.eye(2, dtype=np.float32))
    before = idx.vectors
    for k in range(100):
        idx.upsert(f"n{k}", np.array([1.0, 0.0], dtype=np.float32))
    idx.upsert("a", np.array([0.0, 1.0], dtype=np.float32))  # replaces: the old row is tombstoned
    assert before.shape == (2, 2) and np.array_equal(before, np.eye(2))
    assert idx.dead[0] and idx.size == 102 and np.array_equal(idx.vector("a"), [0.0, 1.0])
