"""The co-visitation prior (beta tuning, round trip through the adapter dict) and new-item calibration."""

import numpy as np

from training.covis import COVIS_SCALE, CovisPrior, tune_beta

# Two "sessions" of items: {0,1,2} and {3,4}; item 5 has no interactions.
TRAIN = [np.array([0, 1, 2]), np.array([1, 2, 0]), np.array([3, 4]), np.array([4, 3])]
N = 6


def test_boost_follows_co_visitation_and_is_zero_at_beta_zero():
    prior = CovisPrior.fit(TRAIN, N, beta=1.0)
    boost = prior.boost([np.array([0])], [np.array([0])], np.array([1]))
    assert boost[0, 1] > 0 and boost[0, 2] > 0
    assert boost[0, 1] > boost[0, 3] and boost[0, 1] > boost[0, 4]  # 3, 4 only get the popularity backoff
    assert boost[0, 5] == 0.0  # never interacted, nothing to impute from
    prior.beta = 0.0
    assert not prior.boost([np.array([0])], [np.array([0])], np.array([1])).any()


def test_tune_beta_picks_the_best_and_the_smaller_on_ties():
    beta, table = tune_beta(lambda b: {0.0: 0.1, 0.5: 0.3, 1.0: 0.3}[b], grid=(0.0, 0.5, 1.0))
    assert beta == 0.5 and table == {"0": 0.1, "0.5": 0.3, "1": 0.3}
    beta, _ = tune_beta(lambda b: 0.2, grid=(0.0, 0.5))
    assert beta == 0.0


def test_round_trip_and_rekeying_to_another_catalog():
    prior = CovisPrior.fit(TRAIN, N, beta=0.4)
    hist = [np.array([0, 3])]
    before = prior.boost(hist, [np.array([0, 0])], np.array([1]))
    again = CovisPrior.from_dict(prior.to_dict())
    np.testing.assert_allclose(again.boost(hist, [np.array([0, 0])], np.array([1])), before, rtol=1e-6)
    # new catalog: the order reversed and one extra item appended
    index_map = np.array([5, 4, 3, 2, 1, 0])
    moved = CovisPrior.from_dict(prior.to_dict(), index_map, N + 1)
    got = moved.boost([index_map[hist[0]]], [np.array([0, 0])], np.array([1]))
    np.testing.assert_allclose(got[0, index_map], before[0], rtol=1e-6)
    assert got[0, N] == 0.0
    assert before.max() <= 0.4 * np.log1p(COVIS_SCALE * 10)


def test_new_items_get_the_users_share_of_the_top_k():
    from training.calibration import calibrate_new_items

    n = 30
    new = np.zeros(n, dtype=bool)
    new[20:] = True
    scores = np.linspace(1.0, 0.0, n)[None, :].repeat(2, axis=0)  # known items 0..19 all beat new ones
    clicking_new = np.array([0, 21, 22, 1, 23])  # 3 of the last 5 are new -> 6 of 10 slots
    not_clicking = np.array([0, 1, 2])
    out = calibrate_new_items(scores, [clicking_new, not_clicking], new, k=10, history_items=5)
    ranked = [i for i in np.argsort(-out[0]) if i not in clicking_new][:10]
    assert sum(new[ranked]) == 6
    assert [i for i in ranked if new[i]] == [20, 24, 25, 26, 27, 28]  # order among new items kept
    np.testing.assert_array_equal(out[1], scores[1])  # no new items in history: untouched
    np.testing.assert_array_equal(scores[0], np.linspace(1.0, 0.0, n))  # input not modified
