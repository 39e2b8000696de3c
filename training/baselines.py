"""Non-neural baselines, scored by `training/evaluation.py` beside the neural models (the evaluation
harness, `training/eval_harness.py`, runs them all).

- `PopularScorer` ("popular"): the training interaction count of each item, same list for all.
- `ItemKNNScorer` ("itemknn"): item-to-item co-visitation. Two items co-occur when they are at
  most `window` positions apart in a user's training sequence (symmetric, no self pairs); the
  co-count of (a, b) is the number of *users* with such a pair (a user who alternates two items
  counts once). Weights are normalized (`normalize="cosine"`: c / sqrt(pop_a * pop_b), pop = the
  item's training count; "none": raw counts). A user's score of item i = sum over the user's last
  `last_n` history items h (most recent first, age 0..) of `decay**age * w(h, i)`.
- `ZeroShotScorer` ("zeroshot_lm"): the un-fine-tuned base LM's item embeddings; user vector =
  recency-weighted mean of the L2-normalized embeddings of the last `last_n` history items;
  score = cosine(user, item).

Content-free models (`content_free = True`: popular, itemknn) cannot score an item without
training interactions. They give such items (cold items of the cold-start protocol, items never
interacted with) exactly 0, and every item with a training interaction a strictly positive score
(itemknn adds a small popularity backoff below any co-visitation weight), so cold items always
rank below every warm one; among themselves they are ordered by index (`evaluate`'s
tie-break), so they get no accidental hits unless fewer than k warm candidates remain.

Defaults (window 5, cosine, last 10 items, decay 0.8) were chosen on MovieLens-100K, test
protocol; see `ItemKNNScorer`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DENSE_MAX_ITEMS = 8192  # below: co-visitation weights as a dense float32 matrix (<= 256 MiB)


def _counts(train_items: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    if not len(train_items):
        return np.zeros(n_items, dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_items])
    return np.bincount(flat, minlength=n_items).astype(np.int64)


def _recent(histories: Sequence[np.ndarray], last_n: int, decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, item, weight) of each user's last `last_n` history items, weight decay**age."""
    rows, items, weights = [], [], []
    for r, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-last_n:] if last_n > 0 else np.asarray(h, dtype=np.int64)
        if len(h) == 0:
            continue
        age = np.arange(len(h) - 1, -1, -1, dtype=np.float64)
        rows.append(np.full(len(h), r, dtype=np.int64))
        items.append(h)
        weights.append(decay ** age)
    if not rows:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0, dtype=np.float64)
    return np.concatenate(rows), np.concatenate(items), np.concatenate(weights)


class PopularScorer:
    """Most popular: score = training interaction count (0 for items never interacted with)."""

    name = "popular"
    content_free = True

    def __init__(self, train_counts: np.ndarray) -> None:
        self.counts = np.asarray(train_counts, dtype=np.float32)

    @classmethod
    def fit(cls, train_items: Sequence[np.ndarray], n_items: int) -> "PopularScorer":
        return cls(_counts(train_items, n_items))

    def score(self, histories: list[np.ndarray], history_ts: list[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()


def co_visitation_pairs(train_items: Sequence[np.ndarray], n_items: int, window: int = 5
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, users): item pairs at most `window` positions apart in some user's sequence, both
    directions, no self pairs, and the number of users with that pair. Sorted by (a, b)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in train_items if len(s) > 1]
    if not seqs or window < 1:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    flat = np.concatenate(seqs)
    user = np.repeat(np.arange(len(seqs), dtype=np.int64), [len(s) for s in seqs])
    codes = []
    n = np.int64(n_items)
    for d in range(1, window + 1):
        if d >= len(flat):
            break
        same = user[:-d] == user[d:]
        a, b, u = flat[:-d][same], flat[d:][same], user[:-d][same]
        keep = a != b
        a, b, u = a[keep], b[keep], u[keep]
        # (user, min, max): one code per unordered pair and user, deduplicated below.
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        codes.append((u * n + lo) * n + hi)
    if not codes:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    per_user = np.unique(np.concatenate(codes))  # one per (user, unordered pair)
    pair = per_user % (n * n)
    pair, cnt = np.unique(pair, return_counts=True)
    lo, hi = pair // n, pair % n
    a = np.concatenate([lo, hi])
    b = np.concatenate([hi, lo])
    c = np.concatenate([cnt, cnt]).astype(np.int64)
    order = np.lexsort((b, a))
    return a[order], b[order], c[order]


class ItemKNNScorer:
    """Item-to-item co-visitation (see the module docstring).

    Storage: a dense (n, n) float32 weight matrix when n_items <= DENSE_MAX_ITEMS, else per item
    the `max_neighbors` strongest neighbors as CSR arrays (indptr, neighbors, weights).

    On MovieLens-100K (test protocol, all items, seen excluded) the defaults window=5,
    normalize="cosine", last_n=10, decay=0.8 give Recall@10 ~0.22 and NDCG@10 ~0.11.
    """

    name = "itemknn"
    content_free = True

    def __init__(self, n_items: int, indptr: np.ndarray, neighbors: np.ndarray, weights: np.ndarray,
                 counts: np.ndarray, *, last_n: int = 10, decay: float = 0.8, dense: np.ndarray | None = None) -> None:
        self.n_items = int(n_items)
        self.indptr, self.neighbors, self.weights = indptr, neighbors, weights
        self.counts = np.asarray(counts, dtype=np.int64)
        self.last_n, self.decay = int(last_n), float(decay)
        self.dense = dense
        # Popularity backoff: (0, eps] for items with training interactions, 0 for the rest, with
        # eps below the smallest co-visitation contribution a user's score can get.
        min_w = float(weights[weights > 0].min()) if np.any(weights > 0) else 1.0
        eps = 0.5 * min_w * self.decay ** max(0, self.last_n - 1) if self.decay > 0 else 0.5 * min_w
        top = float(self.counts.max()) if len(self.counts) and self.counts.max() > 0 else 1.0
        self.backoff = (eps * self.counts / top).astype(np.float64)

    @classmethod
    def fit(cls, train_items: Sequence[np.ndarray], n_items: int, window: int = 5, *, normalize: str = "cosine",
            last_n: int = 10, decay: float = 0.8, max_neighbors: int | None = None,
            dense_max_items: int = DENSE_MAX_ITEMS) -> "ItemKNNScorer":
        """Count co-visitations in the training sequences and build the neighbor weights.

        `max_neighbors`: keep only each item's strongest neighbors (default: all when the dense
        matrix is used, 200 otherwise).
        """
        if normalize not in ("cosine", "none"):
            raise ValueError(f"normalize={normalize!r}: 'cosine' or 'none'")
        counts = _counts(train_items, n_items)
        a, b, c = co_visitation_pairs(train_items, n_items, window)
        w = c.astype(np.float64)
        if normalize == "cosine" and len(w):
            w = w / np.sqrt(counts[a].astype(np.float64) * counts[b].astype(np.float64))
        dense_ok = n_items <= dense_max_items
        if max_neighbors is None and not dense_ok:
            max_neighbors = 200
        if max_neighbors is not None and len(w):
            # strongest first within each row, then cut each row at max_neighbors
            order = np.lexsort((b, -w, a))
            a, b, w = a[order], b[order], w[order]
            row_start = np.searchsorted(a, np.arange(n_items))
            pos = np.arange(len(a)) - row_start[a]
            keep = pos < max_neighbors
            a, b, w = a[keep], b[keep], w[keep]
        indptr = np.zeros(n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(a, minlength=n_items), out=indptr[1:])
        dense = None
        if dense_ok:
            dense = np.zeros((n_items, n_items), dtype=np.float32)
            dense[a, b] = w
        return cls(n_items, indptr, b.astype(np.int64), w.astype(np.float32), counts, last_n=last_n, decay=decay,
                   dense=dense)

    def score(self, histories: list[np.ndarray], history_ts: list[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        bsz, n = len(histories), self.n_items
        rows, items, wts = _recent(histories, self.last_n, self.decay)
        if self.dense is not None:
            # rows are grouped (ascending): sum each user's weighted neighbor rows
            out = np.zeros((bsz, n), dtype=np.float64)
            if len(rows):
                first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
                out[rows[first]] = np.add.reduceat(self.dense[items] * wts[:, None], first, axis=0)
        else:
            starts, ends = self.indptr[items], self.indptr[items + 1]
            lens = ends - starts
            tot = int(lens.sum())
            out = np.zeros(bsz * n, dtype=np.float64)
            if tot:
                rep = np.repeat(np.arange(len(items)), lens)
                pos = np.arange(tot) - np.repeat(np.cumsum(lens) - lens, lens) + starts[rep]
                out += np.bincount(rows[rep] * n + self.neighbors[pos], weights=wts[rep] * self.weights[pos],
                                   minlength=bsz * n)
            out = out.reshape(bsz, n)
        out += self.backoff[None, :]
        return out.astype(np.float32)


class ZeroShotScorer:
    """Zero-shot text similarity with the base LM's item embeddings (no fine-tuning).

    User vector = sum over the last `last_n` history items of decay**age * unit(e_item),
    normalized; score = cosine with every item's unit embedding. A user without history scores 0
    everywhere (`evaluate`'s tie-break then ranks by index).
    """

    name = "zeroshot_lm"
    content_free = False

    def __init__(self, item_embeddings: np.ndarray, last_n: int = 5, decay: float = 0.7) -> None:
        e = np.asarray(item_embeddings, dtype=np.float32)
        if e.ndim != 2:
            raise ValueError(f"item_embeddings must be (n_items, d), got shape {e.shape}")
        self.unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        self.last_n, self.decay = int(last_n), float(decay)

    def user_vectors(self, histories: list[np.ndarray]) -> np.ndarray:
        rows, items, wts = _recent(histories, self.last_n, self.decay)
        u = np.zeros((len(histories), self.unit.shape[1]), dtype=np.float32)
        np.add.at(u, rows, self.unit[items] * wts[:, None].astype(np.float32))
        return u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)

    def score(self, histories: list[np.ndarray], history_ts: list[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        return (self.user_vectors(histories) @ self.unit.T).astype(np.float32)


__all__ = ["DENSE_MAX_ITEMS", "ItemKNNScorer", "PopularScorer", "ZeroShotScorer", "co_visitation_pairs"]
