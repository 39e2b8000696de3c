"""The co-visitation prior of the fine-tuned model: a second, count-based view of "what comes next".

    score(u, i) = cos(user_u, item_i) + beta * log1p(COVIS_SCALE * covis(u, i))

`covis(u, i)` is the item-to-item co-visitation score of `training.baselines.ItemKNNScorer`
(window 5, cosine-normalized, the user's last 10 items with decay 0.8), counted on the same
training sequences as the neural model. `beta` is chosen after training on the *validation*
cases (the second-to-last interaction of each user -- never the test one) from `BETA_GRID`, by
full-ranking MRR: every case's rank counts, not only whether it made the top 10, which makes the
choice far less noisy than NDCG@10 on a thousand cases (on MovieLens-100K, validation NDCG@10
swung between beta 0.1 and 0.4 from run to run while full MRR picked 0.2 on validation and on
test alike). `beta = 0` is in the grid, so the prior is only kept when it helps on held-out data.

Why: on MovieLens-100K the neural two-tower model alone plateaus near NDCG@10 0.10 while exact
co-visitation counts reach 0.12 -- they are a high-rank memory of which items are consumed
together that a 64-dimensional embedding cannot hold. The two are complementary (together
~0.13 on validation), which is the usual two-stage design: embeddings for recall over the whole
catalog and for new items, counts for precision on warm ones.

Items without training interactions have no co-visitation counts, so the prior pushes them
below warm items with co-counts; `training/calibration.py` gives them back their share of the
top-k (inheriting the co-counts of text-similar warm items was tried and was no better on the
MovieLens cold-start protocol, within noise). The prior is part of the published adapter
(`to_dict`/`from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from training.baselines import ItemKNNScorer, neighbor_sums

COVIS_SCALE = 10.0  # log1p(10 * w): co-visitation scores span ~0.01..2; the log keeps a few strong pairs from dominating
BETA_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6)
MAX_NEIGHBORS = 200  # strongest co-visited items kept per item: bounds the adapter at n_items * 200 pairs


TOP_PREFIX_MIN = 256  # base rows tried before the whole base order in SparseCovis.top


@dataclass(frozen=True)
class SparseCovis:
    """One request's `CovisPrior.feature` row without the dense (n_items,) vector: `base` (the
    feature of a row no history item co-visits -- the prior's popularity backoff, the same for
    every request) everywhere except at `rows` (the history's neighbours, ascending), where it is
    `values`. Serving builds it for a catalog past `DENSE_MAX_ITEMS`: at 10^6 items the dense row
    cost more per request than the rest of the ranking."""

    base: np.ndarray  # (n,) float32, shared by every request of a catalog
    base_order: np.ndarray  # rows with base > 0, base desc then row asc
    rows: np.ndarray
    values: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        """The dense row's values at the rows `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        out = self.base[idx].copy()
        if len(self.rows) and len(idx):
            at = np.clip(np.searchsorted(self.rows, idx), 0, len(self.rows) - 1)
            hit = self.rows[at] == idx
            out[hit] = self.values[at[hit]]
        return out

    def top(self, n: int, allowed: np.ndarray) -> np.ndarray:
        """`top_rows(dense, n, allowed & (dense > 0))` (score desc, then row asc)."""
        ok = allowed[self.rows] & (self.values > 0)
        cand_rows, cand_scores = [self.rows[ok]], [self.values[ok]]
        order = self.base_order
        head = order[:max(4 * n + len(self.rows), TOP_PREFIX_MIN)]
        for part in (head, order) if len(head) < len(order) else (head,):
            keep = part[allowed[part] & ~np.isin(part, self.rows)][:n]
            if len(keep) == n or part is order:
                break
        cand_rows.append(keep)
        cand_scores.append(self.base[keep])
        rows = np.concatenate(cand_rows)
        scores = np.concatenate(cand_scores).astype(np.float64)
        picked = rows[np.lexsort((rows, -scores))][:n]
        return picked


@dataclass
class CovisPrior:
    knn: ItemKNNScorer
    beta: float
    tuning: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, train_items: Sequence[np.ndarray], n_items: int, *, beta: float = 0.0) -> "CovisPrior":
        return cls(ItemKNNScorer.fit(train_items, n_items, max_neighbors=MAX_NEIGHBORS), beta)

    def feature(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray], now_ts: np.ndarray
                ) -> np.ndarray:
        """(B, n_items) log1p(COVIS_SCALE * covis): the prior before its weight."""
        k = self.knn.score(list(histories), list(history_ts), now_ts)
        return np.log1p(COVIS_SCALE * k).astype(np.float32)

    def feature_sparse(self, histories: Sequence[np.ndarray], n: int | None = None) -> list[SparseCovis]:
        """`feature` per user as a `SparseCovis` over the first `n` rows (default all), for a prior
        in CSR storage (`knn.dense is None`). No time argument: the feature does not read it."""
        if self.knn.dense is not None:
            raise ValueError("feature_sparse needs the CSR storage (a catalog past DENSE_MAX_ITEMS); use feature")
        n = self.knn.n_items if n is None else int(n)
        base, order = self._base(n)
        out = []
        for rows, sums in neighbor_sums(self.knn, [np.asarray(h, dtype=np.int64) for h in histories]):
            keep = rows < n
            rows = rows[keep]
            k32 = (sums[keep] + self.knn.backoff[rows]).astype(np.float32)  # as `score` casts its sum
            out.append(SparseCovis(base, order, rows, np.log1p(COVIS_SCALE * k32).astype(np.float32)))
        return out

    def _base(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The feature of a row no history item co-visits, over `n` rows, and its order (cached)."""
        cached = self.__dict__.get("_base_cache")
        if cached is None or cached[0] != n:
            base = np.log1p(COVIS_SCALE * self.knn.backoff[:n].astype(np.float32)).astype(np.float32)
            rows = np.flatnonzero(base > 0)
            cached = (n, base, rows[np.lexsort((rows, -base[rows].astype(np.float64)))])
            self.__dict__["_base_cache"] = cached
        return cached[1], cached[2]

    def boost(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        """(B, n_items) beta * feature; zero when beta is 0."""
        return (self.beta * self.feature(histories, history_ts, now_ts)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        k = self.knn
        return {"beta": float(self.beta), "n_items": k.n_items, "indptr": k.indptr, "neighbors": k.neighbors,
                "weights": k.weights, "counts": k.counts, "last_n": k.last_n, "decay": k.decay,
                "tuning": dict(self.tuning)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], index_map: np.ndarray | None = None, n_items: int | None = None
                  ) -> "CovisPrior":
        """`index_map[old] = new index` (-1: gone) re-keys a prior trained on another catalog."""
        indptr, neighbors, weights = np.asarray(d["indptr"]), np.asarray(d["neighbors"]), np.asarray(d["weights"])
        counts = np.asarray(d["counts"])
        if index_map is not None:
            n_new = int(n_items if n_items is not None else index_map.max() + 1)
            rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
            a, b = index_map[rows], index_map[neighbors]
            keep = (a >= 0) & (b >= 0)
            a, b, w = a[keep], b[keep], weights[keep]
            order = np.lexsort((b, a))
            a, b, w = a[order], b[order], w[order]
            indptr = np.zeros(n_new + 1, dtype=np.int64)
            np.cumsum(np.bincount(a, minlength=n_new), out=indptr[1:])
            neighbors, weights = b, w
            new_counts = np.zeros(n_new, dtype=np.int64)
            ok = index_map >= 0
            new_counts[index_map[ok]] = counts[ok]
            counts = new_counts
        knn = ItemKNNScorer(len(indptr) - 1, indptr, neighbors, weights, counts, last_n=int(d["last_n"]),
                            decay=float(d["decay"]))
        return cls(knn, float(d["beta"]), dict(d.get("tuning", {})))


def tune_beta(evaluate_with: Callable[[float], float], grid: Sequence[float] = BETA_GRID) -> tuple[float, dict[str, float]]:
    """The beta of `grid` with the best validation score (`evaluate_with(beta)`, higher is better);
    ties -> the smaller beta."""
    scores = {f"{b:g}": float(evaluate_with(b)) for b in grid}
    best = max(grid, key=lambda b: (scores[f"{b:g}"], -b))
    return float(best), scores


__all__ = ["BETA_GRID", "COVIS_SCALE", "CovisPrior", "MAX_NEIGHBORS", "SparseCovis", "tune_beta"]
