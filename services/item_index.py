"""The FAISS index of one adapter's item embeddings: inner-product search, new and deleted items.

The index type follows the catalog's size (`training/ann_index.py`): exact (`IndexFlatIP`) up to
`EXACT_MAX_ITEMS`, IVF-SQ8 with exact refinement above it, its `nprobe` chosen for recall@100 >=
0.95 when the version was published. A replica reads that stored index (`ann=`); only a version
published without one has it built at load. `recall` is the measured recall@100 (1.0 when exact),
exported as `streamrec_index_recall`.

FAISS ids are row numbers of `item_ids`; new items are appended (`upsert_many` adds a batch in one
FAISS call: IVF assigns each to its list, no graph to insert into), a deleted one is tombstoned and
filtered out of results, so a search over-fetches by the number of tombstones. A rebuild (the next
adapter version) drops them.

The raw vectors kept beside FAISS (for `vector`, the exact refinement and the first stage's item
table) live in a buffer that grows by `GROWTH_FACTOR` when full, so n upserts copy O(n) rows in all
rather than the whole matrix per insert. `vectors` and `dead` are views of the first
`len(item_ids)` rows: a reader that took one keeps a consistent snapshot while upserts append after it.

With a CUDA GPU visible to FAISS (the `gpu` extra installs faiss-gpu) the FAISS structure moves
to GPU 0 (`use_gpu`, default: when one is there); the raw vectors and refinement stay on the host.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from training.ann_index import EXACT_MAX_ITEMS, IndexMeta, build_index, refined_search

logger = logging.getLogger(__name__)

MIN_GROWTH_ROWS = 64  # the first upsert into a built index reserves at least this many rows
GROWTH_FACTOR = 1.25  # a full buffer grows to this multiple: amortized O(1) copies per row, 25% spare at most


@dataclass
class SearchResult:
    item_ids: list[list[str]]
    scores: np.ndarray  # (B, k) float32, -inf where fewer than k results


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu, which has no get_num_gpus)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class ItemIndex:
    def __init__(self, item_ids: list[str], vectors: np.ndarray, *, exact_max_items: int = EXACT_MAX_ITEMS,
                 ann: tuple[faiss.Index, IndexMeta] | None = None, use_gpu: bool | None = None) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(item_ids):
            raise ValueError(f"embeddings of shape {vectors.shape} do not match {len(item_ids)} item ids")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("duplicate item ids in the embeddings")
        if not np.isfinite(vectors).all():
            raise ValueError("embeddings contain NaN or infinite values")
        self.dim = vectors.shape[1]
        if ann is None:
            ann = build_index(vectors, exact_max_items=exact_max_items)
            if not ann[1].exact:
                logger.warning("built a %s index of %d items at load (the version stores none): %.1f s",
                               ann[1].index_type, len(item_ids), ann[1].build_s)
        index, self.meta = ann
        if index.ntotal != len(item_ids) or index.d != self.dim:
            raise ValueError(f"the index holds {index.ntotal} vectors of dim {index.d}; the embeddings have "
                             f"{len(item_ids)} x {self.dim}")
        self.exact = self.meta.exact
        self.nprobe = self.meta.nprobe
        self.on_gpu = False
        if use_gpu is None:
            use_gpu = gpu_count() > 0
        if use_gpu:
            self._gpu_resources = faiss.StandardGpuResources()  # kept: the GPU index uses it
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            if not self.exact:
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", self.nprobe)
            self.on_gpu = True
        self.index: faiss.Index = index
        self.item_ids = list(item_ids)
        self.row = {item: i for i, item in enumerate(self.item_ids)}  # live items only: a tombstoned row leaves it
        # rows past len(item_ids) are spare capacity
        self._vectors = vectors
        self._dead = np.zeros(len(item_ids), dtype=bool)
        self._n_dead = 0
        self.reallocations = 0  # how often upserts outgrew the buffer (O(log n) for n upserts)
        self._lock = threading.Lock()  # add / remove vs search

    @property
    def recall(self) -> float:
        """Measured recall@100 against exact search (1.0 for an exact index)."""
        return self.meta.recall100

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

    def vector(self, item_id: str) -> np.ndarray | None:
        row = self.row.get(item_id)
        if row is None or self.dead[row]:
            return None
        return self.vectors[row]

    def upsert(self, item_id: str, vector: np.ndarray) -> None:
        """Add a new item (or replace a known one's vector: the old row is tombstoned)."""
        self.upsert_many([item_id], np.asarray(vector, dtype=np.float32).reshape(1, self.dim))

    def upsert_many(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add items in one FAISS call (known ones get a new row; their old row is tombstoned; an id
        twice in the batch: the last one wins)."""
        v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(item_ids), self.dim))
        if not np.isfinite(v).all():
            bad = [item_ids[i] for i in np.flatnonzero(~np.isfinite(v).all(axis=1))[:5]]
            raise ValueError(f"vectors of {bad} contain NaN or infinite values")
        m = len(item_ids)
        if m == 0:
            return
        with self._lock:
            n = len(self.item_ids)
            if n + m > len(self._vectors):
                self._grow(max(n + m, int(n * GROWTH_FACTOR), n + MIN_GROWTH_ROWS))
            self.index.add(v)
            # rows are written before item_ids grows: a reader never sees a row that is not filled in
            self._vectors[n:n + m] = v
            self._dead[n:n + m] = False
            for j, item_id in enumerate(item_ids):
                old = self.row.get(item_id)
                if old is not None:
                    self._dead[old] = True
                    self._n_dead += 1
                self.row[item_id] = n + j
            self.item_ids.extend(item_ids)

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

    def _search_rows(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.exact:
            return self.index.search(q, fetch)
        return refined_search(self.index, self.vectors, q, fetch, self.nprobe)

    def _hits(self, queries: np.ndarray, k: int, exclude_rows: Sequence[np.ndarray] | None,
              below: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, (rows, scores) of its top-`k`, best first, skipping tombstones, `exclude_rows[b]`
        and rows >= `below`: the one filter behind `search_rows` and `search`."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            n = len(self.item_ids)
            extra = self._n_dead + max((len(e) for e in exclude_rows or ()), default=0)
            fetch = min(k + extra + (n - below if below is not None else 0), n)
            if fetch == 0:
                return [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)) for _ in range(len(q))]
            scores, rows = self._search_rows(q, fetch)
            dead = self.dead
        limit = n if below is None else below
        out = []
        for b in range(len(q)):
            r, s = rows[b], scores[b]
            keep = (r >= 0) & (r < limit)
            r, s = r[keep], s[keep]
            keep = ~dead[r]
            if exclude_rows is not None and len(exclude_rows[b]):
                keep &= ~np.isin(r, exclude_rows[b])
            out.append((r[keep][:k].astype(np.int64), s[keep][:k]))
        return out

    def search_rows(self, queries: np.ndarray, k: int, exclude_rows: Sequence[np.ndarray] | None = None,
                    below: int | None = None) -> list[np.ndarray]:
        """`search` in rows: per query, the rows of its top-`k` (best first), skipping tombstones,
        `exclude_rows[b]` and rows >= `below` (a rank state's size) -- no id strings on the request path."""
        return [rows for rows, _ in self._hits(queries, k, exclude_rows, below)]

    def search(self, queries: np.ndarray, k: int, exclude: list[set[str]] | None = None) -> SearchResult:
        """Top-`k` items by inner product for each query row, skipping tombstones and `exclude[b]`."""
        exclude_rows = None if exclude is None else [
            np.asarray([r for r in map(self.row.get, e) if r is not None], dtype=np.int64) for e in exclude]
        hits = self._hits(queries, k, exclude_rows, None)
        ids = self.item_ids
        out_scores = np.full((len(hits), k), -np.inf, dtype=np.float32)
        for b, (_, s) in enumerate(hits):
            out_scores[b, :len(s)] = s
        return SearchResult([[ids[r] for r in rows] for rows, _ in hits], out_scores)


__all__ = ["EXACT_MAX_ITEMS", "GROWTH_FACTOR", "ItemIndex", "MIN_GROWTH_ROWS", "SearchResult", "gpu_count"]
