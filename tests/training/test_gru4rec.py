"""Tests of training/gru4rec.py (the GRU4Rec baseline, cross-entropy form): it learns sequential
structure popularity cannot, cold items rank last, tuning sees only validation, seeded runs
repeat, bad configs fail clearly. The shared fitting code is covered in test_sasrec.py.

Run: `pytest -q tests/training/test_gru4rec.py` (unit-level, small synthetic data, seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.baselines import PopularScorer
from training.evaluation import Scorer, evaluate
from training.gru4rec import GRU4RecConfig, GRU4RecScorer, fit_gru4rec, tune_gru4rec
from training.seq_baseline_fit import COLD_SCORE

SMALL = GRU4RecConfig(hidden=32, max_len=30, lr=3e-3)


def test_tuned_gru4rec_beats_popularity_on_successor_data(seq_split, seq_corpus):
    # Only train_items and valid exist for it: tune_gru4rec has no way to reach split.test.
    live = seq_corpus.catalog.live
    scorer, record = tune_gru4rec(seq_split.train_items, seq_split.valid, live, seq_split.n_items, base=SMALL,
                                  grid={"hidden": (16, 32)}, max_epochs=30, eval_every=5, progress=False)
    popular = evaluate(PopularScorer.fit(seq_split.train_items, seq_split.n_items), seq_split.valid,
                       live=live)["ndcg10"]
    assert isinstance(scorer, Scorer) and scorer.name == "gru4rec" and scorer.content_free
    assert set(record["configs"]) == {"hidden=16", "hidden=32"} and record["model"] == "gru4rec"
    best = record["configs"][record["chosen"]]
    assert best["valid_ndcg10"] == max(r["valid_ndcg10"] for r in record["configs"].values())
    assert best["valid_ndcg10"] > 2 * popular, (record, popular)
    assert evaluate(scorer, seq_split.valid, live=live)["ndcg10"] == pytest.approx(best["valid_ndcg10"])
    json.dumps(record, allow_nan=False)


def test_cold_items_get_the_same_lowest_score(seq_cold_split, seq_corpus):
    split = seq_cold_split
    scorer = fit_gru4rec(split.train_items, split.n_items, SMALL, epochs=3, seed=0)
    cold = split.train_counts() == 0
    scores = scorer.score(split.test.histories, split.test.history_ts, split.test.target_ts)
    assert cold.any() and np.all(scores[:, cold] == COLD_SCORE) and scores[:, ~cold].min() > COLD_SCORE
    assert evaluate(scorer, split.test, live=seq_corpus.catalog.live)["recall10"] == 0.0


def test_same_seed_same_model_other_seed_other_model(seq_split):
    h = seq_split.valid
    runs = [fit_gru4rec(seq_split.train_items, seq_split.n_items, SMALL, epochs=2, seed=s) for s in (0, 0, 1)]
    scores = [r.score(h.histories, h.history_ts, h.target_ts) for r in runs]
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not np.array_equal(scores[0], scores[2])


def test_score_reads_the_state_after_the_last_item(seq_split):
    scorer = fit_gru4rec(seq_split.train_items, seq_split.n_items, SMALL, epochs=1, seed=0)
    assert isinstance(scorer, GRU4RecScorer)
    short = np.array([3, 1, 4], dtype=np.int32)
    long = np.tile(np.arange(seq_split.n_items, dtype=np.int32), 2)
    hist = [np.zeros(0, dtype=np.int32), short, long]
    out = scorer.score(hist, [np.zeros(len(x), dtype=np.int64) for x in hist], np.zeros(3, dtype=np.int64))
    assert out.shape == (3, seq_split.n_items) and out.dtype == np.float32 and np.isfinite(out).all()
    # padding after a short history (it shares a batch with a long one) does not change its scores
    alone = scorer.score([short], [np.zeros(3, dtype=np.int64)], np.zeros(1))
    np.testing.assert_allclose(out[1], alone[0], rtol=1e-5, atol=1e-5)
    tail = scorer.score([long[-SMALL.max_len:]], [np.zeros(SMALL.max_len, dtype=np.int64)], np.zeros(1))
    np.testing.assert_allclose(out[2], tail[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value", [("dropout", 1.5), ("max_len", 0), ("hidden", -1), ("batch_size", 0)])
def test_bad_config_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        GRU4RecConfig(**{field: value})
