"""The adapter contract: what one training run publishes and what serving loads, defined once.

A registry version of a scene is an adapter. Training writes it, the batch embedding job and
serving read it, and a test fixture builds one; they all agree because they all go through this
module:

* the files of a version directory: `ADAPTER_FILE` (the checkpoint dict below, `torch.save`d) and
  `EMBEDDINGS_FILE` (the catalog pushed through the adapter's item tower: ``item_id``, ``warm``
  and an L2-normalized float32 ``embedding`` per item, in catalog order -- what serving loads
  instead of re-encoding the catalog); the registry adds ``manifest.json``;
* the checkpoint dict (`checkpoint_dict`), which is also the ``adapter`` of a Ray Train
  checkpoint: `CHECKPOINT_KEYS` always, `COVIS_KEY` when the model has the co-visitation prior;
  a published adapter's ``extra`` holds the catalog it was trained on (`CATALOG_KEYS`);
* the manifest payload the training run hands the registry (`manifest_payload`,
  `MANIFEST_FIELDS`); the gate adds its decision and the registry its own fields;
* the data window: which events an adapter has seen (per-partition offsets, else timestamps),
  so that an incremental run trains on what came after (`data_window`, `new_event_masks`).

Loading goes through `load_torch_file`, the project's one ``torch.load``, with
``weights_only=True``: an adapter is data (tensors, numpy arrays, plain containers), and a file
read from a shared registry must never be able to run code when it is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.model import ModelConfig, Recommender

if TYPE_CHECKING:
    from training.corpus import Corpus
    from training.covis import CovisPrior

ADAPTER_FILE = "adapter.pt"
EMBEDDINGS_FILE = "item_embeddings.parquet"

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = frozenset({"format", "model_config", "item_ids", "warm", "lora", "heads", "extra"})
COVIS_KEY = "covis"  # the co-visitation prior (training/covis.py), when the model config asks for one
# The second stage (training/two_stage.py): `Ranker.to_dict()` (LightGBM model text, features, query weight,
# init scale, tuning) plus `retrieval` (RetrievalSizes.to_dict()) and `trending` ({"half_life_s", "at_ms",
# "decayed": float64 per item_ids row, the decayed interaction counts as of at_ms}); absent in older adapters.
RANKER_KEY = "ranker"
CATALOG_KEYS = frozenset({"item_texts", "item_titles"})  # ``extra`` of a published adapter
ID_EMBEDDING_PREFIX = "id_emb"  # heads of the ID embeddings (rows follow ``item_ids``)

MANIFEST_FIELDS = frozenset({"base_model", "base_model_sha256", "model_config", "train_config", "data_window",
                             "metrics", "run_dir", "workers", "use_gpu", "incremental"})
# `forgotten`: the forget tombstones (ids) the training data honoured (streaming.forget); the continuous
# trainer retrains an adapter whose list misses one the feature tables honour (training/forget_retrain.py).
DATA_WINDOW_FIELDS = frozenset({"watermarks", "max_ts", "events", "users", "items", "forgotten"})


# --- the checkpoint dict -------------------------------------------------------------------
def checkpoint_dict(model: Recommender, item_ids: Sequence[str], warm: np.ndarray, *,
                    id_embeddings: bool = True) -> dict:
    """The one dict that is a checkpoint and a published adapter.

    `id_embeddings=False` leaves the ID embeddings out: an adapter whose catalog (`item_ids`)
    is placed by its embeddings file alone, not by `model`'s ID table."""
    heads = model.heads_state_dict()
    if id_embeddings:
        if model.id_emb is not None and len(item_ids) != model.n_items:
            raise ValueError(f"{len(item_ids)} item ids for a model of {model.n_items} items")
    else:
        heads = {k: v for k, v in heads.items() if not k.startswith(ID_EMBEDDING_PREFIX)}
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.cfg.to_dict(),
        "item_ids": list(item_ids),
        "warm": np.asarray(warm, dtype=bool),
        "lora": model.text.lora_state_dict() if model.text is not None and model.cfg.lora else {},
        "heads": heads,
        "extra": {},
    }


def with_catalog(adapter: dict, item_texts: Sequence[str], item_titles: Sequence[str]) -> dict:
    """A copy of `adapter` that carries its catalog's texts and titles (what a published one holds:
    serving shows the titles, evaluation and embedding read the texts)."""
    return {**adapter, "extra": {**adapter.get("extra", {}), "item_texts": list(item_texts),
                                 "item_titles": list(item_titles)}}


def set_covis_prior(adapter: dict, prior: "CovisPrior") -> None:
    """Store the co-visitation prior in `adapter` (it travels with the adapter to serving)."""
    adapter[COVIS_KEY] = prior.to_dict()


def set_ranker(adapter: dict, ranker: dict) -> None:
    """Store the second stage (see RANKER_KEY) in `adapter`: it is versioned, checksummed, gated and
    hot-reloaded with the adapter because it is part of the adapter's one file."""
    adapter[RANKER_KEY] = dict(ranker)


def catalog_texts(adapter: dict) -> list[str] | None:
    return adapter.get("extra", {}).get("item_texts")


def check_adapter(adapter: Any, source: str) -> dict:
    """`adapter` if it has the documented keys; ValueError naming `source` and the keys otherwise."""
    if not isinstance(adapter, dict):
        raise ValueError(f"{source}: not an adapter (a {type(adapter).__name__}, expected a dict)")
    missing = sorted(CHECKPOINT_KEYS - adapter.keys())
    unknown = sorted(adapter.keys() - CHECKPOINT_KEYS - {COVIS_KEY, RANKER_KEY})
    if missing or unknown:
        raise ValueError(f"{source}: not an adapter (missing keys {missing}, unknown keys {unknown})")
    return adapter


def load_state(model: Recommender, ckpt: dict, item_index: dict[str, int] | None = None) -> None:
    """Load a checkpoint dict into `model`. With `item_index` (the new catalog), ID embeddings are
    carried over by item id: rows of items the checkpoint did not know stay freshly initialized."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unsupported adapter format {ckpt.get('format')!r} (expected {CHECKPOINT_FORMAT})")
    if model.text is not None and ckpt.get("lora"):
        model.text.load_lora_state_dict(ckpt["lora"])
    heads = dict(ckpt["heads"])
    old_ids = ckpt["item_ids"]
    if "id_emb.weight" in heads and model.id_emb is not None:
        old = heads.pop("id_emb.weight")
        if item_index is None and old.shape == model.id_emb.weight.shape:
            model.id_emb.weight.data.copy_(old)
        else:
            index = item_index or {}
            src = [i + 1 for i, item in enumerate(old_ids) if item in index]
            dst = [index[item] + 1 for item in old_ids if item in index]
            if src:
                model.id_emb.weight.data[torch.tensor(dst)] = old[torch.tensor(src)].to(model.id_emb.weight.dtype)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    bad = [k for k in unexpected]
    if bad:
        raise ValueError(f"adapter does not fit this model: unexpected weights {bad[:3]}")


def load_adapter_model(adapter: dict, item_texts: list[str] | None = None, *, base_model: str | None = None,
                       catalog: bool = True) -> Recommender:
    """Rebuild a `Recommender` from an adapter dict (for evaluation, embedding and serving).

    `catalog=False`: skip tokenizing the catalog (serving and batch embedding bring their own
    vectors or texts; at 100,000 items tokenizing alone takes seconds)."""
    cfg = ModelConfig.from_dict(adapter["model_config"])
    if base_model is not None:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "base_model": base_model})
    texts = item_texts if item_texts is not None else catalog_texts(adapter)
    if not catalog:
        texts = None
    elif texts is None:
        raise ValueError("the item texts are needed to rebuild the model")
    model = Recommender(cfg, texts, np.asarray(adapter["warm"], dtype=bool))
    load_state(model, adapter)
    return model.eval()


# --- files ---------------------------------------------------------------------------------
def _numpy_globals() -> list:
    """What numpy arrays and scalars unpickle through, for `weights_only` loading: the array and
    scalar reconstructors (taken from numpy's own pickles rather than its private modules) and
    the dtype classes of every numeric and boolean type."""
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    dtypes = {type(np.dtype(code)) for code in "?bhilqBHILQefdg"}
    return [np.ndarray, np.dtype, reconstruct, scalar, *dtypes]


def load_torch_file(path: str | Path, *, map_location: Any = None) -> Any:
    """The one ``torch.load`` of the project: tensors, numpy arrays and plain containers only."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


# The catalog's string lists are stored packed: one string and the lengths of its parts. The
# `weights_only` unpickler is pure Python and pays per object -- a 100,000-item catalog (ids, texts,
# titles) took 2 s to load as lists, against 0.05 s packed; serving loads an adapter on every swap.
PACKED_STRINGS = "packed_strings"


def pack_strings(values: Sequence[str]) -> dict[str, Any]:
    """A list of strings as one string plus the lengths of its parts (see `unpack_strings`)."""
    values = [str(v) for v in values]
    return {PACKED_STRINGS: "".join(values), "lengths": np.fromiter(map(len, values), np.int64, len(values))}


def unpack_strings(packed: Any) -> Any:
    """The list `pack_strings` packed; anything else (an adapter saved with plain lists) as it is."""
    if not (isinstance(packed, dict) and PACKED_STRINGS in packed):
        return packed
    text, ends = packed[PACKED_STRINGS], np.cumsum(packed["lengths"]).tolist()
    return [text[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def _map_catalog_lists(adapter: dict, convert: Any) -> dict:
    extra = adapter.get("extra") or {}
    return {**adapter, "item_ids": convert(adapter["item_ids"]),
            "extra": {k: convert(v) if k in CATALOG_KEYS and v is not None else v for k, v in extra.items()}}


def save_adapter(adapter: dict, path: str | Path) -> Path:
    """Write an adapter dict (usually to ``<version dir>/ADAPTER_FILE``)."""
    path = Path(path)
    torch.save(_map_catalog_lists(check_adapter(adapter, str(path)), pack_strings), path)
    return path


def load_adapter(path: str | Path, *, map_location: Any = "cpu") -> dict:
    """An adapter dict from `save_adapter`'s file (a version directory: its `ADAPTER_FILE`)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    return _map_catalog_lists(check_adapter(load_torch_file(path, map_location=map_location), str(path)),
                              unpack_strings)


def write_embeddings(path: Path, item_ids: list[str], warm: np.ndarray, embeddings: np.ndarray) -> Path:
    dim = embeddings.shape[1]
    table = pa.table({
        "item_id": pa.array(item_ids, pa.string()),
        "warm": pa.array(np.asarray(warm, dtype=bool)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim),
    })
    pq.write_table(table, path)
    return path


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(item_ids, warm, embeddings (n, dim) float32) from `write_embeddings`'s file."""
    table = pq.read_table(path)
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    emb = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return table.column("item_id").to_pylist(), table.column("warm").to_numpy(zero_copy_only=False), emb


# --- the data window and the manifest payload ----------------------------------------------
def data_window(corpus: "Corpus") -> dict[str, Any]:
    """What a corpus holds: per-topic, per-partition offset watermarks, the newest timestamp and counts."""
    return {"watermarks": corpus.watermarks, "max_ts": corpus.max_ts(), "events": corpus.n_events,
            "users": len(corpus.user_ids), "items": len(corpus.catalog), "forgotten": sorted(corpus.forgotten)}


def new_event_masks(corpus: "Corpus", window: dict) -> list[np.ndarray]:
    """Per user, which events are past a parent's data window (offsets when known, else timestamps)."""
    wms = (window.get("watermarks") or {})
    events_wm = next(iter(wms.values()), None) if len(wms) == 1 else wms.get("events")
    if corpus.offsets is not None and events_wm:
        out = []
        for parts, offs in zip(corpus.partitions, corpus.offsets):
            wm = np.array([int(events_wm.get(str(int(p)), -1)) for p in parts], dtype=np.int64)
            out.append(offs > wm)
        return out
    max_ts = window.get("max_ts")
    if max_ts is None:
        return [np.ones(len(s), dtype=bool) for s in corpus.items]
    return [t > int(max_ts) for t in corpus.ts]


def manifest_payload(*, model_config: ModelConfig, train_config: Any, window: dict, metrics: dict[str, float],
                     run_dir: Path, workers: int, use_gpu: bool, incremental: bool) -> dict[str, Any]:
    """The training run's fields of a version's manifest (`MANIFEST_FIELDS`): the base model and
    the hash of its weights (an adapter only fits the base it was trained on), the configs, the
    data window, the metrics and how it was trained."""
    from training.lm import model_hash

    return {
        "base_model": model_config.base_model, "base_model_sha256": model_hash(model_config.base_model),
        "model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
        "data_window": window, "metrics": metrics, "run_dir": str(run_dir),
        "workers": workers, "use_gpu": use_gpu, "incremental": incremental,
    }


__all__ = ["ADAPTER_FILE", "CATALOG_KEYS", "CHECKPOINT_FORMAT", "CHECKPOINT_KEYS", "COVIS_KEY", "RANKER_KEY", "set_ranker", "DATA_WINDOW_FIELDS",
           "EMBEDDINGS_FILE", "MANIFEST_FIELDS", "catalog_texts", "check_adapter", "checkpoint_dict", "data_window",
           "load_adapter", "load_adapter_model", "load_state", "load_torch_file", "manifest_payload",
           "new_event_masks", "pack_strings", "read_embeddings", "save_adapter", "set_covis_prior", "with_catalog",
           "unpack_strings", "write_embeddings"]
