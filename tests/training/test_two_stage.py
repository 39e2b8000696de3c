"""The second stage: retrieval union, ranking features, the LightGBM ranker, the query blend, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import ItemKNNScorer
from training.covis import COVIS_SCALE, CovisPrior
from training.ranker import (
    QUERY_MOVE_SHARE,
    Ranker,
    RankingData,
    blend_query,
    choose_query_weight,
    fit_ranker,
)
from training.ranking_features import (
    FEATURE_NAMES,
    RetrievalSizes,
    TrendingClock,
    candidate_features,
    neighbor_weights,
    top_rows,
    trend_feature,
    union_candidates,
)
from training.two_stage import RankCatalog, RankInputs, calibrated, rank_request, trend_order, trending_rows

COL = {n: j for j, n in enumerate(FEATURE_NAMES)}


def test_top_rows_orders_by_score_then_row_and_respects_allowed():
    s = np.array([0.5, 0.9, 0.9, -np.inf, 0.1])
    assert top_rows(s, 3).tolist() == [1, 2, 0]
    allowed = np.array([True, False, True, True, True])
    assert top_rows(s, 10, allowed).tolist() == [2, 0, 4]  # -inf and disallowed rows never come back


def test_union_keeps_every_sources_rank_and_drops_excluded_rows():
    excluded = np.zeros(10, dtype=bool)
    excluded[7] = True
    cand = union_candidates({"tower": np.array([3, 7, 1]), "covis": np.array([1, 5]), "trending": np.array([9])},
                            excluded)
    assert cand.rows.tolist() == [3, 1, 5, 9]  # first appearance first, 7 excluded
    assert cand.ranks["tower"].tolist()[:2] == [0, 2]
    assert np.isnan(cand.ranks["tower"][2]) and cand.ranks["covis"][1] == 0 and cand.ranks["covis"][2] == 1
    assert cand.in_source("trending").tolist() == [False, False, False, True]
    assert np.isnan(cand.ranks["query"]).all()


def test_trending_clock_counts_only_the_past_with_the_half_life():
    items = np.array([0, 0, 1, 2])
    ts = np.array([0, 1000, 1000, 5000])
    clock = TrendingClock(items, ts, 3, half_life_ms=1000)
    got = clock.at(np.array([1000, 3000, 0]))
    np.testing.assert_allclose(got[0], [0.5, 0.0, 0.0])  # strictly before 1000: only the first event, one half-life old
    np.testing.assert_allclose(got[1], [2 ** -3 + 2 ** -2, 2 ** -2, 0.0])
    np.testing.assert_allclose(got[2], [0.0, 0.0, 0.0])
    share = trend_feature(got[1])
    assert share[2] == 0 and share[0] > share[1]
    with pytest.raises(ValueError, match="half_life_ms=0"):
        TrendingClock(items, ts, 3, half_life_ms=0)


@pytest.fixture()
def knn():
    seqs = [np.array([0, 1, 2]), np.array([0, 1]), np.array([3, 4])]
    return ItemKNNScorer.fit(seqs, 6, window=1)


def test_features_follow_their_definitions(knn):
    cand = union_candidates({"tower": np.array([1, 4, 5])})
    vecs = np.eye(6, dtype=np.float32)
    user = np.zeros(6, dtype=np.float32)
    user[4] = 1.0
    history, ts = np.array([2, 0]), np.array([1_000, 3_600_000 + 1_000])
    is_new = np.zeros(6, dtype=bool)
    is_new[5] = True
    f = candidate_features(cand, user=user, item_vectors=vecs, covis=np.arange(6, dtype=np.float32), knn=knn,
                           history=history, history_ts=ts, now_ts=2 * 3_600_000 + 1_000,
                           log_pop=np.log1p(np.arange(6.0)), trend=np.zeros(6, dtype=np.float32), is_new=is_new)
    assert f.shape == (3, len(FEATURE_NAMES))
    assert f[:, COL["tower"]].tolist() == [0.0, 1.0, 0.0]
    assert np.isnan(f[:, COL["query_sim"]]).all()  # no query: missing, not 0
    w01 = neighbor_weights(knn, 0, np.array([1]))[0]
    assert w01 > 0 and f[0, COL["covis_last1"]] == pytest.approx(np.log1p(COVIS_SCALE * w01))
    assert f[1, COL["covis_last1"]] == 0.0
    assert np.isnan(f[:, COL["covis_last3"]]).all()  # the history has two items
    # item 1 neighbours both history items; the most recent (item 0) was an hour ago
    assert f[0, COL["neighbor_age_h"]] == pytest.approx(np.log1p(1.0))
    assert np.isnan(f[1, COL["neighbor_age_h"]])
    assert f[0, COL["since_last_h"]] == pytest.approx(np.log1p(1.0))
    assert f[:, COL["is_new"]].tolist() == [0.0, 0.0, 1.0]
    assert f[:, COL["rank_tower"]].tolist() == [0.0, 1.0, 2.0]
    unknown = candidate_features(cand, user=user, item_vectors=vecs, covis=None, knn=knn, history=history,
                                 history_ts=np.zeros(2, dtype=np.int64), now_ts=0, log_pop=np.zeros(6),
                                 trend=np.zeros(6), is_new=is_new, query=vecs[5])
    assert np.isnan(unknown[:, COL["since_last_h"]]).all()  # unknown times stay missing
    assert unknown[:, COL["query_sim"]].tolist() == [0.0, 0.0, 1.0]


def _planted(n_groups: int, size: int, seed: int) -> RankingData:
    """Groups where feature `covis_last1` marks the positive and the first stage is noise."""
    rng = np.random.default_rng(seed)
    xs, bases, ys = [], [], []
    for _ in range(n_groups):
        x = rng.normal(size=(size, len(FEATURE_NAMES))).astype(np.float32)
        y = np.zeros(size, dtype=np.float32)
        y[rng.integers(size)] = 1
        x[:, COL["covis_last1"]] = y * 2 + rng.normal(scale=0.3, size=size)
        xs.append(x)
        bases.append(rng.normal(size=size))
        ys.append(y)
    return RankingData.stack(list(zip(xs, bases, ys)))


def test_the_ranker_learns_a_planted_signal_and_survives_its_dict():
    data = _planted(120, 30, 0)
    ranker = fit_ranker(data, seed=0)
    chosen = ranker.tuning["chosen"]
    assert chosen["rounds"] > 0
    test = _planted(40, 30, 1)
    scores = ranker.predict(test.x, test.base)
    starts = np.concatenate([[0], np.cumsum(test.groups)[:-1]])
    top1 = [int(np.argmax(scores[s:s + g]) == np.argmax(test.y[s:s + g])) for s, g in zip(starts, test.groups)]
    assert np.mean(top1) > 0.8
    again = Ranker.from_dict(ranker.to_dict())
    np.testing.assert_allclose(again.predict(test.x, test.base), scores)
    with pytest.raises(ValueError, match="feature columns"):
        ranker.predict(test.x[:, :3], test.base)
    with pytest.raises(ValueError, match="reads features"):
        Ranker.from_dict({**ranker.to_dict(), "features": ["tower"]})


def test_a_ranker_without_trees_is_the_first_stage():
    r = Ranker("", FEATURE_NAMES, 0.5, 10.0)
    base = np.array([0.3, 0.1, 0.2])
    assert r.predict(np.zeros((3, len(FEATURE_NAMES)), dtype=np.float32), base).tolist() == pytest.approx([3, 1, 2])


def test_groups_without_a_positive_teach_nothing():
    x = np.zeros((2, len(FEATURE_NAMES)), dtype=np.float32)
    with pytest.raises(ValueError, match="nothing to train"):
        RankingData.stack([(x, np.zeros(2), np.zeros(2, dtype=np.float32))])


def test_blend_query_alone_without_history_and_bounded_weight():
    ranker, query = np.array([3.0, 2.0, 1.0]), np.array([0.1, 0.2, 0.9])
    assert blend_query(ranker, query, 0.3, has_history=False).tolist() == query.tolist()
    assert np.argmax(blend_query(ranker, query, 0.0, has_history=True)) == 0
    assert np.argmax(blend_query(ranker, query, 1.0, has_history=True)) == 2
    with pytest.raises(ValueError, match="query_weight=1.5"):
        blend_query(ranker, query, 1.5, has_history=True)


def test_the_default_query_weight_is_the_smallest_that_moves_the_list():
    w, record = choose_query_weight(lambda w: w)  # moved share = the weight itself
    assert w == pytest.approx(QUERY_MOVE_SHARE) and list(record)[-1] == f"{w:g}"
    w, _ = choose_query_weight(lambda w: 0.0)
    assert w == 0.9  # never enough: the largest


def test_calibration_lifts_new_candidates_to_the_users_share():
    is_new = np.array([False, False, False, True, True])
    rows = np.arange(5)
    scores = np.array([5.0, 4.0, 3.0, 1.0, 0.5])
    history = np.array([3, 0])  # half of the recent items are new
    out = calibrated(scores, rows, is_new, history, k=2)
    top2 = set(np.argsort(-out)[:2].tolist())
    assert top2 == {0, 3}  # one new item (the best one) in the top 2
    assert calibrated(scores, rows, is_new, np.array([0, 1]), k=2).tolist() == scores.tolist()


def test_rank_request_with_a_query_and_no_history_answers_the_query(knn):
    vecs = np.eye(6, dtype=np.float32)
    prior = CovisPrior(knn, 0.2)
    cat = RankCatalog.build(vecs, np.ones(6), np.zeros(6, dtype=bool), prior, None, RetrievalSizes(tower=3, covis=3))
    r = RankInputs(user=vecs[0], history=np.zeros(0, dtype=np.int64), history_ts=np.zeros(0, dtype=np.int64),
                   now_ts=0, excluded=np.zeros(6, dtype=bool), covis=None, trend=np.zeros(6), query=vecs[4])
    rows, s = rank_request(cat, r)
    assert rows[np.argmax(s)] == 4
    r2 = RankInputs(user=vecs[0], history=np.array([0]), history_ts=np.array([1]), now_ts=2,
                    excluded=np.eye(6, dtype=bool)[0], covis=prior.feature([np.array([0])], [np.array([1])],
                                                                         np.array([2]))[0], trend=np.zeros(6))
    rows, s = rank_request(cat, r2)
    assert 0 not in rows.tolist()  # a seen item is never a candidate
    assert rows[np.argmax(s)] == 1  # the co-visited neighbour wins without a ranker (first stage)


def test_trending_rows_from_the_precomputed_order_equal_top_rows():
    """Serving passes the trend order computed once per catalog; the rows are top_rows' rows for any
    exclusions, including ones that empty the order's prefix."""
    rng = np.random.default_rng(3)
    trend = np.where(rng.random(5_000) < 0.3, rng.random(5_000), 0.0).astype(np.float32)
    trend[:40] = 0.5  # ties: row ascending
    order = trend_order(trend)
    for excluded_share in (0.0, 0.5, 0.99):
        excluded = rng.random(5_000) < excluded_share
        excluded[order[:300]] = excluded_share > 0.9  # a prefix all excluded: the whole order is read
        r = RankInputs(np.zeros(4), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0, excluded, None, trend,
                       trend_order=order)
        want = top_rows(trend, 50, ~excluded & (trend > 0))
        np.testing.assert_array_equal(trending_rows(r, 50, ~excluded), want)


def test_the_sparse_covisitation_row_is_the_dense_one():
    """Serving's SparseCovis (a catalog in CSR storage) equals CovisPrior.feature's dense row at
    every row, and its top rows are top_rows' over the dense row, for any exclusions; also over a
    prefix of the catalog (a rank state smaller than a grown prior)."""
    rng = np.random.default_rng(11)
    n = 3_000
    seqs = [rng.choice(n // 3, size=12, replace=False) for _ in range(400)]  # a third of the items co-visited
    knn = ItemKNNScorer.fit(seqs, n, max_neighbors=50, dense_max_items=0)
    prior = CovisPrior(knn, beta=0.2)
    hist = [np.asarray(s[:8], dtype=np.int64) for s in seqs[:6]] + [np.zeros(0, dtype=np.int64)]
    ts = [np.arange(len(h), dtype=np.int64) for h in hist]
    dense = prior.feature(hist, ts, np.full(len(hist), 100, dtype=np.int64))
    for m in (n, 2_000):
        sparse = prior.feature_sparse(hist, m)
        for b in range(len(hist)):
            np.testing.assert_array_equal(sparse[b][np.arange(m)], dense[b, :m])
            for share in (0.0, 0.5, 0.98):
                allowed = rng.random(m) >= share
                for k in (5, 200):
                    want = top_rows(dense[b, :m], k, allowed & (dense[b, :m] > 0))
                    np.testing.assert_array_equal(sparse[b].top(k, allowed), want)
