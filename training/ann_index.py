"""The nearest-neighbour index of a version's item vectors: its type follows the catalog's size, and
a large one is built when the version is published, not when a replica loads it.

    python -m training.ann_index --items 1000000 --dim 64 --json /tmp/ann.json   # a synthetic catalog

* Up to `EXACT_MAX_ITEMS` items the index is exact (`IndexFlatIP`, inner product): one pass over
  the catalog per query costs a few ms at that size, and serving's first stage scans it anyway.
  No file is stored; a replica builds it from the embeddings in a memcpy.
* Above it, IVF with 8-bit scalar-quantized codes (`IVF<nlist>,SQ8`, ~`sqrt(n)` lists), searched for
  `REFINE_FACTOR` x k candidates whose exact scores are then computed from the raw vectors the
  replica keeps anyway (the first stage reads them): memory is the raw vectors + dim bytes of code
  + 8 bytes of id per item (~1.28x the raw vectors at 64-d), against ~2.6x for HNSW (M=32) beside
  the same raw vectors, and adding items is cheap (an item is assigned to its list), where HNSW
  pays a graph insertion per item.
* `nprobe` (lists searched per query) is chosen at build: doubled from `NPROBE_START` until
  recall@`RECALL_K` against exact search, on `RECALL_QUERIES` sampled queries, reaches
  `RECALL_TARGET`. At `nprobe = nlist` the search is exhaustive and refined exactly, so the target
  is always met; what the data costs shows in the chosen `nprobe` and the query time.
  The queries are sampled item vectors moved off the item by noise (`QUERY_NOISE`): a user's
  vector lies near the items they like, not on one (an item as its own query finds its own cell).

`write_index(stage_dir, vectors)` stores `INDEX_FILE` and `INDEX_META_FILE` beside the
embeddings before publishing (the registry checksums them with the rest); `read_index(version_dir)`
reads them back and checks them against the embeddings. Read, not memory-mapped: FAISS maps IVF
lists read-only (`IO_FLAG_MMAP`; an add then aborts the process) and a replica adds new catalog
items to them; reading the 72 MB of a 10^6-item index takes ~15 ms. Builds with `faiss.omp_set_num_threads`
as FAISS defaults (every core).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

EXACT_MAX_ITEMS = 200_000  # exact search stays under ~5 ms per query on 2 cores up to about here (64-d)
RECALL_K = 100
RECALL_TARGET = 0.95
RECALL_QUERIES = 200
QUERY_NOISE = 0.5  # norm of the noise added to a sampled (unit) item vector to make a query
NPROBE_START = 8
REFINE_FACTOR = 4  # candidates fetched per result wanted, rescored exactly from the raw vectors
IVF_MAX_LISTS = 65_536
IVF_TRAIN_PER_LIST = 40  # k-means training points per list (FAISS warns under 39)
EXACT_CHUNK_QUERIES = 16
INDEX_FILE = "item_index.faiss"
INDEX_META_FILE = "item_index.json"
INDEX_FORMAT = 1


class IndexFileError(ValueError):
    """A stored index that does not fit the version's embeddings (count, dim, type) or cannot be read."""


@dataclass(frozen=True)
class IndexMeta:
    """What an index is and how it was chosen (stored as `INDEX_META_FILE`, exported as metrics)."""

    index_type: str  # "flat" (exact) or "ivf_sq8"
    items: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    recall100: float = 1.0  # measured recall@RECALL_K against exact search (1.0 for flat: it is exact)
    build_s: float = 0.0
    index_bytes: int = 0  # the FAISS structure alone (codes, ids, centroids); the raw vectors are apart
    format: int = INDEX_FORMAT

    @property
    def exact(self) -> bool:
        return self.index_type == "flat"

    @property
    def bytes_per_item(self) -> float:
        """Index bytes + the raw float32 vector per item: what a replica holds per item for retrieval."""
        return self.index_bytes / max(self.items, 1) + 4 * self.dim


def ivf_lists(n: int) -> int:
    """~sqrt(n) lists, a power of two (~1,000 items per list at 10^6 items), and no more than the
    k-means training needs points for (a small catalog forced onto IVF, as in tests)."""
    lists = 2 ** round(math.log2(math.sqrt(max(n, 1))))
    return int(max(1, min(IVF_MAX_LISTS, lists, n // IVF_TRAIN_PER_LIST)))


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """(B, k) rows of the exact top-`k` by inner product (unordered within the k); queries in chunks
    of `EXACT_CHUNK_QUERIES` (a (B, n) score matrix at 10^6 items would be GBs)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for lo in range(0, len(queries), EXACT_CHUNK_QUERIES):
        scores = queries[lo:lo + EXACT_CHUNK_QUERIES] @ vectors.T
        out[lo:lo + EXACT_CHUNK_QUERIES] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return out


def refined_search(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, nprobe: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (B, k) best first: `REFINE_FACTOR` x k IVF candidates, rescored exactly
    from `vectors` (rows -1 / scores -inf where fewer were found)."""
    fetch = min(max(k, REFINE_FACTOR * k), index.ntotal)
    if isinstance(index, faiss.IndexIVF):  # per call: thread-safe, no shared state
        _, cand = index.search(queries, fetch, params=faiss.SearchParametersIVF(nprobe=nprobe))
    else:  # a GPU copy: its nprobe was set when it moved (services/item_index.py)
        _, cand = index.search(queries, fetch)
    found = cand >= 0
    exact = np.einsum("bfd,bd->bf", vectors[np.where(found, cand, 0)], queries)
    exact[~found] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(cand, order, axis=1)
    scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
    rows[~np.isfinite(scores)] = -1
    return scores, rows


def recall_queries(vectors: np.ndarray, n_queries: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(vectors), size=min(n_queries, len(vectors)), replace=False)
    q = vectors[sample] + (QUERY_NOISE / math.sqrt(vectors.shape[1])) * rng.normal(
        size=(len(sample), vectors.shape[1])).astype(np.float32)
    return np.ascontiguousarray(q, dtype=np.float32)


def measure_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                   nprobe: int) -> float:
    """recall@k of `refined_search` at `nprobe` against `truth` ((B, k) exact rows)."""
    _, rows = refined_search(index, vectors, queries, truth.shape[1], nprobe)
    hits = sum(len(np.intersect1d(a[a >= 0], t)) for a, t in zip(rows, truth))
    return hits / float(truth.size)


def build_index(vectors: np.ndarray, *, exact_max_items: int = EXACT_MAX_ITEMS, seed: int = 0
                ) -> tuple[faiss.Index, IndexMeta]:
    """The index of `vectors` ((n, dim) float32) and how it was chosen (module docstring)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    t0 = time.perf_counter()
    if n <= exact_max_items:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, IndexMeta("flat", n, dim, build_s=time.perf_counter() - t0)
    nlist = ivf_lists(n)
    index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = vectors[np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))]
    index.train(train)
    index.add(vectors)
    build_s = time.perf_counter() - t0
    queries = recall_queries(vectors, seed=seed)
    k = min(RECALL_K, n)
    truth = exact_top(queries, vectors, k)
    nprobe, recall = min(NPROBE_START, nlist), 0.0
    while True:
        recall = measure_recall(index, vectors, queries, truth, nprobe)
        logger.info("IVF%d,SQ8 over %d items: recall@%d %.3f at nprobe %d", nlist, n, k, recall, nprobe)
        if recall >= RECALL_TARGET or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    index.nprobe = nprobe  # the default of a plain index.search; ItemIndex passes it per call
    meta = IndexMeta("ivf_sq8", n, dim, nlist=nlist, nprobe=nprobe, recall100=recall, build_s=build_s,
                     index_bytes=int(faiss.serialize_index(index).nbytes))
    return index, meta


def write_index(stage_dir: Path, vectors: np.ndarray, *, exact_max_items: int = EXACT_MAX_ITEMS) -> IndexMeta:
    """Build the index of a version about to be published and store it in `stage_dir` when it is
    approximate (an exact one is rebuilt at load for free). Returns its description."""
    index, meta = build_index(vectors, exact_max_items=exact_max_items)
    if not meta.exact:
        stage_dir = Path(stage_dir)
        faiss.write_index(index, str(stage_dir / INDEX_FILE))
        (stage_dir / INDEX_META_FILE).write_text(json.dumps(asdict(meta), indent=1))
        logger.info("stored %s index of %d items: nprobe %d, recall@%d %.3f, built in %.1f s", meta.index_type,
                    meta.items, meta.nprobe, RECALL_K, meta.recall100, meta.build_s)
    return meta


def read_index(version_dir: Path, items: int, dim: int) -> tuple[faiss.Index, IndexMeta] | None:
    """The stored index of a version, checked against its embeddings' shape; None when it has none
    (an exact index, or a version published before indexes were stored). Raises `IndexFileError`
    when the stored one does not fit."""
    version_dir = Path(version_dir)
    meta_path, index_path = version_dir / INDEX_META_FILE, version_dir / INDEX_FILE
    if not meta_path.is_file() and not index_path.is_file():
        return None
    try:
        raw = json.loads(meta_path.read_text())
        meta = IndexMeta(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise IndexFileError(f"{meta_path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if meta.format != INDEX_FORMAT or meta.index_type != "ivf_sq8":
        raise IndexFileError(f"{meta_path}: index type {meta.index_type!r} format {meta.format} is not one this "
                             f"code reads (ivf_sq8, format {INDEX_FORMAT})")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:  # FAISS raises RuntimeError for a missing or malformed file
        raise IndexFileError(f"{index_path} cannot be read: {exc}") from exc
    if index.ntotal != items or index.d != dim or meta.items != items or meta.dim != dim:
        raise IndexFileError(f"{index_path} holds {index.ntotal} vectors of dim {index.d} (meta {meta.items} x "
                             f"{meta.dim}); the embeddings have {items} x {dim}")
    return index, meta


def synthetic_vectors(n: int, dim: int, *, topics: int = 2_000, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` unit vectors around `topics` random topic centres, each `spread` (noise norm) off its
    centre: a catalog with the topic structure learned item embeddings have (uniform random
    vectors have none, and no index beats a scan on them)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x = centres[rng.integers(0, topics, hi - lo)] + (spread / math.sqrt(dim)) * rng.normal(
            size=(hi - lo, dim)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the index a version of N synthetic items would get, and "
                                             "print its type, build time, recall@100 and bytes per item.")
    ap.add_argument("--items", type=int, default=1_000_000, help="catalog size")
    ap.add_argument("--dim", type=int, default=64, help="vector size (the model's ModelConfig.dim)")
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm around the topic centres (0: points)")
    ap.add_argument("--json", type=Path, help="write the description here")
    args = ap.parse_args(argv)
    if args.items < 1 or args.dim < 1:
        ap.error(f"--items and --dim must be positive (got {args.items}, {args.dim})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vectors = synthetic_vectors(args.items, args.dim, spread=args.spread)
    _, meta = build_index(vectors)
    out = {**asdict(meta), "bytes_per_item": meta.bytes_per_item, "raw_bytes_per_item": 4 * args.dim}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EXACT_MAX_ITEMS", "INDEX_FILE", "INDEX_META_FILE", "IndexFileError", "IndexMeta", "RECALL_K",
           "RECALL_TARGET", "REFINE_FACTOR", "build_index", "exact_top", "ivf_lists", "read_index", "refined_search",
           "synthetic_vectors", "write_index"]
