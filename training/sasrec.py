"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): the standard
ID-only baseline, written from the paper and the authors' reference code (kang205/SASRec; its
PyTorch port pmixer/SASRec.pytorch), not from our own head in `training/model.py`.

Architecture (`SASRecNet`): item ID embeddings (row 0 = padding) scaled by sqrt(hidden), plus
learned positional embeddings (position 0..max_len-1 of the left-padded input), dropout, padding
zeroed; `blocks` causal self-attention blocks, each: LayerNorm of the sequence as the query,
multi-head attention over the sequence (causal, padding keys masked), residual onto the
normalized query; LayerNorm, point-wise FFN (Linear, ReLU, dropout, Linear, dropout) with a
residual; padding zeroed again. A final LayerNorm; the score of item i after position t is the dot
product of the state with item i's (shared) embedding.

Training: each user's last max_len + 1 training items (`split.train_items`, chronological) -- every
position predicts the next item; binary cross-entropy of that item against ONE negative drawn
uniformly from the items not in the user's training sequence, padding positions masked; Adam
(lr 1e-3, betas 0.9/0.98), batch 128 users, an epoch = every user once (shuffled).
Published defaults (`SASRecConfig`): hidden 50, 2 blocks, 1 head, dropout 0.2, max_len 200.

Scoring (`SASRecScorer`, "sasrec"): the last max_len items of the history; items without
training interactions get exactly `COLD_SCORE` and rank last (content-free, like the baselines of
`training/baselines.py`).

Budget -- the same our model gets: a grid of configurations (`SASREC_GRID`: dropout x max_len x
hidden), each trained for at most `MAX_EPOCHS` epochs with early stopping on validation NDCG@10
(evaluated every `EVAL_EVERY` epochs, `PATIENCE` evaluations without a gain, best epoch's weights
kept), chosen on validation only (`tune_sasrec` never receives the test cases). On MovieLens-100K
the whole `tune_sasrec` took 6.8 CPU minutes on one thread (14.6 minutes of wall time while three
other processes shared the 2 cores); every configuration was still improving at its 60th epoch,
so a run with time to spare may pass a larger `max_epochs` (budget, not the model, binds).
"""

from __future__ import annotations

import math
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

# Dropout: the paper's two settings (0.2 on dense data like MovieLens, 0.5 on sparse data).
# max_len: 50 (the paper's sparse-data setting) and 100 -- on MovieLens-100K the median user has 63
# training items, so 100 reads the whole history of three users in four; 200 (the ML-1M setting)
# costs 2.5-3.5 s per epoch there and did not fit the budget beside the rest of the grid.
# hidden: 100, twice the paper's 50 -- at max_len 200 it reached validation NDCG@10 0.110 after 60
# epochs against 0.090 for hidden 50 (which had not converged within the budget).
SASREC_GRID = MappingProxyType({"dropout": (0.2, 0.5), "max_len": (50, 100), "hidden": (100,)})
MAX_EPOCHS = 60  # per configuration; an epoch on MovieLens-100K is 8 batches
EVAL_EVERY = 10  # epochs between validation evaluations
PATIENCE = 2  # evaluations without a validation gain before a configuration stops
NEGATIVE_RETRIES = 20  # redraws of a negative that hit the user's own items (then it is kept)
LN_EPS = 1e-8  # the reference's LayerNorm epsilon


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = bounded(50, "item/position embedding size and model width (paper: 50)", min=1)
    blocks: int = bounded(2, "self-attention blocks (paper: 2)", min=1)
    heads: int = bounded(1, "attention heads; must divide hidden (paper: 1)", min=1)
    dropout: float = bounded(0.2, "dropout on embeddings, attention weights and the FFN (paper: 0.2 on ML-1M)",
                             min=0.0, max_open=1.0)
    max_len: int = bounded(200, "most recent items read (paper: 200 on ML-1M, 50 on sparse data)", min=1)
    lr: float = bounded(1e-3, "Adam learning rate (paper: 0.001)", min=0.0)
    batch_size: int = bounded(128, "users per batch (paper: 128)", min=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.hidden % self.heads:
            raise ValueError(f"SASRecConfig: hidden={self.hidden} is not divisible by heads={self.heads}")


class PointWiseFFN(nn.Module):
    """Linear -> ReLU -> dropout -> Linear -> dropout, plus the input (the reference's conv1d pair)."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (query = the normalized sequence, keys/values = the
    sequence), dropout on the attention weights; the same maths as `nn.MultiheadAttention`, with a
    boolean mask broadcast over heads instead of repeated per head."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, length, d = t.shape
        return t.view(b, length, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(x).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(self._split_heads(self.q(q)), self._split_heads(k), self._split_heads(v),
                                           attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out(a.transpose(1, 2).reshape(x.shape))


class SASRecNet(nn.Module):
    """The SASRec network over `n_items` items (row i + 1 = item i, row 0 = padding)."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d, eps=LN_EPS) for _ in range(cfg.blocks))
        self.attns = nn.ModuleList(CausalSelfAttention(d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d, eps=LN_EPS) for _ in range(cfg.blocks))
        self.ffns = nn.ModuleList(PointWiseFFN(d, cfg.dropout) for _ in range(cfg.blocks))
        self.last_norm = nn.LayerNorm(d, eps=LN_EPS)
        # Xavier-normal on every matrix, as the PyTorch port does (the reference: Glorot throughout).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded rows (L <= max_len, last column = newest) -> (B, L, hidden) states."""
        length = inputs.shape[1]
        keep = (inputs != 0).unsqueeze(-1)
        x = self.item_emb(inputs) * math.sqrt(self.cfg.hidden)
        x = x + self.pos_emb.weight[self.cfg.max_len - length:].unsqueeze(0)
        x = self.emb_dropout(x) * keep
        # May attend: earlier positions that are not padding, and always itself (a padding query
        # would otherwise see nothing and softmax to NaN; its state is zeroed anyway).
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        allowed = (causal & (inputs != 0).unsqueeze(1)) | torch.eye(length, dtype=torch.bool)
        allowed = allowed.unsqueeze(1)  # (B, 1, L, L): the same for every head
        for norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            q = norm(x)
            x = ffn(ffn_norm(q + attn(q, x, allowed))) * keep
        return self.last_norm(x)

    def user_states(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The state after the newest item (last column of the left-padded input)."""
        return self.forward(inputs)[:, -1]


class SASRecScorer(SequenceScorer):
    """Scorer protocol over a trained `SASRecNet` (see `SequenceScorer`)."""

    name = "sasrec"
    content_free = True
    pad = "left"


def sample_negatives(targets: np.ndarray, seen: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """One negative row (1..n_items) per target position, not in the row's user's training items
    (`seen`: (B, n_items + 1) bool). Padding positions (target 0) get 0."""
    neg = rng.integers(1, n_items + 1, size=targets.shape)
    rows = np.broadcast_to(np.arange(len(targets))[:, None], targets.shape)
    for _ in range(NEGATIVE_RETRIES):
        bad = seen[rows, neg]
        if not bad.any():
            break
        neg[bad] = rng.integers(1, n_items + 1, size=int(bad.sum()))
    return np.where(targets > 0, neg, 0)


def build_sasrec(train_items: Sequence[np.ndarray], n_items: int, cfg: SASRecConfig, seed: int
                 ) -> tuple[SASRecNet, Any, SASRecScorer]:
    """A fresh network, its one-epoch training step (BCE, one negative per position) and scorer."""
    ex = sequence_examples(train_items, cfg.max_len, pad="left")
    net = SASRecNet(n_items, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(seed)

    def train_epoch() -> float:
        total, batches = 0.0, 0
        for idx in epoch_batches(ex.lengths, cfg.batch_size, rng):
            seen = np.zeros((len(idx), n_items + 1), dtype=bool)
            for r, u in enumerate(ex.users[idx]):
                seen[r, np.asarray(train_items[u], dtype=np.int64) + 1] = True
            lens = ex.lengths[idx]
            targets = trim_batch(ex.targets[idx], lens, "left")
            neg = torch.from_numpy(sample_negatives(targets, seen, n_items, rng))
            pos = torch.from_numpy(targets)
            h = net(torch.from_numpy(trim_batch(ex.inputs[idx], lens, "left")))
            mask = pos != 0
            hm = h[mask]
            pos_logit = (hm * net.item_emb(pos[mask])).sum(-1)
            neg_logit = (hm * net.item_emb(neg[mask])).sum(-1)
            loss = (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
                    + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        return total / max(1, batches)

    return net, train_epoch, SASRecScorer(net, cfg, train_counts(train_items, n_items) > 0)


def fit_sasrec(train_items: Sequence[np.ndarray], n_items: int, config: SASRecConfig = SASRecConfig(),
               epochs: int = 100, seed: int = 0, threads: int | None = FIT_THREADS) -> SASRecScorer:
    """Train one fixed configuration for `epochs` epochs (e.g. the cold-start protocol, with the
    configuration and `record["chosen_epochs"]` of `tune_sasrec` on the main protocol)."""
    return fit_fixed(build_sasrec, train_items, n_items, config, epochs, seed, threads)


def tune_sasrec(train_items: Sequence[np.ndarray], valid: EvalSet, live: np.ndarray, n_items: int, *,
                grid: Any = SASREC_GRID, base: SASRecConfig = SASRecConfig(), max_epochs: int = MAX_EPOCHS,
                eval_every: int = EVAL_EVERY, patience: int = PATIENCE, seed: int = 0,
                threads: int | None = FIT_THREADS, progress: bool = True) -> tuple[SASRecScorer, dict[str, Any]]:
    """Grid search on validation NDCG@10 (module docstring); returns the chosen scorer and the
    record {"configs": {key: {valid_ndcg10, best_epoch, epochs_run, seconds}}, "chosen", ...}."""
    return tune_grid("sasrec", build_sasrec, base, grid, train_items, valid, live, n_items, max_epochs=max_epochs,
                     eval_every=eval_every, patience=patience, seed=seed, threads=threads, progress=progress)


__all__ = [
    "EVAL_EVERY",
    "MAX_EPOCHS",
    "PATIENCE",
    "SASREC_GRID",
    "CausalSelfAttention",
    "PointWiseFFN",
    "SASRecConfig",
    "SASRecNet",
    "SASRecScorer",
    "build_sasrec",
    "fit_sasrec",
    "sample_negatives",
    "tune_sasrec",
]
