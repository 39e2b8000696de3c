"""Tests of training/sasrec.py (the standard SASRec baseline) and the shared fitting code of
training/seq_baseline_fit.py: it learns sequential structure popularity cannot, cold items rank
last, tuning sees only validation, seeded runs repeat, bad configs fail clearly.

Run: `pytest -q tests/training/test_sasrec.py` (unit-level, small synthetic data, seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.baselines import PopularScorer
from training.corpus import Split
from training.evaluation import Scorer, candidate_mask, evaluate, top_k
from training.sasrec import SASRecConfig, SASRecScorer, fit_sasrec, tune_sasrec
from training.seq_baseline_fit import COLD_SCORE, check_bounds

SMALL = SASRecConfig(hidden=32, max_len=30, lr=3e-3)


class NoTestSplit(Split):
    """A split whose test cases may not be read: tuning must not need them."""

    @property
    def test(self):
        raise AssertionError("tuning read split.test")

    @test.setter
    def test(self, value) -> None:
        pass


def guarded(split: Split) -> Split:
    return NoTestSplit(split.corpus, split.train_items, split.train_ts, split.valid, split.test)


def test_tuned_sasrec_beats_popularity_on_successor_data_and_never_reads_test(seq_split, seq_corpus):
    split = guarded(seq_split)
    live = seq_corpus.catalog.live
    scorer, record = tune_sasrec(split.train_items, split.valid, live, split.n_items, base=SMALL,
                                 grid={"dropout": (0.2, 0.5)}, max_epochs=30, eval_every=5, progress=False)
    popular = evaluate(PopularScorer.fit(split.train_items, split.n_items), split.valid, live=live)["ndcg10"]
    assert isinstance(scorer, Scorer) and scorer.name == "sasrec" and scorer.content_free
    assert set(record["configs"]) == {"dropout=0.2", "dropout=0.5"}
    best = max(record["configs"].values(), key=lambda r: r["valid_ndcg10"])
    assert record["configs"][record["chosen"]] is best
    assert record["chosen_config"]["dropout"] == scorer.config.dropout
    assert best["valid_ndcg10"] > 2 * popular, (record, popular)
    # the returned scorer holds the best epoch's weights: re-evaluating gives the recorded figure
    assert evaluate(scorer, split.valid, live=live)["ndcg10"] == pytest.approx(best["valid_ndcg10"])
    json.dumps(record, allow_nan=False)


def test_cold_items_get_the_same_lowest_score_and_never_reach_the_top(seq_cold_split, seq_corpus):
    split = seq_cold_split
    scorer = fit_sasrec(split.train_items, split.n_items, SMALL, epochs=3, seed=0)
    cold = split.train_counts() == 0
    assert cold.any() and (~cold).any()
    scores = scorer.score(split.test.histories, split.test.history_ts, split.test.target_ts)
    assert np.all(scores[:, cold] == COLD_SCORE)
    assert scores[:, ~cold].min() > COLD_SCORE
    cand = candidate_mask(split.test.histories, seq_corpus.catalog.live)
    top = top_k(scores, 10, cand)
    assert not cold[top[top >= 0]].any()
    assert evaluate(scorer, split.test, live=seq_corpus.catalog.live)["recall10"] == 0.0


def test_same_seed_same_model_other_seed_other_model(seq_split):
    h = seq_split.valid
    runs = [fit_sasrec(seq_split.train_items, seq_split.n_items, SMALL, epochs=2, seed=s) for s in (0, 0, 1)]
    scores = [r.score(h.histories, h.history_ts, h.target_ts) for r in runs]
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not np.array_equal(scores[0], scores[2])


def test_score_shapes_empty_and_long_histories(seq_split):
    threads = torch.get_num_threads()
    scorer = fit_sasrec(seq_split.train_items, seq_split.n_items, SMALL, epochs=1, seed=0)
    assert torch.get_num_threads() == threads  # fitting restores the caller's thread setting
    long = np.tile(np.arange(seq_split.n_items, dtype=np.int32), 3)  # longer than max_len
    hist = [np.zeros(0, dtype=np.int32), long, seq_split.valid.histories[0]]
    out = scorer.score(hist, [np.zeros(len(x), dtype=np.int64) for x in hist], np.zeros(3, dtype=np.int64))
    assert out.shape == (3, seq_split.n_items) and out.dtype == np.float32 and np.isfinite(out).all()
    # only the last max_len items count
    same = scorer.score([long[-SMALL.max_len:]], [np.zeros(SMALL.max_len, dtype=np.int64)], np.zeros(1))
    np.testing.assert_allclose(out[1], same[0], rtol=1e-5, atol=1e-5)
    assert isinstance(scorer, SASRecScorer)


@pytest.mark.parametrize("field, value", [("dropout", 1.5), ("dropout", -0.1), ("max_len", 0), ("hidden", 0),
                                          ("blocks", 0), ("lr", float("nan"))])
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        SASRecConfig(**{field: value})


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="hidden=50 is not divisible by heads=3"):
        SASRecConfig(heads=3)
    check_bounds(SASRecConfig(hidden=48, heads=3))


def test_bad_grid_and_budget_are_refused(seq_split, seq_corpus):
    args = (seq_split.train_items, seq_split.valid, seq_corpus.catalog.live, seq_split.n_items)
    with pytest.raises(ValueError, match="'width'"):
        tune_sasrec(*args, grid={"width": (1,)}, progress=False)
    with pytest.raises(ValueError, match="max_len=0"):
        tune_sasrec(*args, grid={"max_len": (0,)}, progress=False)
    with pytest.raises(ValueError, match="patience=0"):
        tune_sasrec(*args, grid={"dropout": (0.2,)}, base=SMALL, patience=0, progress=False)
