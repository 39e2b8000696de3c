"""The ranking features of (user, candidate, context): one module, used by evaluation and serving.

Both stages of a recommendation go through here, offline (`training/two_stage.py`, scoring the
validation and test cases) and online (`services/loaded_adapter.py`, one request at a time), so
the ranker sees at serving exactly the features it was trained on:

* **Retrieval** (`union_candidates`): each source gives its items in its own order -- the LM
  towers' top-N (`tower`), the co-visitation neighbours of the recent items (`covis`), the trending
  items (`trending`), the best new items by the towers (`new`: they have no co-visitation and no
  popularity, and would otherwise never be retrieved) and, with a query, the query's top-N
  (`query`). The candidate set is their union, minus the items the request excludes; each
  candidate keeps its rank in every source (NaN where the source did not retrieve it).
* **Features** (`candidate_features`, columns `FEATURE_NAMES`):

  - `tower` -- cosine of the user and item tower vectors;
  - `query_sim` -- cosine of the query (encoded by the same LM + LoRA) and the item; NaN without one;
  - `covis` -- the co-visitation prior's value (`CovisPrior.feature`: the last 10 items, decayed);
    `covis_last1..3` -- the co-visitation weight with each of the three most recent items alone;
  - `log_pop` -- log(1 + training interactions); `trend` -- log(1 + 1000 x the item's share of the
    exponentially decayed recent interactions (`TrendingClock`), a share so that the age of the
    snapshot does not move it);
  - `neighbor_age_h` -- log(1 + hours) since the user last interacted with a co-visitation
    neighbour of the item (NaN when none of the last `NEIGHBOR_HISTORY` items is one);
    `since_last_h` -- log(1 + hours) since the user's last interaction (NaN: time unknown);
  - `activity` -- log(1 + history length);
  - `is_new` -- 1 for an item with no training interactions (scored from its text alone);
  - `rank_<source>` -- the candidate's 0-based rank in each retrieval source, NaN if absent.

NaN is LightGBM's missing value: a feature that does not apply is missing, never a made-up number.
Times are epoch milliseconds; a timestamp <= 0 means "unknown" (an anonymous session's items).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from training.baselines import ItemKNNScorer
from training.covis import COVIS_SCALE

SOURCES = ("tower", "covis", "trending", "new", "query")
FEATURE_NAMES = ("tower", "query_sim", "covis", "covis_last1", "covis_last2", "covis_last3", "log_pop", "trend",
                 "neighbor_age_h", "since_last_h", "activity", "is_new",
                 *(f"rank_{s}" for s in SOURCES))
LAST_ITEMS = 3  # covis_last1..3
NEIGHBOR_HISTORY = 10  # recent items whose co-visitation neighbours count for neighbor_age_h
MS_PER_HOUR = 3_600_000.0
TREND_SCALE = 1000.0  # trend = log1p(TREND_SCALE * share): shares are ~1/n_items, the log keeps hits from dominating


@dataclass(frozen=True)
class RetrievalSizes:
    """How many items each retrieval source contributes (settings: STREAMREC_RETRIEVAL_*)."""

    tower: int = 200
    covis: int = 200
    trending: int = 50
    new: int = 50
    query: int = 200

    @classmethod
    def from_n(cls, n: int) -> "RetrievalSizes":
        """`n` from the towers, the co-visitation neighbours and a query; n/4 trending and new items."""
        return cls(tower=n, covis=n, trending=max(1, n // 4), new=max(1, n // 4), query=n)

    def to_dict(self) -> dict[str, int]:
        return {s: int(getattr(self, s)) for s in SOURCES}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> "RetrievalSizes":
        return cls(**{s: int(d[s]) for s in SOURCES if s in d})


def top_rows(scores: np.ndarray, n: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """The `n` best rows of a 1-D score vector (score desc, then row asc), among `allowed`
    rows with a finite score."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s) if allowed is None else (np.isfinite(s) & allowed)
    rows = np.flatnonzero(ok)
    if len(rows) > n:
        sv = s[rows]
        kth = sv[np.argpartition(-sv, n - 1)[:n]].min()
        rows = rows[sv >= kth]  # every row tied with the n-th too: ties go by row, not by argpartition's pick
    return rows[np.lexsort((rows, -s[rows]))][:n]


@dataclass
class Candidates:
    """The union of the sources: `rows` (catalog rows) and each source's rank of every row."""

    rows: np.ndarray
    ranks: dict[str, np.ndarray]  # source -> float (n,) 0-based rank, NaN where absent

    def __len__(self) -> int:
        return len(self.rows)

    def in_source(self, source: str) -> np.ndarray:
        return np.isfinite(self.ranks[source])


def union_candidates(sources: Mapping[str, np.ndarray], excluded: np.ndarray | None = None) -> Candidates:
    """Union of the sources' ordered rows, first appearance first, minus `excluded` (bool per row)."""
    ordered = [np.asarray(sources.get(s, ()), dtype=np.int64) for s in SOURCES]
    allrows = np.concatenate(ordered) if ordered else np.zeros(0, dtype=np.int64)
    if excluded is not None and len(allrows):
        allrows = allrows[~excluded[allrows]]
    rows, first = np.unique(allrows, return_index=True)
    rows = rows[np.argsort(first, kind="stable")]
    ranks: dict[str, np.ndarray] = {}
    # vectorized (a Python loop over ~500 candidates x 5 sources cost ~1 ms per served request)
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    for s, src in zip(SOURCES, ordered):
        rank = np.full(len(rows), np.nan)
        if len(src) and len(rows):
            u, first_j = np.unique(src, return_index=True)  # a row's first position in the source
            at = np.clip(np.searchsorted(srt, u), 0, len(srt) - 1)
            hit = srt[at] == u
            rank[order[at[hit]]] = first_j[hit]
        ranks[s] = rank
    return Candidates(rows, ranks)


class TrendingClock:
    """Exponentially decayed interaction counts per item *as of* a time, from timestamped events:
    `at(now)` counts only events strictly before `now`, each weighted 2^-(age / half-life) -- the
    streaming feature job's `trending` column, computed for any past moment (no future leaks in)."""

    def __init__(self, items: np.ndarray, ts: np.ndarray, n_items: int, half_life_ms: float) -> None:
        if half_life_ms <= 0:
            raise ValueError(f"half_life_ms={half_life_ms!r}: must be > 0")
        order = np.argsort(ts, kind="stable")
        self.items = np.asarray(items, dtype=np.int64)[order]
        self.ts = np.asarray(ts, dtype=np.int64)[order]
        self.n_items, self.half_life_ms = int(n_items), float(half_life_ms)

    @classmethod
    def from_sequences(cls, train_items: Sequence[np.ndarray], train_ts: Sequence[np.ndarray], n_items: int,
                       half_life_ms: float) -> "TrendingClock":
        items = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_items]) if train_items else np.zeros(0)
        ts = np.concatenate([np.asarray(t, dtype=np.int64) for t in train_ts]) if train_ts else np.zeros(0)
        return cls(items, ts, n_items, half_life_ms)

    def at(self, now_ts: np.ndarray) -> np.ndarray:
        """(B, n_items) decayed counts as of each `now_ts[b]` (one sweep in time order)."""
        now_ts = np.asarray(now_ts, dtype=np.int64)
        out = np.zeros((len(now_ts), self.n_items), dtype=np.float64)
        v = np.zeros(self.n_items, dtype=np.float64)
        t_cur, done = None, 0
        for b in np.argsort(now_ts, kind="stable"):
            now = int(now_ts[b])
            upto = int(np.searchsorted(self.ts, now, side="left"))
            if t_cur is not None:
                v *= 2.0 ** (-(now - t_cur) / self.half_life_ms)
            if upto > done:
                age = (now - self.ts[done:upto]) / self.half_life_ms
                v += np.bincount(self.items[done:upto], weights=2.0 ** -age, minlength=self.n_items)
                done = upto
            t_cur = now
            out[b] = v
        return out


def trend_feature(decayed: np.ndarray) -> np.ndarray:
    """log1p(TREND_SCALE * share of the decayed counts), per row (the last axis is the catalog)."""
    d = np.asarray(decayed, dtype=np.float64)
    total = d.sum(axis=-1, keepdims=True)
    return np.log1p(TREND_SCALE * d / np.where(total > 0, total, 1.0)).astype(np.float32)


def _hours(ms: np.ndarray | float) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(ms, dtype=np.float64), 0.0) / MS_PER_HOUR)


def neighbor_weights(knn: ItemKNNScorer, item: int, rows: np.ndarray) -> np.ndarray:
    """Co-visitation weight w(item, r) for each of `rows` (0 where they never co-visit)."""
    if knn.dense is not None:
        return knn.dense[item, rows].astype(np.float64)
    lo, hi = knn.indptr[item], knn.indptr[item + 1]
    nb, w = knn.neighbors[lo:hi], knn.weights[lo:hi]
    order = np.argsort(nb, kind="stable")
    nb, w = nb[order], w[order]
    at = np.clip(np.searchsorted(nb, rows), 0, max(len(nb) - 1, 0))
    hit = (nb[at] == rows) if len(nb) else np.zeros(len(rows), dtype=bool)
    return np.where(hit, w[at] if len(nb) else 0.0, 0.0).astype(np.float64)


def neighbor_weight_matrix(knn: ItemKNNScorer, items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(items), len(rows)): `neighbor_weights` of each of `items` in one pass (one call per
    history item cost ~50 us each, ~0.6 ms per served request)."""
    items = np.asarray(items, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if knn.dense is not None:
        return knn.dense[np.ix_(items, rows)].astype(np.float64)
    out = np.zeros((len(items), len(rows)), dtype=np.float64)
    starts, ends = knn.indptr[items], knn.indptr[items + 1]
    lens = ends - starts
    tot = int(lens.sum())
    if not tot or not len(rows):
        return out
    owner = np.repeat(np.arange(len(items)), lens)
    pos = np.arange(tot) - np.repeat(np.cumsum(lens) - lens, lens) + starts[owner]
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    nb = knn.neighbors[pos]
    at = np.clip(np.searchsorted(srt, nb), 0, len(srt) - 1)
    hit = srt[at] == nb
    # reversed: were a neighbour listed twice for one item, the first listing wins, as in neighbor_weights
    out[owner[hit][::-1], order[at[hit]][::-1]] = knn.weights[pos][hit][::-1]
    return out


def candidate_features(cand: Candidates, *, user: np.ndarray, item_vectors: np.ndarray, covis: np.ndarray | None,
                       knn: ItemKNNScorer | None, history: np.ndarray, history_ts: np.ndarray, now_ts: int,
                       log_pop: np.ndarray, trend: np.ndarray, is_new: np.ndarray,
                       query: np.ndarray | None = None) -> np.ndarray:
    """(len(cand), len(FEATURE_NAMES)) float32, columns in FEATURE_NAMES order.

    `user`: the user tower vector; `item_vectors[r]`: catalog row r's tower vector; `covis`: the
    prior's feature over the whole catalog (`CovisPrior.feature` row) or None without a prior;
    `knn`: the prior's co-visitation table (for the per-item features); `history` rows and
    `history_ts`, oldest first; `log_pop`, `trend`, `is_new`: per catalog row; `query`: the
    query vector or None."""
    rows = cand.rows
    n = len(rows)
    f = np.full((n, len(FEATURE_NAMES)), np.nan, dtype=np.float64)
    col = {name: j for j, name in enumerate(FEATURE_NAMES)}
    vecs = item_vectors[rows]
    f[:, col["tower"]] = vecs @ user
    if query is not None:
        f[:, col["query_sim"]] = vecs @ query
    history = np.asarray(history, dtype=np.int64)
    history_ts = np.asarray(history_ts, dtype=np.int64)
    if covis is not None:
        f[:, col["covis"]] = covis[rows]
    if knn is not None and n:
        tail = history[-max(NEIGHBOR_HISTORY, LAST_ITEMS):]
        w = neighbor_weight_matrix(knn, tail, rows)  # row i: tail[i]
        for j in range(LAST_ITEMS):
            f[:, col[f"covis_last{j + 1}"]] = np.log1p(COVIS_SCALE * w[-1 - j]) if j < len(history) else np.nan
        # the most recent interaction with a neighbour of each candidate: newer items overwrite older
        age = np.full(n, np.nan)
        first = len(tail) - min(NEIGHBOR_HISTORY, len(history))
        for i, t in zip(range(first, len(tail)), history_ts[-NEIGHBOR_HISTORY:]):
            if t > 0:
                age[w[i] > 0] = now_ts - t
        f[:, col["neighbor_age_h"]] = np.where(np.isfinite(age), _hours(np.nan_to_num(age)), np.nan)
    f[:, col["log_pop"]] = log_pop[rows]
    f[:, col["trend"]] = trend[rows]
    if len(history_ts) and history_ts[-1] > 0:
        f[:, col["since_last_h"]] = _hours(now_ts - history_ts[-1])
    f[:, col["activity"]] = np.log1p(len(history))
    f[:, col["is_new"]] = is_new[rows]
    for s in SOURCES:
        f[:, col[f"rank_{s}"]] = cand.ranks[s]
    return f.astype(np.float32)


__all__ = ["Candidates", "FEATURE_NAMES", "LAST_ITEMS", "NEIGHBOR_HISTORY", "RetrievalSizes", "SOURCES",
           "TREND_SCALE", "TrendingClock", "candidate_features", "neighbor_weight_matrix", "neighbor_weights", "top_rows",
           "trend_feature",
           "union_candidates"]
