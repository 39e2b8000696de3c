"""One registry version, ready to answer: user tower, text encoder for new items, FAISS index, titles.

`LoadedAdapter.load(registry, scene, version)` is everything a replica does before a version may
serve, and it either returns a complete object or raises `AdapterLoadError` (the caller keeps
the old version): files checked against the manifest's sha256, the adapter dict rebuilt into a
`Recommender`, the *precomputed* item embeddings (`item_embeddings.parquet`, written by
`streamrec train`) checked against it and put into an `ItemIndex` -- the catalog is not
re-encoded. Only items published after the version (new catalog items) go through the LM.

Scoring goes through `training.two_stage.rank_request`, the code evaluation scores its cases with,
so serving and the offline figures cannot drift: at load, a `RankCatalog` over the index's rows
(item vectors, popularity and newness, the co-visitation prior re-keyed to the index, the ranker
when the adapter has one -- an adapter trained before it is served by its first stage, tower +
beta x co-visitation + new-item calibration); per request, a `RankInputs` (the user tower over
the recent items, the query vector and weight, the co-visitation and trend features; on an
approximate (IVF) index the FAISS top-N as the towers' candidates, and then no pass over the
catalog's vectors: training.two_stage.retrieve; for a prior in CSR storage the co-visitation row
as a `training.covis.SparseCovis`, not a dense row per request) -> retrieval, features, ranker,
query blend, calibration -> top-k. Measured per request (one thread, CPU time): 1.3 ms at 2,000
items, 2.9 ms at 10^6 (6.7 ms before the sparse row and row-wise FAISS results). A version of more than `training.ann_index.EXACT_MAX_ITEMS` items carries its
index, built when it was published (`item_index.faiss`, checksummed like every file): the replica
reads it instead of building one.

Catalog changes replace the `RankState` whole (never mutate it): a request reads it once and sees
one consistent catalog of `n` rows even while the catalog follower's thread adds items behind it.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from services.item_index import ItemIndex
from training.ann_index import IndexFileError, read_index
from training.adapter import ADAPTER_FILE, COVIS_KEY, EMBEDDINGS_FILE, RANKER_KEY, load_adapter, read_embeddings
from training.baselines import ItemKNNScorer
from training.corpus import history_features
from training.covis import CovisPrior
from training.ranker import Ranker
from training.ranking_features import RetrievalSizes, trend_feature
from training.two_stage import RankCatalog, RankInputs, rank_requests, trend_order

logger = logging.getLogger(__name__)

PRIOR_GROWTH_ROWS = 64  # an upsert past the prior's catalog grows it by at least this many (empty) rows
EMBED_BATCH = 256  # new items' texts per LM forward pass (catalog follower)

# What a malformed adapter or embeddings file raises while it is unpickled (torch.load), rebuilt
# into a model (state-dict keys and shapes) or read (pyarrow: ArrowInvalid is a ValueError). An
# OSError is not among them: I/O fails for reasons other than the version, so it is tried again.
ARTIFACT_ERRORS: tuple[type[BaseException], ...] = (
    pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError,
    ImportError, AssertionError)


class AdapterLoadError(RuntimeError):
    """A version that cannot serve (bad checksum, missing file, wrong shapes); the old one stays.

    Permanent for that version: a published version never changes. I/O errors (`OSError`) are
    raised as they are, for the caller to try again."""


@dataclass(frozen=True)
class RankState:
    """The catalog side of `rank_request` over the index's first `len(catalog.is_new)` rows, and the
    trend feature of those rows (the adapter's trending snapshot; zeros without a ranker)."""

    catalog: RankCatalog
    trend: np.ndarray
    trend_order: np.ndarray  # training.two_stage.trend_order(trend): computed once, not per request

    @property
    def n(self) -> int:
        return len(self.catalog.is_new)

    def with_new_row(self, item_vectors: np.ndarray) -> "RankState":
        """One more row (an item the adapter never saw: new, no popularity, no trend, no co-visitation)."""
        return self.with_new_rows(item_vectors, 1)

    def with_new_rows(self, item_vectors: np.ndarray, m: int) -> "RankState":
        """`m` more rows at once (items the adapter never saw: new, no popularity, no trend, no
        co-visitation): one copy of the per-row arrays for the batch, not one per item."""
        cat = self.catalog
        n = self.n + m
        prior = cat.prior
        if prior is not None and prior.knn.n_items < n:
            prior = grown_prior(prior, max(n, prior.knn.n_items + PRIOR_GROWTH_ROWS, prior.knn.n_items * 5 // 4))
        new_rows = np.concatenate([cat.new_rows, np.arange(self.n, n)])
        catalog = RankCatalog(item_vectors[:n], np.concatenate([cat.log_pop, np.zeros(m)]),
                              np.concatenate([cat.is_new, np.ones(m, dtype=bool)]), prior, cat.ranker, cat.sizes,
                              cat.calibrate, new_rows=new_rows)
        # trend 0: the new rows are not in trend_order (rows with trend > 0), which stays as it is
        return RankState(catalog, np.concatenate([self.trend, np.zeros(m, dtype=np.float32)]), self.trend_order)


def grown_prior(prior: CovisPrior, n_items: int) -> CovisPrior:
    """`prior` over `n_items` rows: the rows past its catalog have no co-visitation (and no count)."""
    k = prior.knn
    extra = n_items - k.n_items
    indptr = np.concatenate([k.indptr, np.full(extra, k.indptr[-1], dtype=k.indptr.dtype)])
    counts = np.concatenate([k.counts, np.zeros(extra, dtype=k.counts.dtype)])
    knn = ItemKNNScorer(n_items, indptr, k.neighbors, k.weights, counts, last_n=k.last_n, decay=k.decay)
    return CovisPrior(knn, prior.beta, prior.tuning)


def rank_state(adapter: dict, model, index: ItemIndex, warm: np.ndarray) -> RankState:
    """The `RankState` of a freshly built index (rows = the embeddings file's items; `warm` per row)."""
    n = len(index.item_ids)
    ids = list(adapter["item_ids"])
    index_map = np.array([index.row.get(i, -1) for i in ids], dtype=np.int64)  # adapter row -> index row
    known = index_map >= 0
    prior = None
    counts = np.zeros(n, dtype=np.float64)
    if adapter.get(COVIS_KEY):
        # kept even when its beta is 0: the ranker reads its features (first_stage_scores ignores beta 0)
        prior = CovisPrior.from_dict(adapter[COVIS_KEY], index_map, n)
        counts = prior.knn.counts.astype(np.float64)
    second = adapter.get(RANKER_KEY)
    ranker = Ranker.from_dict(second) if second else None
    if ranker is not None and ranker.model_text:  # "" = no trees: the ranker scores as the first stage
        import lightgbm

        try:  # parsed now: the first request does not pay for it, and a malformed model refuses the version
            ranker.booster
        except lightgbm.basic.LightGBMError as exc:
            raise ValueError(f"the ranker's LightGBM model does not parse: {exc}") from exc
    sizes = RetrievalSizes.from_dict(second["retrieval"]) if second and "retrieval" in second else RetrievalSizes()
    trend = np.zeros(n, dtype=np.float32)
    if second and "trending" in second:
        trend[index_map[known]] = trend_feature(np.asarray(second["trending"]["decayed"], dtype=np.float64))[known]
    calibrate = bool(model.text is not None and model.cfg.new_item_calibration)
    catalog = RankCatalog.build(index.vectors, counts, ~np.asarray(warm, dtype=bool), prior, ranker, sizes,
                                calibrate=calibrate)
    return RankState(catalog, trend, trend_order(trend))


@dataclass
class LoadedAdapter:
    scene: str
    version: str
    model: "torch.nn.Module"
    index: ItemIndex
    titles: dict[str, str]
    rank: RankState  # what rank_request reads besides the request; replaced whole on a catalog change
    loaded_s: float = 0.0
    catalog_pos: str | None = None  # the online store's catalog log position this index reflects (None: never synced)

    @property
    def model_id(self) -> str:
        return f"{self.scene}@{self.version}"

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, registry, scene: str, version: str, *, base_model: str | None = None) -> "LoadedAdapter":
        from training.registry import RegistryError
        from training.adapter import load_adapter_model

        t0 = time.perf_counter()
        try:
            directory = Path(registry.open(scene, version, verify=True))
        except RegistryError as exc:
            raise AdapterLoadError(f"{scene}/{version}: {exc}") from exc
        adapter_path, emb_path = directory / ADAPTER_FILE, directory / EMBEDDINGS_FILE
        for p in (adapter_path, emb_path):
            if not p.is_file():
                raise AdapterLoadError(f"{scene}/{version}: {p.name} is missing")
        try:
            adapter = load_adapter(adapter_path)
            trained_on = adapter.get("model_config", {}).get("base_model") or ""
            if base_model is None and not Path(trained_on).is_dir():
                # trained elsewhere (another path to the same wheel): use this machine's default
                from training.lm import resolve_base_model

                base_model = resolve_base_model(None)
            model = load_adapter_model(adapter, base_model=base_model, catalog=False)
            item_ids, warm, emb = read_embeddings(emb_path)
            ids = list(adapter["item_ids"])
            titles = dict(zip(ids, adapter.get("extra", {}).get("item_titles") or []))
        except ARTIFACT_ERRORS as exc:  # a malformed file: refuse the version, say why
            raise AdapterLoadError(f"{scene}/{version}: cannot load ({type(exc).__name__}: {exc})") from exc
        dim = model.cfg.dim
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise AdapterLoadError(f"{scene}/{version}: item embeddings have shape {emb.shape}, the model needs "
                                   f"(n, {dim})")
        try:
            index = ItemIndex(item_ids, emb, ann=read_index(directory, len(item_ids), dim))
        except (IndexFileError, ValueError) as exc:
            raise AdapterLoadError(f"{scene}/{version}: {exc}") from exc
        try:
            rank = rank_state(adapter, model, index, warm)
        except ARTIFACT_ERRORS as exc:  # a ranker or prior that does not fit this code or catalog
            raise AdapterLoadError(f"{scene}/{version}: cannot load its ranking stage ({type(exc).__name__}: "
                                   f"{exc})") from exc
        return cls(scene, version, model, index, titles, rank, loaded_s=time.perf_counter() - t0)

    # --- catalog changes ---------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.model.text is None:
            raise AdapterLoadError(f"{self.model_id} reads no text: new items cannot be embedded")
        return self.model.text_vectors(list(texts)).cpu().numpy().astype(np.float32)

    def upsert_item(self, item_id: str, text: str, title: str | None = None) -> None:
        self.upsert_items([(item_id, text, title)])

    def upsert_items(self, items: Sequence[tuple[str, str, str | None]]) -> tuple[float, float]:
        """Embed (item_id, text, title) items, `EMBED_BATCH` texts per forward pass, and add them to
        the index and the rank state in one step each (10^4 new items: one index add, one copy of
        the per-row arrays). Raises what the model raises on a text; nothing is added then.
        Returns the seconds spent (embedding, indexing)."""
        if not items:
            return 0.0, 0.0
        t0 = time.perf_counter()
        texts = [t for _, t, _ in items]
        vecs = np.concatenate([self.embed_texts(texts[lo:lo + EMBED_BATCH]) for lo in range(0, len(texts), EMBED_BATCH)])
        t1 = time.perf_counter()
        ids = [i for i, _, _ in items]
        self.index.upsert_many(ids, vecs)
        # after the index has the rows (a request's snapshot never holds a row the index lacks); only
        # the catalog follower's thread writes `rank`, so one batch at a time
        self.rank = self.rank.with_new_rows(self.index.vectors, len(ids))
        for item_id, _, title in items:
            if title:
                self.titles[item_id] = title
        return t1 - t0, time.perf_counter() - t1

    def remove_item(self, item_id: str) -> bool:
        """Tombstone the item; its row stays (requests exclude dead rows), so `rank` keeps its size."""
        return self.index.remove(item_id)

    # --- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, rows: Sequence[np.ndarray], stamps: Sequence[np.ndarray], table: np.ndarray) -> np.ndarray:
        """(B, dim) user tower vectors from recent index rows (oldest first) over `table`'s items:
        the same features as training and evaluation (gaps included). No query here: rank_request
        blends it (`training.ranker.blend_query`)."""
        inputs, gaps = history_features(rows, stamps, np.zeros(len(rows), dtype=np.int64), self.model.cfg.max_len)
        # only the history's rows of the table (row 0: padding): copying a 10^6-row table per
        # request cost more than the whole rest of the request
        used, local = np.unique(inputs, return_inverse=True)  # `inputs`: table row + 1, 0 = padding
        if not used.size or used[0] != 0:  # no padding in the batch: local id 0 must still be the (zero) padding row
            used, local = np.concatenate([[0], used]), local + 1
        part = np.zeros((len(used), table.shape[1]), dtype=np.float32)
        part[1:] = table[used[1:] - 1]
        local = local.reshape(inputs.shape).astype(inputs.dtype)
        users = self.model.user_embedding(torch.from_numpy(local), torch.from_numpy(gaps), torch.from_numpy(part))
        return users.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def query_vectors(self, queries: Sequence[str | None]) -> list[np.ndarray | None]:
        """The query of each request through the item tower (None where there is none)."""
        asked = [(b, q) for b, q in enumerate(queries) if q]
        out: list[np.ndarray | None] = [None] * len(queries)
        if asked:
            qv = self.embed_texts([q for _, q in asked])
            for (b, _), v in zip(asked, qv):
                out[b] = v
        return out

    def rank_inputs(self, histories: Sequence[Sequence[str]], history_ts: Sequence[Sequence[int]],
                    queries: Sequence[str | None], exclude: Sequence[set[str]], rank: RankState,
                    query_weights: Sequence[float | None] | None = None, now_ms: int | None = None
                    ) -> list[RankInputs]:
        """One `RankInputs` per request over `rank`'s rows: history item ids -> index rows (items the
        index does not hold are skipped), time stamps in epoch ms (0 = unknown), `exclude` and dead
        rows excluded, the co-visitation and trend features, the FAISS top-`sizes.tower` rows (IVF)."""
        index, cat, n = self.index, rank.catalog, rank.n
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        rows, stamps = [], []
        for h, ts in zip(histories, history_ts):
            keep = [j for j, i in enumerate(h) if index.row.get(i, n) < n]  # `row` maps live items only
            rows.append(np.asarray([index.row[h[j]] for j in keep], dtype=np.int64))
            stamps.append(np.asarray([ts[j] for j in keep], dtype=np.int64))
        users = self.user_vectors(rows, stamps, cat.item_vectors)
        qv = self.query_vectors(queries)
        # The towers' top-N from FAISS only where the index is approximate (IVF, a large catalog):
        # an exact index would scan every row, which rank_request's retrieval does anyway (it needs
        # the tower score of the new items), so there the top-N comes from that one scan (0.4 ms saved).
        gone = [np.asarray([index.row[i] for i in e if index.row.get(i, n) < n], dtype=np.int64) for e in exclude]
        found = None if index.exact else index.search_rows(users, cat.sizes.tower, gone, below=n)
        dead = index.dead[:n]
        covis = None
        if cat.prior is not None and cat.prior.knn.dense is None:  # a large catalog: no dense row per request
            covis = cat.prior.feature_sparse(rows, n)
        elif cat.prior is not None:
            covis = cat.prior.feature(rows, stamps, np.full(len(rows), now, dtype=np.int64))[:, :n]
        weights = list(query_weights) if query_weights is not None else [None] * len(rows)
        out = []
        for b in range(len(rows)):
            excluded = dead.copy()
            excluded[gone[b]] = True
            out.append(RankInputs(users[b], rows[b], stamps[b], now, excluded,
                                  covis[b] if covis is not None else None, rank.trend, query=qv[b],
                                  query_weight=weights[b], tower_top=None if found is None else found[b],
                                  trend_order=rank.trend_order))
        return out

    def recommend(self, histories: Sequence[Sequence[str]], history_ts: Sequence[Sequence[int]],
                  queries: Sequence[str | None], k: int, exclude: list[set[str]],
                  query_weights: Sequence[float | None] | None = None, now_ms: int | None = None
                  ) -> tuple[list[list[str]], list[list[float]]]:
        """Top-`k` (ids, scores) per request through `training.two_stage.rank_request` (module
        docstring); `now_ms`: the requests' time (default: the wall clock)."""
        rank = self.rank  # one snapshot for the batch
        inputs = self.rank_inputs(histories, history_ts, queries, exclude, rank, query_weights, now_ms)
        ids = self.index.item_ids
        out_ids, out_scores = [], []
        for rows, s in rank_requests(rank.catalog, inputs, k):
            order = np.argsort(-s, kind="stable")[:k]
            out_ids.append([ids[int(rows[j])] for j in order])
            out_scores.append([float(s[j]) for j in order])
        return out_ids, out_scores

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float]] | None:
        vec = self.index.vector(item_id)
        if vec is None:
            return None
        found = self.index.search(vec[None, :], k, [{item_id}])
        return found.item_ids[0], [float(x) for x in found.scores[0][:len(found.item_ids[0])]]


__all__ = ["ARTIFACT_ERRORS", "AdapterLoadError", "LoadedAdapter", "PRIOR_GROWTH_ROWS", "RankState", "grown_prior",
           "rank_state"]
