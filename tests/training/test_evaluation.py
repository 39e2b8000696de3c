"""Tests of training/evaluation.py (metrics, tie-break, reports) and training/baselines.py.

Run: `pytest -q tests/training/test_evaluation.py` (unit-level: no services, a few seconds).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

from streaming.datasets import load_dataset
from training.baselines import (
    ItemKNNGrid,
    ItemKNNScorer,
    PopularScorer,
    ZeroShotScorer,
    co_visitation_pairs,
    tune_itemknn,
)
from training.corpus import Corpus, EvalSet, cold_start_split, leave_one_out
from training.evaluation import (
    METRIC_KEYS,
    Scorer,
    case_metrics,
    evaluate,
    evaluate_models,
    load_results,
    results_table_markdown,
    save_report,
    top_k,
)

N = 20


class FixedScorer:
    """Returns the same score row for every user, or row i of a matrix for the i-th case scored."""

    def __init__(self, row: np.ndarray, name: str = "fixed") -> None:
        self.row = np.asarray(row, dtype=np.float32)
        self.name = name
        self.pos = 0

    def score(self, histories, history_ts, now_ts):
        if self.row.ndim == 2:
            out = self.row[self.pos:self.pos + len(histories)].copy()
            self.pos += len(histories)
            return out
        return np.broadcast_to(self.row, (len(histories), len(self.row))).copy()


def cases(histories: list[list[int]], targets: list[int]) -> EvalSet:
    hist = [np.asarray(h, dtype=np.int32) for h in histories]
    return EvalSet(np.arange(len(targets), dtype=np.int32), hist,
                   [np.arange(len(h), dtype=np.int64) * 1000 for h in hist],
                   np.asarray(targets, dtype=np.int32), np.full(len(targets), 10**9, dtype=np.int64))


ALL_LIVE = np.ones(N, dtype=bool)
DESC = FixedScorer(-np.arange(N, dtype=np.float32))  # item 0 best, then 1, 2, ...
CONST = FixedScorer(np.zeros(N, dtype=np.float32), "const")


# --- metrics on hand-built cases ---------------------------------------------------------------


def test_ranks_0_3_12():
    m = evaluate(DESC, cases([[], [], []], [0, 3, 12]), live=ALL_LIVE)
    assert set(METRIC_KEYS) <= set(m) and m["n"] == 3
    assert m["recall10"] == pytest.approx(2 / 3)
    assert m["ndcg10"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert m["mrr10"] == pytest.approx((1.0 + 1.0 / 4) / 3)
    assert m["coverage10"] == pytest.approx(10 / N)  # everyone gets items 0..9
    assert math.isnan(m["diversity10"])  # no ref_embeddings


def test_k_is_respected():
    m = evaluate(DESC, cases([[], [], []], [0, 3, 12]), live=ALL_LIVE, k=3)
    assert m["recall10"] == pytest.approx(1 / 3) and m["coverage10"] == pytest.approx(3 / N)


def test_seen_and_non_live_items_are_excluded():
    live = ALL_LIVE.copy()
    live[0] = False
    # items 1 and 2 seen, item 0 deleted: target 5 moves up from rank 5 to rank 2
    m = evaluate(DESC, cases([[1, 2]], [5]), live=live)
    assert m["mrr10"] == pytest.approx(1 / 3)
    m = evaluate(DESC, cases([[1, 2]], [5]), live=live, exclude_seen=False)
    assert m["mrr10"] == pytest.approx(1 / 5)  # 1, 2, 3, 4 ahead


def test_target_not_a_candidate_is_a_counted_miss():
    live = ALL_LIVE.copy()
    live[0] = False
    # target 0 is deleted; target 1 is a repeat (in the history)
    m = evaluate(DESC, cases([[], [1], [4]], [0, 1, 3]), live=live)
    assert m["n"] == 3
    assert m["recall10"] == pytest.approx(1 / 3)  # only the third case hits: rank 2 (items 1, 2 ahead)
    assert m["mrr10"] == pytest.approx((1 / 3) / 3)
    # without exclusion the repeat is ranked normally
    m = evaluate(DESC, cases([[1]], [1]), live=live, exclude_seen=False)
    assert m["mrr10"] == pytest.approx(1.0)


def test_ties_break_by_index_pessimistically():
    row = np.zeros(N, dtype=np.float32)
    row[[3, 7, 9]] = 1.0  # three items tied at the top
    scorer = FixedScorer(row)
    for target, rank in ((3, 0), (7, 1), (9, 2), (0, 3), (15, 15)):
        m = evaluate(scorer, cases([[]], [target]), live=ALL_LIVE)
        assert m["mrr10"] == pytest.approx(1.0 / (rank + 1) if rank < 10 else 0.0), target


def test_constant_scorer_gets_no_free_hits():
    # Targets above index 9 can never be hit by a constant scorer; 0..9 rank by index.
    targets = list(range(N))
    m = evaluate(CONST, cases([[]] * N, targets), live=ALL_LIVE)
    assert m["recall10"] == pytest.approx(10 / N)
    assert m["mrr10"] == pytest.approx(sum(1 / (t + 1) for t in range(10)) / N)
    assert m["coverage10"] == pytest.approx(10 / N)
    # targets at the end of the index: zero
    assert evaluate(CONST, cases([[]] * 5, [15, 16, 17, 18, 19]), live=ALL_LIVE)["recall10"] == 0.0


def test_nan_scores_rank_last():
    row = -np.arange(N, dtype=np.float32)
    row[0] = np.nan
    m = evaluate(FixedScorer(row), cases([[], []], [0, 1]), live=ALL_LIVE, k=N)
    assert m["mrr10"] == pytest.approx((1 / N + 1.0) / 2)


def test_top_k_order_and_padding():
    s = np.array([[1, 3, 3, 2, 3, 0]], dtype=np.float32)
    cand = np.ones_like(s, dtype=bool)
    assert top_k(s, 3, cand).tolist() == [[1, 2, 4]]
    assert top_k(s, 4, cand).tolist() == [[1, 2, 4, 3]]
    cand[0, [1, 4]] = False
    assert top_k(s, 3, cand).tolist() == [[2, 3, 0]]
    few = np.zeros_like(cand)
    few[0, [5, 2]] = True
    assert top_k(s, 3, few).tolist() == [[2, 5, -1]]
    s_inf = np.full((1, 6), -np.inf, dtype=np.float32)
    assert top_k(s_inf, 2, np.ones_like(cand)).tolist() == [[0, 1]]


def test_ranks_and_top_k_match_a_full_sort():
    from training.evaluation import candidate_mask, target_ranks

    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(50, N)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    hists = [rng.choice(N, size=rng.integers(0, 8), replace=False) for _ in range(50)]
    live = rng.random(N) < 0.9
    cand = candidate_mask(hists, live)
    targets = rng.integers(0, N, size=50)
    ranks = target_ranks(scores, targets, cand)
    tops = top_k(scores, 10, cand)
    for r in range(50):
        items = np.flatnonzero(cand[r])
        order = items[np.lexsort((items, -scores[r, items]))]  # score desc, index asc
        assert tops[r][tops[r] >= 0].tolist() == order[:10].tolist()
        expect = int(np.flatnonzero(order == targets[r])[0]) if cand[r, targets[r]] else N
        assert ranks[r] == expect


def test_coverage_by_hand():
    # constant scorer, k=3: user A (no history) gets 0,1,2; user B (saw 0) gets 1,2,3; 4 of 19 live items
    live = ALL_LIVE.copy()
    live[19] = False
    m = evaluate(CONST, cases([[], [0]], [5, 5]), live=live, k=3)
    assert m["coverage10"] == pytest.approx(4 / 19)


def test_diversity_by_hand():
    emb = np.zeros((N, 2), dtype=np.float32)
    emb[:, 0] = 1.0
    emb[1] = (0.0, 1.0)
    emb[2] = (5.0, 0.0)  # same direction as item 0 (rows are normalized)
    m = evaluate(CONST, cases([[]], [0]), live=ALL_LIVE, k=3, ref_embeddings=emb)
    # top 3 = items 0, 1, 2: pairs (0,1) -> 1, (0,2) -> 0, (1,2) -> 1
    assert m["diversity10"] == pytest.approx(2 / 3)
    # the second user saw item 1: top = 0, 2, 3, all the same direction
    m = evaluate(CONST, cases([[], [1]], [0, 0]), live=ALL_LIVE, k=3, ref_embeddings=emb)
    assert m["diversity10"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_batching_does_not_change_results():
    rng = np.random.default_rng(0)
    mat = rng.integers(0, 4, size=(37, N)).astype(np.float32)  # many ties
    hists = [list(rng.choice(N, size=rng.integers(0, 5), replace=False)) for _ in range(37)]
    tg = list(rng.integers(0, N, size=37))
    emb = rng.normal(size=(N, 4))
    a = evaluate(FixedScorer(mat), cases(hists, tg), live=ALL_LIVE, batch_size=5, ref_embeddings=emb)
    b = evaluate(FixedScorer(mat), cases(hists, tg), live=ALL_LIVE, batch_size=256, ref_embeddings=emb,
                 progress=True)
    assert a == pytest.approx(b)


def test_bad_shape_and_empty_cases():
    with pytest.raises(ValueError):
        evaluate(FixedScorer(np.zeros(N - 1)), cases([[]], [0]), live=ALL_LIVE)
    m = evaluate(DESC, cases([], []), live=ALL_LIVE)
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in METRIC_KEYS)


def test_return_ranks_and_case_metrics_agree_with_the_means_exactly():
    rng = np.random.default_rng(4)
    scores = rng.random((60, N)).astype(np.float32)
    scores[::7] = np.round(scores[::7], 1)  # some ties
    histories = [list(rng.choice(N, size=rng.integers(0, 5), replace=False)) for _ in range(60)]
    targets = list(rng.integers(0, N, size=60))  # some are seen: non-candidates, counted misses
    live = ALL_LIVE.copy()
    live[3] = False
    c = cases(histories, targets)
    plain = evaluate(FixedScorer(scores), c, live=live, k=5, batch_size=16)
    metrics, ranks = evaluate(FixedScorer(scores), c, live=live, k=5, batch_size=16, return_ranks=True)
    assert {k: v for k, v in metrics.items() if k != "diversity10"} == {k: v for k, v in plain.items()
                                                                       if k != "diversity10"}
    assert ranks.shape == (60,) and ranks.dtype == np.int64
    per = case_metrics(ranks, k=5)
    assert set(per) == {"ndcg10", "recall10", "mrr10"}
    for key, values in per.items():
        assert values.shape == (60,)
        assert float(values.mean()) == metrics[key]  # exactly, not approximately
    not_cand = np.array([t in h or t == 3 for h, t in zip(histories, targets)])
    assert not_cand.any() and (ranks[not_cand] == N).all() and (per["recall10"][not_cand] == 0).all()


def test_case_metrics_by_hand():
    per = case_metrics(np.array([0, 3, 12, 20]), k=10)
    np.testing.assert_allclose(per["recall10"], [1, 1, 0, 0])
    np.testing.assert_allclose(per["ndcg10"], [1.0, 1 / math.log2(5), 0, 0])
    np.testing.assert_allclose(per["mrr10"], [1.0, 0.25, 0, 0])
    with pytest.raises(ValueError, match="k=0"):
        case_metrics(np.array([0]), k=0)


def test_return_ranks_with_no_cases():
    metrics, ranks = evaluate(DESC, cases([], []), live=ALL_LIVE, return_ranks=True)
    assert metrics["n"] == 0 and ranks.shape == (0,)


def test_scorers_satisfy_the_protocol():
    assert isinstance(DESC, Scorer)
    assert isinstance(PopularScorer(np.ones(3)), Scorer)
    assert isinstance(ZeroShotScorer(np.eye(3)), Scorer)


# --- baselines -----------------------------------------------------------------------------------


def test_co_visitation_pairs_by_hand():
    seqs = [np.array([0, 1, 2]), np.array([1, 0, 0]), np.array([3, 3])]
    a, b, c = co_visitation_pairs(seqs, 4, window=1)
    got = {(int(x), int(y)): int(z) for x, y, z in zip(a, b, c)}
    # (0,1) by both users (counted once per user), (1,2) by the first, no self pairs
    assert got == {(0, 1): 2, (1, 0): 2, (1, 2): 1, (2, 1): 1}
    a, b, c = co_visitation_pairs(seqs, 4, window=2)
    got = {(int(x), int(y)): int(z) for x, y, z in zip(a, b, c)}
    assert got[(0, 2)] == got[(2, 0)] == 1 and got[(0, 1)] == 2


def test_itemknn_scores_by_hand():
    seqs = [np.array([0, 1, 2]), np.array([1, 0]), np.array([3, 4])]
    knn = ItemKNNScorer.fit(seqs, 6, window=1, normalize="none", last_n=2, decay=0.5)
    s = knn.score([np.array([2, 0])], [np.array([0, 1])], np.array([2]))[0]
    # last item 0 (weight 1): co(0,1)=2; item 2 (weight 0.5): co(2,1)=1 -> item 1 ~ 2.5
    assert s[1] - knn.backoff[1] == pytest.approx(2.5)
    assert knn.backoff.max() < 1 * 0.5  # below the smallest co-visitation contribution (weight 1 * decay 0.5)
    assert s[5] == 0.0  # never interacted with: exactly 0, the lowest score
    assert (s[:5] > 0).all()  # every warm item is above it (popularity backoff)
    assert s[3] < 0.5 and s[4] < 0.5  # no co-visitation: backoff only


def test_itemknn_sparse_path_matches_dense():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 50, size=rng.integers(2, 30)) for _ in range(80)]
    dense = ItemKNNScorer.fit(seqs, 50)
    sparse = ItemKNNScorer.fit(seqs, 50, dense_max_items=0, max_neighbors=50)
    assert dense.dense is not None and sparse.dense is None
    hist = seqs[:10]
    np.testing.assert_allclose(dense.score(hist, hist, np.zeros(10)), sparse.score(hist, hist, np.zeros(10)),
                               rtol=1e-5, atol=1e-7)
    cut = ItemKNNScorer.fit(seqs, 50, dense_max_items=0, max_neighbors=3)
    assert np.diff(cut.indptr).max() <= 3


def _planted_window_3(n_users: int = 120, seed: int = 0) -> tuple[list[np.ndarray], EvalSet]:
    """Item p (0..9) is followed by its partner p + 10 exactly 3 positions later, with fillers
    (20..29) between: only a window >= 3 co-visits the pair. Validation: history [p], target p + 10."""
    rng = np.random.default_rng(seed)
    train = []
    for u in range(n_users):
        p = u % 10
        fill = rng.choice(np.arange(20, 30), size=2, replace=False)
        train.append(np.array([p, fill[0], fill[1], p + 10], dtype=np.int32))
    valid = cases([[p] for p in range(10)], [p + 10 for p in range(10)])
    return train, valid


def test_tune_itemknn_picks_the_planted_window_on_validation():
    train, valid = _planted_window_3()
    live = np.ones(30, dtype=bool)
    grid = ItemKNNGrid(window=(1, 2, 3, 5), decay=(0.7, 1.0), last_n=(5, 10))
    knn, record = tune_itemknn(train, valid, live, 30, grid=grid)
    # windows 1 and 2 never see the pair; 3 and 5 rank the partner first; a one-item history
    # reads the same for every decay/last_n: ties go to the first point in grid order
    assert record["chosen"] == {"window": 3, "decay": 0.7, "last_n": 5}
    assert knn.params() == record["chosen"]
    assert len(record["grid"]) == 4 * 2 * 2 and record["n_valid"] == 10 and record["criterion"] == "valid_mrr"
    by_window = {r["window"]: r for r in record["grid"] if r["decay"] == 0.7 and r["last_n"] == 5}
    assert by_window[3]["valid_ndcg10"] == by_window[5]["valid_ndcg10"] == 1.0
    assert by_window[1]["valid_mrr"] < 0.5 and by_window[2]["valid_mrr"] < 0.5
    assert record["valid_mrr"] == max(r["valid_mrr"] for r in record["grid"]) == 1.0
    # the record's figure is what the returned scorer gets
    assert evaluate(knn, valid, live=live)["ndcg10"] == record["valid_ndcg10"]


def test_tune_itemknn_is_given_no_test_split(synthetic):
    corpus, _ = synthetic
    split = leave_one_out(corpus)

    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"tuning read the test split ({name})")

        def __len__(self):
            raise AssertionError("tuning read the test split (len)")

    split.test = Poisoned()
    assert "test" not in inspect.signature(tune_itemknn).parameters
    grid = ItemKNNGrid(window=(2, 5), decay=(0.8,), last_n=(10,))
    knn, record = tune_itemknn(split.train_items, split.valid, corpus.catalog.live, split.n_items, grid=grid)
    assert record["n_valid"] == len(split.valid) and knn.window in (2, 5)
    with pytest.raises(ValueError, match="no validation cases"):
        tune_itemknn(split.train_items, split.valid.subset(np.zeros(len(split.valid), dtype=bool)),
                     corpus.catalog.live, split.n_items, grid=grid)


def test_itemknn_dense_scores_match_a_plain_loop():
    rng = np.random.default_rng(8)
    seqs = [rng.integers(0, 30, size=rng.integers(2, 15)) for _ in range(40)]
    knn = ItemKNNScorer.fit(seqs, 30, window=2, last_n=6, decay=0.7)
    hist = [seqs[0], np.zeros(0, dtype=np.int64), seqs[1][:1], seqs[2], seqs[3][:3]]  # ragged, one empty
    got = knn.score(hist, hist, np.zeros(len(hist)))
    for r, h in enumerate(hist):
        want = knn.backoff.copy()
        for age, item in enumerate(h[::-1][:6]):
            want += 0.7 ** age * knn.dense[item]
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-9)


def test_with_params_shares_the_weights():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 40, size=rng.integers(2, 20)) for _ in range(50)]
    knn = ItemKNNScorer.fit(seqs, 40, window=3)
    other = knn.with_params(last_n=5, decay=0.5)
    assert other.dense is knn.dense and other.weights is knn.weights
    assert other.params() == {"window": 3, "decay": 0.5, "last_n": 5}
    fresh = ItemKNNScorer.fit(seqs, 40, window=3, last_n=5, decay=0.5)
    hist = seqs[:8]
    np.testing.assert_array_equal(other.score(hist, hist, np.zeros(8)), fresh.score(hist, hist, np.zeros(8)))


def test_zero_shot_scorer():
    emb = np.array([[1, 0], [0, 1], [2, 0.1], [0, -1]], dtype=np.float32)
    z = ZeroShotScorer(emb, last_n=1)
    s = z.score([np.array([1, 0]), np.array([], dtype=np.int32)], [None, None], np.zeros(2))
    assert s.shape == (2, 4) and s.dtype == np.float32
    assert s[0].argmax() in (0, 2) and s[0, 0] == pytest.approx(1.0)
    assert (s[1] == 0).all()
    assert not z.content_free and PopularScorer.content_free and ItemKNNScorer.content_free


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    ds = load_dataset("synthetic:n_users=300,n_items=200,n_events=20000,seed=1", tmp_path_factory.mktemp("syn"))
    corpus = Corpus.from_dataset(ds)
    topic = np.array([ds.truth.item_topic[int(i[1:])] for i in corpus.catalog.item_ids])
    return corpus, topic


def test_synthetic_itemknn_beats_popular_and_cold_start(synthetic):
    corpus, topic = synthetic
    live = corpus.catalog.live
    split = leave_one_out(corpus)
    cold = cold_start_split(corpus, cold_share=0.2, seed=0)
    # stand-in for the base LM: topic one-hot plus noise ("text reveals the topic")
    rng = np.random.default_rng(0)
    emb = np.eye(topic.max() + 1)[topic] + 0.3 * rng.normal(size=(len(topic), topic.max() + 1))
    warm = {"popular": PopularScorer(split.train_counts()), "itemknn": ItemKNNScorer.fit(split.train_items, split.n_items)}
    res = evaluate_models(warm, {"test": (split.test, live)}, ref_embeddings=emb)
    assert res["itemknn"]["test"]["ndcg10"] > 3 * res["popular"]["test"]["ndcg10"]
    assert res["itemknn"]["test"]["ndcg10"] > 0.05
    assert res["itemknn"]["test"]["coverage10"] > res["popular"]["test"]["coverage10"]
    assert 0.0 < res["popular"]["test"]["diversity10"] <= 2.0
    cold_models = {"popular": PopularScorer(cold.train_counts()),
                   "itemknn": ItemKNNScorer.fit(cold.train_items, cold.n_items),
                   "zeroshot_lm": ZeroShotScorer(emb)}
    res_cold = evaluate_models(cold_models, {"cold": (cold.test, live)})
    assert res_cold["popular"]["cold"]["n"] == len(cold.test) > 0
    assert res_cold["popular"]["cold"]["recall10"] == 0.0  # content-free: no cold item in any top 10
    assert res_cold["itemknn"]["cold"]["recall10"] == 0.0
    assert res_cold["zeroshot_lm"]["cold"]["recall10"] > 0.0  # text can reach cold items


# --- reports -------------------------------------------------------------------------------------


def _metrics(r, n, c=0.5, d=float("nan"), nn=100):
    return {"recall10": r, "ndcg10": n, "mrr10": n / 2, "coverage10": c, "diversity10": d, "n": nn}


RESULTS = {
    "popular": {"test": _metrics(0.0859, 0.0449, 0.05), "cold": _metrics(0.0, 0.0, 0.01, nn=20)},
    "itemknn": {"test": _metrics(0.2280, 0.1196, 0.64), "cold": _metrics(0.0, 0.0, 0.2, nn=20)},
    "zeroshot_lm": {"test": _metrics(0.05, 0.02, 0.9, 0.7)},
}


def test_markdown_table():
    md = results_table_markdown(RESULTS)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Model | NDCG@10 | Recall@10 | MRR@10 | Coverage@10 | Diversity")
    assert "Cold Recall@10" in lines[0] and "Cold NDCG@10" in lines[0]
    assert len(lines) == 2 + 3
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert set(rows) == {"popular", "itemknn", "zeroshot_lm"}
    assert rows["itemknn"][0] == "**0.1196**" and rows["itemknn"][1] == "**0.2280**"
    assert rows["popular"][0] == "0.0449"
    assert rows["zeroshot_lm"][3] == "**0.9000**" and rows["zeroshot_lm"][4] == "**0.7000**"
    assert rows["popular"][4] == "—"  # NaN diversity
    assert rows["zeroshot_lm"][5] == rows["zeroshot_lm"][6] == "—"  # no cold protocol
    assert rows["popular"][5] == rows["itemknn"][5] == "**0.0000**"  # ties: both bold


CI = {
    "popular": {"test": {"ndcg10": [0.038, 0.052], "recall10": [0.068, 0.104]}},
    "itemknn": {"test": {"ndcg10": [0.1105, 0.1291], "recall10": [0.201, 0.255], "mrr10": [0.1, 0.2]},
                "cold": {"recall10": [0.0, 0.0]}},
}


def test_markdown_table_with_intervals():
    plain = results_table_markdown(RESULTS)
    assert results_table_markdown(RESULTS, ci=None) == plain
    md = results_table_markdown(RESULTS, ci=CI)
    lines = md.strip().splitlines()
    assert lines[0] == plain.strip().splitlines()[0]  # same columns
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert rows["itemknn"][0] == "**0.1196** [0.111, 0.129]"  # bold marks the best point value only
    assert rows["itemknn"][1] == "**0.2280** [0.201, 0.255]"
    assert rows["popular"][0] == "0.0449 [0.038, 0.052]"
    assert rows["itemknn"][2] == "**0.0598**"  # MRR: no interval in the table
    assert rows["itemknn"][5] == "**0.0000** [0.000, 0.000]"  # cold Recall@10
    assert rows["zeroshot_lm"][0] == "0.0200"  # no interval given: the point value alone
    assert rows["popular"][4] == "—"


def test_save_report_writes_intervals(tmp_path: Path):
    paths = save_report(tmp_path / "report", RESULTS, meta={"dataset": "x"}, ci=CI)
    data = json.loads(paths["json"].read_text())
    assert data["ci95"]["itemknn"]["test"]["ndcg10"] == [0.1105, 0.1291]
    meta, res = load_results(paths["json"])  # older readers: unchanged
    assert meta == {"dataset": "x"} and res.keys() == RESULTS.keys()
    md = paths["markdown"].read_text()
    assert "**0.1196** [0.111, 0.129]" in md and "bootstrap" in md
    plain = save_report(tmp_path / "plain", RESULTS, meta={})
    assert "ci95" not in json.loads(plain["json"].read_text())
    assert "[" not in plain["markdown"].read_text()


def test_save_report_round_trip(tmp_path: Path):
    meta = {"dataset": "ml-100k", "k": np.int64(10), "seed": 0}
    paths = save_report(tmp_path / "report", RESULTS, meta=meta)
    assert set(paths) == {"json", "markdown", "png"}
    data = json.loads(paths["json"].read_text())  # strict JSON (NaN written as null)
    assert data["meta"]["k"] == 10 and data["results"]["popular"]["test"]["diversity10"] is None
    meta2, res2 = load_results(paths["json"])
    assert meta2 == {"dataset": "ml-100k", "k": 10, "seed": 0}
    assert res2.keys() == RESULTS.keys()
    for model, protos in RESULTS.items():
        for proto, metrics in protos.items():
            for key, value in metrics.items():
                got = res2[model][proto][key]
                assert (math.isnan(value) and math.isnan(got)) or got == value
    md = paths["markdown"].read_text()
    assert "**0.1196**" in md and "zeroshot_lm" in md and "ml-100k" in md
    png = paths["png"].read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
