"""GRU4Rec (Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks", ICLR
2016), in its cross-entropy form (Hidasi & Karatzoglou, "Recurrent Neural Networks with Top-k
Gains", CIKM 2018), trained on whole user sequences as sequential-recommendation comparisons do
(e.g. RecBole's GRU4Rec).

Architecture (`GRU4RecNet`): item ID embedding (size = hidden, row 0 = padding) -> dropout ->
one GRU layer -> dropout -> scores = dot product with the same item embedding (the official
implementation's `constrained_embedding`, its recommended setting; it ties input and output item
vectors).

Training: each user's last max_len + 1 training items (`split.train_items`, chronological),
right-padded; every position predicts the next item with a full softmax over all items
(cross-entropy), padding positions masked; Adam; an epoch = every user once (shuffled).
Defaults (`GRU4RecConfig`): hidden 100 (Hidasi et al. 2016, the 100-unit networks of their
tables), dropout 0.3 and Adam lr 1e-3 (RecBole's GRU4Rec defaults), max_len 50 (as SASRec on
sparse data), batch 32 (the official implementation's cross-entropy settings use small batches;
on MovieLens-100K batch 128 leaves 8 steps per epoch and reached validation NDCG@10 0.036 after 12
epochs, batch 32 0.073). Hidden and dropout are tuned.

Scoring (`GRU4RecScorer`, "gru4rec"): the GRU state after the last of the history's last max_len
items; items without training interactions get exactly `COLD_SCORE` and rank last (content-free).

Budget -- the same rule as SASRec and our model: a grid (`GRU4REC_GRID`: hidden x dropout), each
configuration trained for at most `MAX_EPOCHS` epochs with early stopping on validation NDCG@10
(every `EVAL_EVERY` epochs, `PATIENCE` evaluations without a gain, best epoch's weights kept),
chosen on validation only (`tune_gru4rec` never receives the test cases). On MovieLens-100K the
whole `tune_gru4rec` took 3.8 CPU minutes on one thread (6.7 minutes of wall time on the shared,
busy 2 cores); the best configurations were still improving at their 40th epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.corpus import EvalSet
from training.seq_baseline_fit import (
    FIT_THREADS,
    SequenceScorer,
    bounded,
    check_bounds,
    epoch_batches,
    fit_fixed,
    sequence_examples,
    train_counts,
    trim_batch,
    tune_grid,
)

GRU4REC_GRID = MappingProxyType({"hidden": (64, 100), "dropout": (0.1, 0.3)})
MAX_EPOCHS = 40  # per configuration; an epoch on MovieLens-100K is 30 batches of 32, about 1.5 CPU seconds
EVAL_EVERY = 5  # epochs between validation evaluations
PATIENCE = 2  # evaluations without a validation gain before a configuration stops


@dataclass(frozen=True)
class GRU4RecConfig:
    hidden: int = bounded(100, "GRU state and item embedding size (Hidasi et al. 2016: 100 units)", min=1)
    dropout: float = bounded(0.3, "dropout on the input embeddings and the GRU output", min=0.0, max_open=1.0)
    max_len: int = bounded(50, "most recent items read", min=1)
    lr: float = bounded(1e-3, "Adam learning rate", min=0.0)
    batch_size: int = bounded(32, "users per batch", min=1)

    def __post_init__(self) -> None:
        check_bounds(self)


class GRU4RecNet(nn.Module):
    """The GRU4Rec network over `n_items` items (row i + 1 = item i, row 0 = padding)."""

    def __init__(self, n_items: int, cfg: GRU4RecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.dropout = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, num_layers=1, batch_first=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded rows -> (B, L, hidden) states; a state after padding is never read
        (the GRU is causal, so padding after a row's last item cannot change its earlier states)."""
        out, _ = self.gru(self.dropout(self.item_emb(inputs)))
        return self.dropout(out)

    def user_states(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The state after each row's last item (an empty history: the first, padding, state)."""
        last = (lengths - 1).clamp(min=0)
        return self.forward(inputs)[torch.arange(len(inputs)), last]


class GRU4RecScorer(SequenceScorer):
    """Scorer protocol over a trained `GRU4RecNet` (see `SequenceScorer`)."""

    name = "gru4rec"
    content_free = True
    pad = "right"


def build_gru4rec(train_items: Sequence[np.ndarray], n_items: int, cfg: GRU4RecConfig, seed: int
                  ) -> tuple[GRU4RecNet, Any, GRU4RecScorer]:
    """A fresh network, its one-epoch training step (full-softmax cross-entropy) and scorer."""
    ex = sequence_examples(train_items, cfg.max_len, pad="right")
    net = GRU4RecNet(n_items, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(seed)

    def train_epoch() -> float:
        total, batches = 0.0, 0
        for idx in epoch_batches(ex.lengths, cfg.batch_size, rng):
            lens = ex.lengths[idx]
            targets = torch.from_numpy(trim_batch(ex.targets[idx], lens, "right"))
            h = net(torch.from_numpy(trim_batch(ex.inputs[idx], lens, "right")))
            mask = targets != 0
            logits = h[mask] @ net.item_emb.weight[1:].T  # every item; the padding row is no class
            loss = F.cross_entropy(logits, targets[mask] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        return total / max(1, batches)

    return net, train_epoch, GRU4RecScorer(net, cfg, train_counts(train_items, n_items) > 0)


def fit_gru4rec(train_items: Sequence[np.ndarray], n_items: int, config: GRU4RecConfig = GRU4RecConfig(),
                epochs: int = 50, seed: int = 0, threads: int | None = FIT_THREADS) -> GRU4RecScorer:
    """Train one fixed configuration for `epochs` epochs (e.g. the cold-start protocol, with the
    configuration and `record["chosen_epochs"]` of `tune_gru4rec` on the main protocol)."""
    return fit_fixed(build_gru4rec, train_items, n_items, config, epochs, seed, threads)


def tune_gru4rec(train_items: Sequence[np.ndarray], valid: EvalSet, live: np.ndarray, n_items: int, *,
                 grid: Any = GRU4REC_GRID, base: GRU4RecConfig = GRU4RecConfig(), max_epochs: int = MAX_EPOCHS,
                 eval_every: int = EVAL_EVERY, patience: int = PATIENCE, seed: int = 0,
                 threads: int | None = FIT_THREADS, progress: bool = True) -> tuple[GRU4RecScorer, dict[str, Any]]:
    """Grid search on validation NDCG@10 (module docstring); the record has the shape of
    `training.sasrec.tune_sasrec`'s."""
    return tune_grid("gru4rec", build_gru4rec, base, grid, train_items, valid, live, n_items, max_epochs=max_epochs,
                     eval_every=eval_every, patience=patience, seed=seed, threads=threads, progress=progress)


__all__ = [
    "EVAL_EVERY",
    "GRU4REC_GRID",
    "MAX_EPOCHS",
    "PATIENCE",
    "GRU4RecConfig",
    "GRU4RecNet",
    "GRU4RecScorer",
    "build_gru4rec",
    "fit_gru4rec",
    "tune_gru4rec",
]
