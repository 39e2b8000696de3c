"""The training step: one optimisation pass, shared by Ray Train workers and the bare PyTorch baseline.

`TrainConfig` holds the optimisation knobs; `build_model` makes a `Recommender` for a catalog
(optionally from a parent adapter); `train_epoch` runs one pass over an iterable of batches.
`training/ray_trainer.py` drives these inside a Ray Train `TorchTrainer`; `bench/train.py` also runs
them in a bare loop, so the two are measured on exactly the same code.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from training.adapter import load_state
from training.corpus import DEFAULT_MAX_USERS
from training.model import ModelConfig, Recommender


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=25, metadata={"help": "passes over the training windows"})
    batch_size: int = field(default=32, metadata={"help": "training windows (user sequences) per step and worker"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the heads and ID embeddings"})
    lm_lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the LoRA weights"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    fresh_items: int = field(default=16, metadata={"help": "target items re-encoded by the LM with gradients per step"})
    refresh_every: int = field(default=5, metadata={"help": "re-encode the whole catalog every N epochs"})
    loss: str = field(default="auto", metadata={"help": "auto | full (softmax over the catalog) | sampled (in-batch + uniform, logQ)"})
    sampled_negatives: int = field(default=1024, metadata={"help": "uniform negatives per step for the sampled loss"})
    seed: int = field(default=0, metadata={"help": "random seed (model init, shuffling)"})
    mask_seen: bool = field(default=True, metadata={"help": "full softmax: leave the user's earlier items out of each position's softmax"})
    horizon: int = field(default=1, metadata={"help": "future items each position predicts (1 = next item only)"})
    replay_fraction: float = field(default=0.3, metadata={"help": "--incremental: share of old targets replayed"})
    hard_negatives: bool = field(default=False, metadata={"help": "also push down each user's shown-but-not-clicked items (impressions log, training/hard_negatives.py) at their training positions: an unlikelihood term -log(1 - p)"})
    hard_negative_weight: float = field(default=1.0, metadata={"help": "weight of the hard-negative term (1: each declined item pushed down twice as hard as by the softmax alone)"})
    hard_negative_max: int = field(default=20, metadata={"help": "hard negatives per user: the most recently shown ones"})
    max_users: int = field(default=DEFAULT_MAX_USERS, metadata={
        "help": "users whose sequences a run reads: a deterministic sample by hash of user id when the feature "
                "tables hold more (training/corpus.py load_corpus); 0 = every user"})

    def __post_init__(self) -> None:
        if self.hard_negative_weight < 0 or self.hard_negative_max < 1:
            raise ValueError(f"hard_negative_weight={self.hard_negative_weight!r}, hard_negative_max="
                             f"{self.hard_negative_max!r}: need a weight >= 0 and at least 1 item")
        if self.max_users < 0:
            raise ValueError(f"max_users={self.max_users!r}: must be >= 0 (0 = every user)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def build_model(model_cfg: ModelConfig, item_texts: Sequence[str], warm: np.ndarray, *, seed: int = 0,
                parent: dict | None = None, item_index: dict[str, int] | None = None) -> Recommender:
    torch.manual_seed(seed)
    model = Recommender(model_cfg, item_texts, warm)
    if parent is not None:
        load_state(model, parent, item_index)
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    lm, heads = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lm if ".text.lm." in f".{name}" or name.startswith("text.") else heads).append(p)
    groups = [{"params": heads, "lr": cfg.lr}]
    if lm:
        groups.append({"params": lm, "lr": cfg.lm_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def unwrap(model: torch.nn.Module) -> Recommender:
    return model.module if hasattr(model, "module") else model  # DDP


def train_epoch(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], opt: torch.optim.Optimizer,
                cfg: TrainConfig, *, log_q: torch.Tensor | None = None, device: torch.device | str = "cpu",
                autocast_dtype: torch.dtype | None = None, on_step: Callable[[int, float], None] | None = None,
                ) -> dict[str, float]:
    """One pass: returns mean loss, samples (windows) and the seconds spent in steps."""
    model.train()
    inner = unwrap(model)
    total, n_batches, samples = 0.0, 0, 0
    t0 = time.perf_counter()
    for batch in batches:
        inputs = batch["inputs"].to(device, non_blocking=True).long()
        gaps = batch["gaps"].to(device, non_blocking=True).long()
        targets = batch["targets"].to(device, non_blocking=True).long()
        extra = {}
        if "hard_negatives" in batch:  # only present when TrainConfig.hard_negatives found some
            extra = {"hard_negatives": batch["hard_negatives"].to(device, non_blocking=True).long(),
                     "hard_negative_weight": cfg.hard_negative_weight}
        with torch.autocast(device_type="cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if model is inner:
                loss = inner.next_item_loss(inputs, gaps, targets, loss=cfg.loss, fresh_items=cfg.fresh_items,
                                            log_q=log_q, sampled_negatives=cfg.sampled_negatives,
                                            mask_seen=cfg.mask_seen, **extra)
            else:  # DDP: go through forward() so gradients are all-reduced
                loss = model(inputs, gaps, targets, loss=cfg.loss, fresh_items=cfg.fresh_items, log_q=log_q,
                             sampled_negatives=cfg.sampled_negatives, mask_seen=cfg.mask_seen, **extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        total += value
        n_batches += 1
        samples += int(inputs.shape[0])
        if on_step is not None:
            on_step(int(inputs.shape[0]), value)
    seconds = time.perf_counter() - t0
    return {"loss": total / max(n_batches, 1), "samples": samples, "steps": n_batches, "seconds": seconds}


def numpy_batches(windows: dict[str, np.ndarray], batch_size: int, *, seed: int,
                  shard: tuple[int, int] = (0, 1)) -> Iterable[dict[str, torch.Tensor]]:
    """Shuffled in-memory batches (the bare loop's data path)."""
    rank, world = shard
    n = len(windows["inputs"])
    order = np.random.default_rng(seed).permutation(n)[rank::world]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {k: torch.from_numpy(v[idx]) for k, v in windows.items()}
