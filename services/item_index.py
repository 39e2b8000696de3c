"""The FAISS index of one adapter's item embeddings: inner-product search, new and deleted items.

Below `EXACT_MAX_ITEMS` the index is exact (`IndexFlatIP`); above it is HNSW
(`IndexHNSWFlat`, inner product) and its recall@`RECALL_K` against exact search is measured on
`RECALL_SAMPLE` of its own items when it is built (`ItemIndex.recall`, exported as a metric).
FAISS ids are row numbers of `item_ids`; a new item is appended, a deleted one is tombstoned
(HNSW cannot remove) and filtered out of results, so a search over-fetches by the number of
tombstones. A rebuild (the next adapter version) drops them.

The vectors kept beside FAISS (for `vector`, recall and the user tower's item table) live in a
buffer whose capacity doubles when it is full, so n single upserts copy O(n) rows in all rather
than the whole matrix per insert. `vectors` and `dead` are views of the first `len(item_ids)`
rows: a reader that took one keeps a consistent snapshot while upserts append after it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

EXACT_MAX_ITEMS = 200_000  # exact search stays under ~5 ms per query on 2 cores up to about here (64-d)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
RECALL_K = 10
RECALL_SAMPLE = 200
MIN_GROWTH_ROWS = 64  # the first upsert into a built index reserves at least this many rows


@dataclass
class SearchResult:
    item_ids: list[list[str]]
    scores: np.ndarray  # (B, k) float32, -inf where fewer than k results


class ItemIndex:
    def __init__(self, item_ids: list[str], vectors: np.ndarray, *, exact_max_items: int = EXACT_MAX_ITEMS) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(item_ids):
            raise ValueError(f"embeddings of shape {vectors.shape} do not match {len(item_ids)} item ids")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("duplicate item ids in the embeddings")
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings contain NaN or infinite values")
        self.dim = vectors.shape[1]
        self.exact = len(item_ids) <= exact_max_items
        if self.exact:
            self.index: faiss.Index = faiss.IndexFlatIP(self.dim)
        else:
            self.index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            self.index.hnsw.efSearch = HNSW_EF_SEARCH
        self.index.add(vectors)
        self.item_ids = list(item_ids)
        self.row = {item: i for i, item in enumerate(self.item_ids)}  # live items only: a tombstoned row leaves it
        # kept: `similar` looks items up, recall is measured against it; rows past len(item_ids) are spare capacity
        self._vectors = vectors
        self._dead = np.zeros(len(item_ids), dtype=bool)
        self._n_dead = 0
        self.reallocations = 0  # how often upserts outgrew the buffer (O(log n) for n upserts)
        self._lock = threading.Lock()  # add / remove vs search
        self.recall = 1.0 if self.exact else self._measure_recall()

    @property
    def vectors(self) -> np.ndarray:
        """(n, dim) float32, row r = `item_ids[r]` (tombstoned rows included)."""
        return self._vectors[:len(self.item_ids)]

    @property
    def dead(self) -> np.ndarray:
        """(n,) bool: True for tombstoned rows (deleted items, replaced vectors)."""
        return self._dead[:len(self.item_ids)]

    @property
    def capacity(self) -> int:
        """Rows the buffer holds before the next upsert has to reallocate it."""
        return len(self._vectors)

    @property
    def size(self) -> int:
        return len(self.item_ids) - self._n_dead

    def _measure_recall(self) -> float:
        rng = np.random.default_rng(0)
        sample = rng.choice(len(self.vectors), size=min(RECALL_SAMPLE, len(self.vectors)), replace=False)
        q = self.vectors[sample]
        k = min(RECALL_K, len(self.vectors))
        _, approx = self.index.search(q, k)
        truth = np.argsort(-(q @ self.vectors.T), axis=1)[:, :k]
        hits = sum(len(set(a) & set(t)) for a, t in zip(approx, truth))
        return hits / float(len(sample) * k)

    def vector(self, item_id: str) -> np.ndarray | None:
        row = self.row.get(item_id)
        if row is None or self.dead[row]:
            return None
        return self.vectors[row]

    def upsert(self, item_id: str, vector: np.ndarray) -> None:
        """Add a new item (or replace a known one's vector: the old row is tombstoned)."""
        v = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, self.dim))
        with self._lock:
            n = len(self.item_ids)
            if n == len(self._vectors):
                self._grow(max(2 * n, MIN_GROWTH_ROWS))
            old = self.row.get(item_id)
            if old is not None:
                self._dead[old] = True
                self._n_dead += 1
            self.index.add(v)
            # the row is written before item_ids grows: a reader never sees a row that is not filled in
            self._vectors[n] = v[0]
            self._dead[n] = False
            self.row[item_id] = n
            self.item_ids.append(item_id)

    def _grow(self, rows: int) -> None:
        """Move the buffers into new ones of `rows` rows (old views stay valid: they keep the old buffer)."""
        n = len(self.item_ids)
        vectors = np.empty((rows, self.dim), dtype=np.float32)
        vectors[:n] = self._vectors[:n]
        dead = np.zeros(rows, dtype=bool)
        dead[:n] = self._dead[:n]
        self._vectors, self._dead = vectors, dead
        self.reallocations += 1

    def remove(self, item_id: str) -> bool:
        with self._lock:
            row = self.row.pop(item_id, None)
            if row is None:
                return False
            self._dead[row] = True
            self._n_dead += 1
            return True

    def search(self, queries: np.ndarray, k: int, exclude: list[set[str]] | None = None) -> SearchResult:
        """Top-`k` items by inner product for each query row, skipping tombstones and `exclude[b]`."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            extra = self._n_dead + max((len(e) for e in exclude or ()), default=0)
            fetch = min(k + extra, len(self.item_ids))
            if fetch == 0:
                return SearchResult([[] for _ in range(len(q))], np.full((len(q), k), -np.inf, dtype=np.float32))
            scores, rows = self.index.search(q, fetch)
            ids, dead = self.item_ids, self.dead
        out_ids: list[list[str]] = []
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        for b in range(len(q)):
            skip = exclude[b] if exclude else ()
            got: list[str] = []
            for s, r in zip(scores[b], rows[b]):
                if r < 0 or dead[r] or ids[r] in skip:
                    continue
                out_scores[b, len(got)] = s
                got.append(ids[r])
                if len(got) == k:
                    break
            out_ids.append(got)
        return SearchResult(out_ids, out_scores)


__all__ = ["EXACT_MAX_ITEMS", "ItemIndex", "MIN_GROWTH_ROWS", "SearchResult"]
