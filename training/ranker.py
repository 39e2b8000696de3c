"""The second stage: a LightGBM `lambdarank` model over the candidates' features, and the query blend.

LightGBM (not XGBoost): both have CPU wheels; LightGBM's lambdarank handles missing values
natively (a feature that does not apply is NaN, see `training/ranking_features.py`), trains on
the ~400k candidate rows of MovieLens-100K in seconds on two cores, and its model is a text
string, which travels inside the adapter dict (`training/adapter.py`, key `ranker`) -- so the
ranker is versioned, checksummed, gated and hot-reloaded with its adapter, with nothing new.

Training data are the **validation** cases (each user's second-to-last interaction): the
retrieval candidates of each case are one query group, the held-out item is the one relevant
candidate. Cases whose held-out item was not retrieved teach nothing and are left out of
training (they still count as misses in every evaluation). A thousand groups with one positive
each are little data for trees, so boosting starts from the first stage's score (tower + beta x
co-visitation, times `init_scale`) and the trees learn a correction of it: where they find
nothing, the ranker is the first stage. The grid point of `RANKER_GRID`, the init scale of
`INIT_SCALES` and the number of rounds are chosen by `CV_FOLDS`-fold cross-validation over the
validation users (NDCG@10 of the held-out folds; round 0 is the first stage alone); the chosen
model is then refit on all validation cases. The test split is never read.

The query blend (`blend_query`): an explicit query must move the list, and neither the
co-visitation prior (which follows only the history) nor a ranker that never saw a query in
training (validation interactions have none) may cancel it. So the final score of a request
with a query is `(1 - w) * z(ranker) + w * z(query_sim)`, both standardized over the request's
candidates, and with no history the query alone decides (w = 1). The default `w` is chosen on
held-out histories (`choose_query_weight`): the smallest of `QUERY_WEIGHT_GRID` at which a query
unrelated to the history replaces at least `QUERY_MOVE_SHARE` of the top 10 -- visibly moving
the list, without throwing the history away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from training.ranking_features import FEATURE_NAMES

logger = logging.getLogger(__name__)

# Small on purpose: ~1,000 groups with one positive each support shallow trees only, and every grid
# point costs CV_FOLDS trainings (on MovieLens-100K ~250k candidate rows, ~1 s per 100 rounds on 2 cores).
RANKER_GRID: tuple[dict[str, Any], ...] = (
    {"num_leaves": 7, "learning_rate": 0.05, "min_child_samples": 20, "max_bin": 63},
)
INIT_SCALES = (0.0, 5.0, 10.0)  # boosting starts from init_scale x the first-stage score (0: from zero)
MAX_ROUNDS = 100
CV_FOLDS = 3
EVAL_AT = 10
QUERY_WEIGHT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUERY_MOVE_SHARE = 0.5  # the default query weight replaces at least half of the top 10
DEFAULT_QUERY_WEIGHT = 0.5  # before a weight is chosen (an adapter trained without held-out histories)


def _lgb():
    import lightgbm

    return lightgbm


@dataclass
class Ranker:
    """A trained LightGBM ranker (its model text), the features it reads and its tuning record."""

    model_text: str  # "" = no trees: cross-validation found nothing to add to the first stage
    features: tuple[str, ...] = FEATURE_NAMES
    query_weight: float = DEFAULT_QUERY_WEIGHT
    init_scale: float = 0.0  # score = init_scale x first-stage score + the trees' sum
    tuning: dict[str, Any] = field(default_factory=dict)
    _booster: Any = field(default=None, repr=False, compare=False)

    @property
    def booster(self):
        if self._booster is None:
            self._booster = _lgb().Booster(model_str=self.model_text)
        return self._booster

    def predict(self, x: np.ndarray, first_stage: np.ndarray) -> np.ndarray:
        """Scores of candidates with features `x` and first-stage scores `first_stage`."""
        if x.shape[1] != len(self.features):
            raise ValueError(f"{x.shape[1]} feature columns, the ranker reads {len(self.features)}: {self.features}")
        if not len(x):
            return np.zeros(0, dtype=np.float64)
        trees = np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64) if self.model_text else 0.0
        return self.init_scale * np.asarray(first_stage, dtype=np.float64) + trees

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_text, "features": list(self.features), "query_weight": float(self.query_weight),
                "init_scale": float(self.init_scale), "tuning": dict(self.tuning)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Ranker":
        features = tuple(d["features"])
        if features != FEATURE_NAMES:
            raise ValueError(f"the ranker reads features {features}, this code computes {FEATURE_NAMES}")
        return cls(str(d["model"]), features, float(d.get("query_weight", DEFAULT_QUERY_WEIGHT)),
                   float(d.get("init_scale", 0.0)), dict(d.get("tuning", {})))


@dataclass
class RankingData:
    """Query groups for LightGBM: stacked feature rows, first-stage scores, 0/1 labels, group sizes."""

    x: np.ndarray
    base: np.ndarray
    y: np.ndarray
    groups: np.ndarray

    @classmethod
    def stack(cls, blocks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> "RankingData":
        """From (features, first-stage scores, labels) per case; groups without a positive are
        dropped (nothing to learn from them)."""
        keep = [b for b in blocks if len(b[2]) and b[2].max() > 0]
        if not keep:
            raise ValueError("no validation case retrieved its held-out item: nothing to train a ranker on")
        return cls(*(np.concatenate([k[j] for k in keep]) for j in range(3)),
                   np.array([len(k[2]) for k in keep], dtype=np.int64))

    def take(self, mask: np.ndarray) -> "RankingData":
        starts = np.concatenate([[0], np.cumsum(self.groups)[:-1]])
        rows = np.concatenate([np.arange(s, s + g) for s, g, m in zip(starts, self.groups, mask) if m])
        return RankingData(self.x[rows], self.base[rows], self.y[rows], self.groups[mask])

    def dataset(self, init_scale: float, reference: Any = None):
        return _lgb().Dataset(self.x, self.y, group=self.groups, init_score=init_scale * self.base,
                              feature_name=list(FEATURE_NAMES), reference=reference)


def _params(grid_point: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [EVAL_AT], "verbosity": -1,
            "num_threads": 1, "seed": seed, "deterministic": True, "force_col_wise": True,
            "feature_pre_filter": False, **grid_point}


def fit_ranker(data: RankingData, *, grid: Sequence[dict[str, Any]] = RANKER_GRID,
               init_scales: Sequence[float] = INIT_SCALES, seed: int = 0) -> Ranker:
    """Choose the grid point, the init scale and the number of rounds by CV_FOLDS-fold cross-validation
    over the validation users (mean NDCG@10 of the held-out folds, per round), then refit on all of them."""
    lgb = _lgb()
    fold = np.random.default_rng(seed).integers(0, CV_FOLDS, size=len(data.groups))
    folds = [(data.take(fold != f), data.take(fold == f)) for f in range(CV_FOLDS)]
    # round 0 = the init score alone (no trees): what the first stage gets on the held-out folds
    base_ndcg = float(np.mean([_ndcg_of(hold.base, hold) for _, hold in folds]))
    curves: dict[tuple[int, float], np.ndarray] = {}
    for g, point in enumerate(grid):
        for scale in init_scales:
            per_fold = []
            for fit_part, hold_part in folds:
                train_set = fit_part.dataset(scale)
                record: dict[str, Any] = {}
                lgb.train(_params(point, seed), train_set, num_boost_round=MAX_ROUNDS,
                          valid_sets=[hold_part.dataset(scale, reference=train_set)],
                          callbacks=[lgb.record_evaluation(record)])
                per_fold.append(record["valid_0"][f"ndcg@{EVAL_AT}"])
            curves[(g, scale)] = np.concatenate([[base_ndcg if scale > 0 else 0.0], np.mean(per_fold, axis=0)])
    (g, scale), curve = max(curves.items(), key=lambda kv: float(kv[1].max()))
    rounds = int(np.argmax(curve))
    point = grid[g]
    tuning = {"cv_ndcg10": {f"{','.join(f'{k}={v}' for k, v in grid[gi].items())},init_scale={sc:g}":
                            {"best": round(float(c.max()), 4), "rounds": int(np.argmax(c))}
                            for (gi, sc), c in curves.items()},
              "first_stage_cv_ndcg10": round(float(curves[(g, scale)][0]), 4) if scale > 0 else None,
              "chosen": {**point, "init_scale": scale, "rounds": rounds}, "groups": int(len(data.groups)),
              "rows": int(len(data.y))}
    logger.info("ranker: %s, init scale %g, %d rounds, %d groups; cross-validated NDCG@10 %.4f", point, scale, rounds,
                len(data.groups), float(curve.max()))
    if rounds == 0:  # the first stage alone was best: a ranker without trees (it scores as the first stage)
        tuning["gain"] = {}
        return Ranker("", FEATURE_NAMES, DEFAULT_QUERY_WEIGHT, scale, tuning)
    booster = lgb.train(_params(point, seed), data.dataset(scale), num_boost_round=rounds)
    gain = booster.feature_importance(importance_type="gain")
    tuning["gain"] = {n: round(float(v), 3) for n, v in sorted(zip(FEATURE_NAMES, gain), key=lambda t: -t[1])}
    return Ranker(booster.model_to_string(), FEATURE_NAMES, DEFAULT_QUERY_WEIGHT, scale, tuning, booster)


def _ndcg_of(scores: np.ndarray, data: RankingData) -> float:
    """Mean NDCG@EVAL_AT of `scores` over `data`'s groups (one relevant item each, LightGBM's ties aside)."""
    out, start = [], 0
    for g in data.groups:
        s, y = scores[start:start + g], data.y[start:start + g]
        rank = int(np.sum(s > s[np.argmax(y)]))
        out.append(1.0 / np.log2(rank + 2.0) if rank < EVAL_AT else 0.0)
        start += g
    return float(np.mean(out)) if out else 0.0


def standardized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if finite.sum() < 2:
        return np.where(finite, 0.0, -np.inf)
    mu, sd = x[finite].mean(), x[finite].std()
    return np.where(finite, (x - mu) / (sd if sd > 0 else 1.0), -np.inf)


def blend_query(ranker_scores: np.ndarray, query_sims: np.ndarray, weight: float, has_history: bool) -> np.ndarray:
    """The final scores of a request with a query (module docstring): with no history the query alone."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"query_weight={weight!r}: must be between 0 and 1")
    if not has_history:
        return np.asarray(query_sims, dtype=np.float64)
    return (1.0 - weight) * standardized(ranker_scores) + weight * standardized(query_sims)


def choose_query_weight(moved_share: Callable[[float], float], grid: Sequence[float] = QUERY_WEIGHT_GRID
                        ) -> tuple[float, dict[str, float]]:
    """The smallest weight of `grid` whose `moved_share(w)` (the mean share of the top 10 a foreign
    query replaces, on held-out histories) reaches QUERY_MOVE_SHARE; the largest if none does."""
    record: dict[str, float] = {}
    for w in grid:
        record[f"{w:g}"] = float(moved_share(w))
        if record[f"{w:g}"] >= QUERY_MOVE_SHARE:
            return float(w), record
    return float(grid[-1]), record


__all__ = ["DEFAULT_QUERY_WEIGHT", "QUERY_MOVE_SHARE", "QUERY_WEIGHT_GRID", "RANKER_GRID", "Ranker", "RankingData",
           "blend_query", "choose_query_weight", "fit_ranker", "standardized"]
