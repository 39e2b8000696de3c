"""Serving answers through `training.two_stage.rank_request`, the code evaluation uses (issue 16).

A real registry, the real MiniLM + LoRA (untrained) and a real LightGBM ranker
(tests/fixtures/synthetic_adapter.py, `ranker=True`); no Ray (tests/services/test_serve.py covers
the HTTP path). The offline side is rebuilt here from the version's files with the training code
alone, so a difference between what serving computes and what evaluation computes fails a test.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

N_ITEMS = 300  # more than the towers' top-N (200): retrieval is a real cut
NOW_MS = 1_700_000_100_000
HISTORY = ["m3", "m9", "m15", "m21", "m27"]  # Sci-Fi ... (GENRES[i % 6]: every 6th item shares a genre)
HISTORY_TS = [NOW_MS - 5_000_000 + 1_000_000 * j for j in range(len(HISTORY))]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter
    from training.registry import Registry

    tmp = tmp_path_factory.mktemp("two-stage")
    registry = Registry(str(tmp / "registry"))
    warm = np.ones(N_ITEMS, dtype=bool)
    warm[-20:] = False  # a few new items: the calibration and the `new` source have work
    ranked = publish_synthetic_adapter(registry, tmp, scene="ranked", n_items=N_ITEMS, seed=3, ranker=True, warm=warm)
    old = publish_synthetic_adapter(registry, tmp, scene="old", n_items=N_ITEMS, seed=3)
    return registry, {"ranked": ranked, "old": old}


@pytest.fixture(scope="module")
def ranked(versions):
    from services.loaded_adapter import LoadedAdapter

    registry, v = versions
    return LoadedAdapter.load(registry, "ranked", v["ranked"])


@pytest.fixture(scope="module")
def old(versions):
    from services.loaded_adapter import LoadedAdapter

    registry, v = versions
    return LoadedAdapter.load(registry, "old", v["old"])


def offline_catalog(registry, scene: str, version: str):
    """The RankCatalog and trend evaluation would build from the version's files (training code only)."""
    from pathlib import Path

    from training.adapter import ADAPTER_FILE, EMBEDDINGS_FILE, load_adapter, read_embeddings
    from training.covis import CovisPrior
    from training.ranker import Ranker
    from training.ranking_features import RetrievalSizes, trend_feature
    from training.two_stage import RankCatalog

    d = Path(registry.open(scene, version))
    adapter = load_adapter(d / ADAPTER_FILE)
    ids, warm, emb = read_embeddings(d / EMBEDDINGS_FILE)
    assert ids == list(adapter["item_ids"])
    prior = CovisPrior.from_dict(adapter["covis"])
    cat = RankCatalog.build(emb, prior.knn.counts, ~warm, prior, Ranker.from_dict(adapter["ranker"]),
                            RetrievalSizes.from_dict(adapter["ranker"]["retrieval"]))
    return cat, trend_feature(adapter["ranker"]["trending"]["decayed"]), emb


def offline_top(cat, trend, user, history, history_ts, k, query=None, weight=None):
    from training.two_stage import RankInputs, rank_request

    h, ts = np.asarray(history, dtype=np.int64), np.asarray(history_ts, dtype=np.int64)
    excluded = np.zeros(len(cat.is_new), dtype=bool)
    excluded[h] = True
    covis = cat.prior.feature([h], [ts], np.array([NOW_MS]))[0]
    rows, s = rank_request(cat, RankInputs(user, h, ts, NOW_MS, excluded, covis, trend, query=query,
                                           query_weight=weight), k)
    return [f"m{r}" for r in rows[np.argsort(-s, kind="stable")[:k]]]


def served_top(adapter, history, k, query=None, weight=None, ts=None):
    ids, _ = adapter.recommend([history], [ts if ts is not None else HISTORY_TS[:len(history)]], [query], k,
                               [set(history)], [weight], now_ms=NOW_MS)
    return ids[0]


def user_vector(adapter, emb, history):
    from training.inference import ModelScorer

    rows = [np.array([int(i[1:]) for i in history], dtype=np.int64)]
    return ModelScorer(adapter.model, "offline", item_table=emb).user_vectors(
        rows, [np.asarray(HISTORY_TS[:len(history)], dtype=np.int64)], np.array([NOW_MS]))[0]


def test_the_served_top_k_is_what_rank_request_computes_offline(versions, ranked):
    """The no-drift test: same version, same inputs -> the same ten items, through the ranker."""
    registry, v = versions
    assert ranked.rank.catalog.ranker is not None and ranked.rank.catalog.prior is not None
    cat, trend, emb = offline_catalog(registry, "ranked", v["ranked"])
    user = user_vector(ranked, emb, HISTORY)
    rows = [int(i[1:]) for i in HISTORY]
    assert served_top(ranked, HISTORY, 10) == offline_top(cat, trend, user, rows, HISTORY_TS, 10)
    query = ranked.embed_texts(["A horror film"])[0]
    assert served_top(ranked, HISTORY, 10, "A horror film", 0.7) == \
        offline_top(cat, trend, user, rows, HISTORY_TS, 10, query, 0.7)
    # and the ranker is what decided: without it the same request ranks otherwise
    cat.ranker = None
    assert served_top(ranked, HISTORY, 10) != offline_top(cat, trend, user, rows, HISTORY_TS, 10)


def test_an_approximate_index_gives_the_towers_candidates_through_faiss(versions):
    """Past EXACT_MAX_ITEMS the index is IVF and the towers' top-N comes from FAISS (`tower_top`,
    then no pass over the catalog's vectors); on 300 items it finds the exact neighbours, so the
    answer is the exact index's. The user tower reads only the history's rows of the item table."""
    from services.item_index import ItemIndex
    from services.loaded_adapter import LoadedAdapter

    registry, v = versions
    adapter = LoadedAdapter.load(registry, "ranked", v["ranked"])
    exact = served_top(adapter, HISTORY, 10)
    adapter.index = ItemIndex(list(adapter.index.item_ids), adapter.index.vectors.copy(), exact_max_items=0)
    assert not adapter.index.exact and adapter.index.recall == 1.0
    assert served_top(adapter, HISTORY, 10) == exact
    table = adapter.rank.catalog.item_vectors
    rows = [np.array([3, 1, 4], dtype=np.int64), np.array([5], dtype=np.int64)]
    stamps = [np.array([1, 2, 3], dtype=np.int64), np.array([9], dtype=np.int64)]
    import torch
    from training.corpus import history_features

    inputs, gaps = history_features(rows, stamps, np.zeros(2, dtype=np.int64), adapter.model.cfg.max_len)
    full = torch.cat([torch.zeros(1, table.shape[1]), torch.from_numpy(np.ascontiguousarray(table))])
    with torch.no_grad():
        want = adapter.model.user_embedding(torch.from_numpy(inputs), torch.from_numpy(gaps), full).numpy()
    np.testing.assert_allclose(adapter.user_vectors(rows, stamps, table), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ranked", "old"])
def test_a_query_alone_returns_the_querys_nearest_items(request, name):
    adapter = request.getfixturevalue(name)
    q = "Movie 17. Genres: Thriller."
    nearest = np.argsort(-(adapter.index.vectors @ adapter.embed_texts([q])[0]), kind="stable")[:10]
    assert served_top(adapter, [], 10, q) == [adapter.index.item_ids[r] for r in nearest]


def test_the_query_weight_moves_the_list(ranked):
    q = "A horror film"
    by_history, by_query = served_top(ranked, HISTORY, 10, q, 0.0), served_top(ranked, HISTORY, 10, q, 1.0)
    assert by_history != by_query
    query_sims = ranked.index.vectors @ ranked.embed_texts([q])[0]
    # weight 1: the query's own order among the candidates
    sims = [float(query_sims[ranked.index.row[i]]) for i in by_query]
    assert sims == sorted(sims, reverse=True)
    default = ranked.rank.catalog.ranker.query_weight  # None: the adapter's
    assert served_top(ranked, HISTORY, 10, q) == served_top(ranked, HISTORY, 10, q, default)


def test_an_adapter_without_a_ranker_serves_its_first_stage(versions, old):
    """An adapter trained before the ranker (no `ranker`, no prior): the towers' top-k, as before."""
    registry, v = versions
    assert old.rank.catalog.ranker is None and old.rank.catalog.prior is None
    from pathlib import Path

    from training.adapter import EMBEDDINGS_FILE, read_embeddings

    _, _, emb = read_embeddings(Path(registry.open("old", v["old"])) / EMBEDDINGS_FILE)
    tower = emb @ user_vector(old, emb, HISTORY)
    tower[[int(i[1:]) for i in HISTORY]] = -np.inf
    assert served_top(old, HISTORY, 10) == [f"m{r}" for r in np.argsort(-tower, kind="stable")[:10]]


def test_new_and_removed_items_keep_the_rank_state_the_size_of_the_index(versions):
    from services.loaded_adapter import LoadedAdapter

    registry, v = versions
    adapter = LoadedAdapter.load(registry, "ranked", v["ranked"])  # its own copy: this test changes the catalog
    prior_rows = adapter.rank.catalog.prior.knn.n_items
    adapter.upsert_item("fresh", "A brand new horror film about a haunted lighthouse.", "Fresh")
    adapter.upsert_item("m5", "Movie 5, re-cut. Genres: Romance.", "Movie 5")  # a replaced text: a new row
    rank, n = adapter.rank, len(adapter.index.item_ids)
    assert rank.n == n == N_ITEMS + 2 and len(rank.trend) == n and len(rank.catalog.log_pop) == n
    assert rank.catalog.is_new[-2:].all() and rank.catalog.log_pop[-1] == 0 and rank.trend[-1] == 0
    assert rank.catalog.prior.knn.n_items >= n > prior_rows
    # a history holding the new item, and the new item as the answer to its own text
    assert len(served_top(adapter, [*HISTORY, "fresh"], 10, ts=[*HISTORY_TS, NOW_MS - 1])) == 10
    assert served_top(adapter, [], 1, "A brand new horror film about a haunted lighthouse.") == ["fresh"]
    assert adapter.remove_item("fresh") and adapter.rank.n == n
    assert "fresh" not in served_top(adapter, [], 10, "A brand new horror film about a haunted lighthouse.")


@pytest.mark.parametrize("weight", [1.5, -0.1])
def test_a_query_weight_outside_0_1_is_refused_naming_it(weight):
    from services.api_schema import RecommendRequest, validation_error

    with pytest.raises(ValidationError) as caught:
        RecommendRequest(user_id="u1", query="comedy", query_weight=weight)
    body = validation_error(caught.value.errors())
    assert body.error == "invalid request: query_weight" and f"query_weight={weight}" in body.detail[0].msg
    assert RecommendRequest(user_id="u1", query_weight=0.0).query_weight == 0.0


def test_a_ranker_that_does_not_parse_refuses_the_version_at_load():
    from services.item_index import ItemIndex
    from services.loaded_adapter import rank_state
    from training.ranking_features import FEATURE_NAMES

    adapter = {"item_ids": ["a", "b"], "ranker": {"model": "not a LightGBM model", "features": list(FEATURE_NAMES)}}
    index = ItemIndex(["a", "b"], np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="does not parse"):  # LoadedAdapter.load: an AdapterLoadError
        rank_state(adapter, None, index, np.ones(2, dtype=bool))


def test_a_ranker_without_trees_loads_and_scores_as_the_first_stage():
    """Cross-validation may find nothing to add to the first stage: the adapter then carries a ranker
    with no trees (model ""), which must serve, not be refused as unparsable."""
    from types import SimpleNamespace

    from services.item_index import ItemIndex
    from services.loaded_adapter import rank_state
    from training.ranking_features import FEATURE_NAMES

    adapter = {"item_ids": ["a", "b"], "ranker": {"model": "", "features": list(FEATURE_NAMES), "init_scale": 5.0}}
    index = ItemIndex(["a", "b"], np.eye(2, dtype=np.float32))
    state = rank_state(adapter, SimpleNamespace(text=None), index, np.ones(2, dtype=bool))
    ranker = state.catalog.ranker
    assert ranker.model_text == "" and ranker.init_scale == 5.0
    assert list(ranker.predict(np.zeros((2, len(FEATURE_NAMES))), np.array([1.0, 2.0]))) == [5.0, 10.0]
