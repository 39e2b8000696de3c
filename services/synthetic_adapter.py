"""Publish an *untrained* adapter for a synthetic catalog: serving tests and bench/serve.py.

The model is the real one (MiniLM + LoRA at initialization, real heads); only training is
skipped, because what these callers measure is serving, not quality. With `random_embeddings`
the item embeddings are random unit vectors instead of the catalog pushed through the LM, so a
100,000-item version can be made in seconds (the swap benchmark loads it, it never encodes it).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

GENRES = ("Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Thriller")


def synthetic_catalog(n_items: int) -> tuple[list[str], list[str], list[str]]:
    ids = [f"m{i}" for i in range(n_items)]
    titles = [f"Movie {i}" for i in range(n_items)]
    texts = [f"Movie {i}. Genres: {GENRES[i % len(GENRES)]}." for i in range(n_items)]
    return ids, titles, texts


def publish_synthetic_adapter(registry, staging: Path, *, scene: str = "default", n_items: int = 40, seed: int = 0,
                              dim: int = 32, random_embeddings: bool = False, corrupt: bool = False) -> str:
    """Publish one version of `scene`; returns its name. `corrupt` damages the embeddings file
    after publishing (its checksum no longer matches the manifest)."""
    import torch

    from training.embed import EMBEDDINGS_FILE, write_embeddings
    from training.lm import resolve_base_model
    from training.train_step import build_model
    from training.model import ModelConfig, checkpoint_dict
    from training.train_run import ADAPTER_FILE

    ids, titles, texts = synthetic_catalog(n_items)
    warm = np.ones(n_items, dtype=bool)
    cfg = ModelConfig(base_model=resolve_base_model(None), dim=dim, max_len=20, lora_layers=1, covis_prior=False)
    if random_embeddings:
        # a one-item model gives the LoRA weights and heads; the catalog lives in the embeddings file
        model = build_model(cfg, texts[:1], warm[:1], seed=seed)
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(n_items, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        adapter = checkpoint_dict(model, ids[:1], warm[:1], extra={"item_texts": texts, "item_titles": titles})
        adapter["item_ids"], adapter["warm"] = ids, warm
        adapter["heads"] = {k: v for k, v in adapter["heads"].items() if not k.startswith("id_emb")}
    else:
        from training.inference import ModelScorer

        model = build_model(cfg, texts, warm, seed=seed)
        emb = ModelScorer(model, "synthetic").items
        adapter = checkpoint_dict(model, ids, warm, extra={"item_texts": texts, "item_titles": titles})
    stage = Path(staging) / f"stage-{uuid.uuid4().hex}"
    stage.mkdir(parents=True)
    torch.save(adapter, stage / ADAPTER_FILE)
    write_embeddings(stage / EMBEDDINGS_FILE, ids, warm, emb)
    info = registry.publish(scene, stage, {"metrics": {"val_ndcg10": 0.0}, "synthetic": True, "seed": seed})
    if corrupt:
        path = Path(registry.open(scene, info.version, verify=False)) / EMBEDDINGS_FILE
        data = path.read_bytes()
        path.write_bytes(data[:-16] + bytes(16))
    return info.version


__all__ = ["publish_synthetic_adapter", "synthetic_catalog"]
