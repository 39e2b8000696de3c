"""Catalog item embeddings with Ray Data batch inference (`map_batches` over an actor pool); a small
catalog in the calling process (`IN_PROCESS_MAX_ITEMS`).

Each actor loads the adapter once (`ItemEmbedder.__init__`: base LM + LoRA + heads) and embeds
batches of item texts; warm items add their ID embedding, exactly like the item tower in
training (`Recommender.item_table`). With a GPU, each actor takes one (`num_gpus=1`).

The result, one L2-normalized vector per item in catalog order, is what serving loads instead of
re-encoding the catalog; its file is the adapter's (`training.adapter.write_embeddings`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from streaming.ray_runtime import run_as_batch_work
from training.adapter import load_adapter, load_adapter_model

EMBED_BATCH_ROWS = 256
ACTOR_CPUS = 0.5
# A CPU catalog up to this many items is embedded in the calling process: starting the actor pool and
# loading the model in each actor took 5-7 s on 2 idle cores (18-21 s loaded) for a 60-item catalog,
# more than embedding 2,000 items in process (~300 items/s per core). Larger ones, or with a GPU: the pool.
IN_PROCESS_MAX_ITEMS = 2_000


class ItemEmbedder:
    """Ray Data callable class: rows (row, text) -> rows (row, embedding)."""

    def __init__(self, adapter_path: str, threads: int | None = 1) -> None:
        if threads is not None:  # an actor of the pool (None: the caller's process, left as it is)
            run_as_batch_work()  # serving on the same machine keeps its CPU share
            torch.set_num_threads(threads)
        adapter = load_adapter(adapter_path)
        # The batches bring the texts: no catalog to tokenize (ID embeddings keep their rows).
        self.model = load_adapter_model(adapter, catalog=False)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self.model
        rows = torch.as_tensor(batch["row"].astype(np.int64), device=self.device)
        parts = torch.zeros(len(rows), model.cfg.dim, device=self.device)
        if model.text is not None:
            tok = model.text.tokenize([str(t) for t in batch["text"]])
            feats = model.encode_texts(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            parts = parts + model.text_proj(feats.float())
        if model.id_emb is not None:
            parts = parts + model.id_emb.weight[rows + 1] * model.warm[rows + 1].unsqueeze(1)
        emb = parts / parts.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return {"row": batch["row"], "embedding": emb.float().cpu().numpy()}


def embed_catalog(adapter_path: Path, item_ids: list[str], texts: list[str], warm: np.ndarray, *,
                  actors: int = 2, use_gpu: bool = False, batch_rows: int = EMBED_BATCH_ROWS,
                  in_process_max_items: int = IN_PROCESS_MAX_ITEMS) -> np.ndarray:
    """(n_items, dim) normalized embeddings of the whole catalog, computed on the Ray cluster, or in this
    process for a CPU catalog of at most `in_process_max_items` (the same `ItemEmbedder`, the same batches)."""
    n = len(item_ids)
    if not use_gpu and n <= in_process_max_items:
        embedder = ItemEmbedder(str(adapter_path), threads=None)
        parts = [embedder({"row": np.arange(lo, min(lo + batch_rows, n), dtype=np.int64),
                           "text": np.asarray(texts[lo:lo + batch_rows], dtype=object)})["embedding"]
                 for lo in range(0, n, batch_rows)]
        return (np.concatenate(parts) if parts else np.zeros((0, embedder.model.cfg.dim))).astype(np.float32)
    import ray.data

    table = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "text": pa.array(texts)})
    # The blocks are cut here, not by `ds.repartition`: a repartition task asks a whole CPU, which a
    # node whose CPU the pool actors already hold never has (a deadlock on 1-CPU nodes, found by
    # tests/multinode); slices of one table cost nothing.
    blocks = max(actors, 1) * 2
    step = -(-n // blocks) if n else 1
    ds = ray.data.from_arrow([table.slice(lo, step) for lo in range(0, max(n, 1), step)])
    out = ds.map_batches(
        ItemEmbedder,
        fn_constructor_kwargs={"adapter_path": str(adapter_path)},
        batch_size=batch_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(actors, 1)),
        num_gpus=1 if use_gpu else 0,
        # Fractional: on a 2-core machine the actors must fit beside whatever Ray Train still holds.
        num_cpus=ACTOR_CPUS,
    )
    rows, embs = [], []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        embs.append(np.stack(batch["embedding"]) if batch["embedding"].dtype == object else batch["embedding"])
    order = np.argsort(np.concatenate(rows))
    result = np.concatenate(embs)[order].astype(np.float32)
    if result.shape[0] != n:
        raise RuntimeError(f"embedding job returned {result.shape[0]} rows for {n} items")
    return result

