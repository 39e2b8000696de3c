"""One registry version, ready to answer: user tower, text encoder for new items, FAISS index, titles.

`LoadedAdapter.load(registry, scene, version)` is everything a replica does before a version may
serve, and it either returns a complete object or raises `AdapterLoadError` (the caller keeps
the old version): files checked against the manifest's sha256, the adapter dict rebuilt into a
`Recommender`, the *precomputed* item embeddings (`item_embeddings.parquet`, written by
`streamrec train`) checked against it and put into an `ItemIndex` -- the catalog is not
re-encoded. Only items published after the version (new catalog items) go through the LM.

Scoring: the user's recent items (their rows in the index, so new items count too) -> the user
tower -> optional query blend -> FAISS top-`CANDIDATES` -> plus the co-visitation prior on those
candidates when the adapter has one (training/covis.py) -> top-k.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from services.item_index import ItemIndex
from training.calibration import HISTORY_ITEMS, new_item_lift, new_item_slots
from training.corpus import history_features
from training.covis import CovisPrior
from training.adapter import ADAPTER_FILE, EMBEDDINGS_FILE, load_adapter, read_embeddings

logger = logging.getLogger(__name__)

CANDIDATES = 200  # FAISS candidates per request before the co-visitation prior re-ranks them

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


@dataclass
class LoadedAdapter:
    scene: str
    version: str
    model: "torch.nn.Module"
    index: ItemIndex
    titles: dict[str, str]
    prior: CovisPrior | None
    prior_rows: dict[str, int]  # item id -> row of the prior's catalog
    new_rows: set[int] = field(default_factory=set)  # index rows of items the adapter has no interactions for
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
            prior = CovisPrior.from_dict(adapter["covis"]) if adapter.get("covis") else None
        except ARTIFACT_ERRORS as exc:  # a malformed file: refuse the version, say why
            raise AdapterLoadError(f"{scene}/{version}: cannot load ({type(exc).__name__}: {exc})") from exc
        dim = model.cfg.dim
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise AdapterLoadError(f"{scene}/{version}: item embeddings have shape {emb.shape}, the model needs "
                                   f"(n, {dim})")
        try:
            index = ItemIndex(item_ids, emb)
        except ValueError as exc:
            raise AdapterLoadError(f"{scene}/{version}: {exc}") from exc
        if prior is not None and prior.beta <= 0:
            prior = None
        new_rows = {r for r, w in enumerate(np.asarray(warm, dtype=bool)) if not w}
        return cls(scene, version, model, index, titles, prior, {i: r for r, i in enumerate(ids)},
                   new_rows=new_rows, loaded_s=time.perf_counter() - t0)

    # --- catalog changes ---------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.model.text is None:
            raise AdapterLoadError(f"{self.model_id} reads no text: new items cannot be embedded")
        return self.model.text_vectors(list(texts)).cpu().numpy().astype(np.float32)

    def upsert_item(self, item_id: str, text: str, title: str | None = None) -> None:
        vec = self.embed_texts([text])[0]
        self.index.upsert(item_id, vec)
        self.new_rows.add(self.index.row[item_id])
        if title:
            self.titles[item_id] = title

    def remove_item(self, item_id: str) -> bool:
        return self.index.remove(item_id)

    # --- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[str]], history_ts: Sequence[Sequence[int]],
                     queries: Sequence[str | None]) -> np.ndarray:
        """(B, dim) user embeddings from recent item ids (oldest first) and optional text queries."""
        index = self.index
        rows, stamps = [], []
        for h, ts in zip(histories, history_ts):
            keep = [j for j, i in enumerate(h) if i in index.row]  # `row` maps live items only
            rows.append(np.asarray([index.row[h[j]] for j in keep], dtype=np.int64))
            stamps.append(np.asarray([ts[j] for j in keep], dtype=np.int64))
        # the same features as training and evaluation (gaps included), over the index's rows
        inputs, gaps = history_features(rows, stamps, np.zeros(len(rows), dtype=np.int64), self.model.cfg.max_len)
        table = torch.cat([torch.zeros(1, index.dim), torch.from_numpy(index.vectors)])
        users = self.model.user_embedding(torch.from_numpy(inputs), torch.from_numpy(gaps), table)
        qs = [(r, q) for r, q in enumerate(queries) if q]
        if qs:
            qv = self.model.text_vectors([q for _, q in qs])
            at = torch.tensor([r for r, _ in qs])
            users[at] = self.model.fuse_query(users[at], qv)
        return users.cpu().numpy().astype(np.float32)

    def recommend(self, histories: Sequence[Sequence[str]], history_ts: Sequence[Sequence[int]],
                  queries: Sequence[str | None], k: int, exclude: list[set[str]]) -> tuple[list[list[str]], list[list[float]]]:
        users = self.user_vectors(histories, history_ts, queries)
        fetch = max(k, CANDIDATES) if self.prior is not None else k
        found = self.index.search(users, fetch, exclude)
        boost = self._prior_boost(histories) if self.prior is not None else None
        out_ids, out_scores = [], []
        for b, (ids, scores) in enumerate(zip(found.item_ids, found.scores)):
            s = scores[:len(ids)].astype(np.float64)
            if boost is not None and ids:
                rows = np.array([self.prior_rows.get(c, -1) for c in ids])
                s = s + np.where(rows >= 0, boost[b, rows], 0.0)
            ids, s = self._calibrate_new(users[b], histories[b], ids, s, k, exclude[b])
            order = np.argsort(-s, kind="stable")[:k]
            out_ids.append([ids[j] for j in order])
            out_scores.append([float(s[j]) for j in order])
        return out_ids, out_scores

    def _calibrate_new(self, user: np.ndarray, history: Sequence[str], ids: list[str], s: np.ndarray, k: int,
                       exclude: set[str]) -> tuple[list[str], np.ndarray]:
        """training/calibration.py at serving time: new items get the user's recent share of the top-k.

        New items are scored exhaustively (they are few) so they need not have made FAISS' top-N."""
        if not self.new_rows:
            return ids, s
        index = self.index
        recent = [index.row[i] for i in list(history)[-HISTORY_ITEMS:] if i in index.row]
        m = new_item_slots([r in self.new_rows for r in recent], k)
        if m == 0:
            return ids, s
        rows = np.array(sorted(r for r in self.new_rows if not index.dead[r] and index.item_ids[r] not in exclude),
                        dtype=np.int64)
        if len(rows) == 0:
            return ids, s
        new_scores = index.vectors[rows] @ user
        best = np.argsort(-new_scores)[:m]
        top, top_scores = rows[best], new_scores[best].astype(np.float64)
        new_ids = {index.item_ids[r] for r in top}
        known = [(i, v) for i, v in zip(ids, s) if i not in new_ids and index.row.get(i) not in self.new_rows]
        lift = new_item_lift(np.array([v for _, v in known], dtype=np.float64), top_scores, m, k)
        merged_ids = [i for i, _ in known] + [index.item_ids[r] for r in top]
        merged = np.array([v for _, v in known] + list(top_scores + lift))
        return merged_ids, merged

    def _prior_boost(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(B, n_items of the prior's catalog) the co-visitation prior of each user's recent items."""
        prior = self.prior
        assert prior is not None
        recent = [np.asarray([self.prior_rows[i] for i in h if i in self.prior_rows], dtype=np.int64)
                  for h in histories]
        return prior.boost(recent, [np.zeros(len(r)) for r in recent], np.zeros(len(recent)))

    def similar(self, item_id: str, k: int) -> tuple[list[str], list[float]] | None:
        vec = self.index.vector(item_id)
        if vec is None:
            return None
        found = self.index.search(vec[None, :], k, [{item_id}])
        return found.item_ids[0], [float(x) for x in found.scores[0][:len(found.item_ids[0])]]


__all__ = ["ARTIFACT_ERRORS", "AdapterLoadError", "CANDIDATES", "LoadedAdapter"]
