"""FAISS item index: exact and HNSW search, upserts, tombstones, exclusions, bad input."""

import numpy as np
import pytest

from services.item_index import ItemIndex


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
