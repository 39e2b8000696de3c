"""The recommender: a LoRA-adapted language model item tower and a small sequence user tower.

Read it top to bottom:

* `ModelConfig` -- every architecture knob, with help text.
* Item tower -- `text_features`: item text (title + attributes) -> base LM + LoRA -> pooled vector;
  `item_table`: normalize(text projection + ID embedding). Only *warm* items (with training
  interactions) have an ID embedding; a new item needs only its text. During training the ID
  embedding of each item is dropped with probability `id_dropout`, so the text path alone has to
  place an item well -- that is what makes cold items work.
* User tower -- `user_states`: the user's recent items (their item-tower embeddings, order as a
  position embedding, recency as a log-time-gap embedding) -> a small causal Transformer -> the
  state at each position, normalized. The state after the last item is the user embedding.
  `fuse_query` blends a natural-language query, encoded by the same LM + LoRA and the text
  projection (the same space as items' text part), into it.
* `next_item_loss` -- next-item prediction at every position. `full`: softmax over the whole
  catalog (exact, affordable below `FULL_SOFTMAX_MAX_ITEMS`); `sampled`: softmax over the
  batch's targets plus uniform negatives with the logQ correction (Yi et al. 2019) for large
  catalogs. `auto` picks by catalog size. With hard negatives (`TrainConfig.hard_negatives`, off by
  default), `declined_penalty` adds the user's shown-but-not-clicked items' unlikelihood.

The language model is expensive on a CPU, so a training step does not push the whole catalog
through it: the text vectors of all items live in `text_cache` (refreshed by `refresh_text_cache`),
and each step re-encodes only `fresh_items` of its target items *with* gradients, writing them
into a copy of the cache -- the LoRA weights learn from those, everything else sees the cache.

The checkpoint / published adapter is one explicit dict of the configs, item ids and warm mask,
LoRA weights and the heads' state (`heads_state_dict`, ID embeddings included): its keys, files and
loading are `training/adapter.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.corpus import GAP_BUCKETS
from training.lm import TextEncoder

FULL_SOFTMAX_MAX_ITEMS = 50_000
ENCODE_BATCH = 128  # texts per LM forward when encoding the catalog
NORM_EPS = 1e-6
DECLINED_P_MAX = 1.0 - 1e-6  # keeps -log(1 - p) finite when the model is sure of a declined item


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = field(default="", metadata={"help": "base LM directory or cached model id ('' = all-MiniLM-L6-v2 wheel)"})
    use_text: bool = field(default=True, metadata={"help": "read item text with the LM (False = ID-only SASRec-style model)"})
    lora: bool = field(default=True, metadata={"help": "train LoRA adapters in the LM (False = frozen LM features)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA path"})
    lora_layers: int = field(default=2, metadata={"help": "adapt the top N transformer layers (0 = all)"})
    lora_targets: tuple[str, ...] = field(default=(), metadata={"help": "module names to adapt (empty = detect)"})
    max_text_tokens: int = field(default=32, metadata={"help": "tokens of item text read by the LM"})
    dim: int = field(default=64, metadata={"help": "embedding size of items and users"})
    max_len: int = field(default=50, metadata={"help": "most recent items the user tower reads"})
    heads: int = field(default=2, metadata={"help": "attention heads of the sequence head"})
    blocks: int = field(default=2, metadata={"help": "transformer blocks of the sequence head"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in the sequence head"})
    id_embeddings: bool = field(default=True, metadata={"help": "learn an ID embedding for warm items"})
    id_dropout: float = field(default=0.3, metadata={"help": "training-time probability of hiding an item's ID embedding"})
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature of the cosine scores"})
    query_weight: float = field(default=0.5, metadata={"help": "weight of a text query blended into the user embedding"})
    warm_negatives: bool = field(default=True, metadata={"help": "full softmax over warm items only: an item nobody has interacted with yet is no evidence against it"})
    new_item_calibration: bool = field(default=True, metadata={"help": "scoring: give new items each user's share of new items in their recent history (training/calibration.py)"})
    covis_prior: bool = field(default=True, metadata={"help": "add the co-visitation prior (training/covis.py), its weight tuned on validation"})
    ranker: bool = field(default=True, metadata={"help": "train the second-stage LightGBM ranker on validation (training/two_stage.py) and publish it in the adapter"})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)


def declined_penalty(logp: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row of `logp` (log-softmax over candidates), the sum over its declined items (`cols`, where
    `valid`) of -log(1 - p): the unlikelihood term of Welleck et al. (2019).

    Why this and not "add them as negatives": the full softmax already has every item in its denominator,
    pushing each one's logit down by its probability p. The gradient of -log(1 - p) on the item's own logit
    is p too, so weight w makes a declined item count (1 + w) times in that push -- strongest exactly where
    the model would show the item again, nothing where it already ranks it low. The sampled softmax gets
    the items as extra candidates (so they are in its denominator) and the same term.
    """
    p = logp.gather(1, cols).exp().clamp(max=DECLINED_P_MAX)
    return -(torch.log1p(-p) * valid.to(p.dtype)).sum(1)


class Recommender(nn.Module):
    """Item tower + user tower. Item index i of the catalog is row i + 1 of every table (0 = padding)."""

    def __init__(self, cfg: ModelConfig, item_texts: Sequence[str] | None, warm: np.ndarray, *,
                 text_encoder: TextEncoder | None = None) -> None:
        """`item_texts=None`: no catalog is tokenized and there is no text cache -- for serving and
        batch embedding, which bring their own item vectors or texts (`item_table` then fails)."""
        super().__init__()
        self.cfg = cfg
        n = len(warm)
        if item_texts is not None and len(item_texts) != n:
            raise ValueError(f"{len(item_texts)} item texts for {n} items")
        self.n_items = n
        self.text: TextEncoder | None = None
        if cfg.use_text:
            self.text = text_encoder or TextEncoder(
                cfg.base_model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                lora_layers=cfg.lora_layers, lora_targets=cfg.lora_targets, max_tokens=cfg.max_text_tokens,
                lora=cfg.lora)
            if item_texts is not None:
                tokens = self.text.tokenize(list(item_texts)) if n else {
                    "input_ids": torch.zeros(0, cfg.max_text_tokens, dtype=torch.long),
                    "attention_mask": torch.zeros(0, cfg.max_text_tokens, dtype=torch.long)}
                self.register_buffer("item_input_ids", tokens["input_ids"], persistent=False)
                self.register_buffer("item_attention", tokens["attention_mask"], persistent=False)
                self.register_buffer("text_cache", torch.zeros(n + 1, self.text.hidden_size), persistent=False)
            else:
                self.item_input_ids = self.item_attention = self.text_cache = None
            self.text_proj = nn.Linear(self.text.hidden_size, cfg.dim)
        self.id_emb = nn.Embedding(n + 1, cfg.dim, padding_idx=0) if cfg.id_embeddings or not cfg.use_text else None
        if self.id_emb is not None:
            nn.init.normal_(self.id_emb.weight, std=0.02)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()
        warm_row = np.concatenate([[0.0], np.asarray(warm, dtype=np.float32)])
        self.register_buffer("warm", torch.tensor(warm_row, dtype=torch.float32), persistent=False)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.gap_emb = nn.Embedding(GAP_BUCKETS, cfg.dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, dim_feedforward=4 * cfg.dim, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.seq = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.in_drop = nn.Dropout(cfg.dropout)
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    # --- item tower ---------------------------------------------------------------------------
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.text is not None
        return self.text(input_ids, attention_mask)

    @torch.no_grad()
    def refresh_text_cache(self, progress: Any = None) -> None:
        """Re-encode every item's text with the current LoRA weights (no gradients)."""
        if self.text is None or self.n_items == 0:
            return
        if self.item_input_ids is None:
            raise ValueError("this model was built without item texts (serving mode): it has no catalog to encode")
        was_training = self.training
        self.eval()
        for start in range(0, self.n_items, ENCODE_BATCH):
            stop = min(start + ENCODE_BATCH, self.n_items)
            self.text_cache[start + 1:stop + 1] = self.encode_texts(
                self.item_input_ids[start:stop], self.item_attention[start:stop]).float()
            if progress is not None:
                progress(stop - start)
        self.train(was_training)

    def item_table(self, text_feats: torch.Tensor | None = None, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(n_items + 1, dim) normalized item embeddings; row 0 (padding) is zero."""
        parts = torch.zeros(self.n_items + 1, self.cfg.dim, device=self.warm.device)
        if self.text is not None:
            feats = self.text_cache if text_feats is None else text_feats
            parts = parts + self.text_proj(feats)
        if self.id_emb is not None:
            keep = self.warm if id_keep is None else self.warm * id_keep
            parts = parts + self.id_emb.weight * keep.unsqueeze(1)
        parts = parts.clone()
        parts[0] = 0.0
        return _normalize(parts)

    def text_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """Item-tower embeddings from text alone (new items, queries): normalize(projection(LM(text)))."""
        if self.text is None:
            raise ValueError("this model reads no text (use_text=False)")
        tok = self.text.tokenize(list(texts))
        dev = self.warm.device
        return _normalize(self.text_proj(self.encode_texts(tok["input_ids"].to(dev), tok["attention_mask"].to(dev)).float()))

    # --- user tower ---------------------------------------------------------------------------
    def user_states(self, inputs: torch.Tensor, gaps: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item rows + gap buckets -> (B, L, dim) normalized states (causal)."""
        b, length = inputs.shape
        pos = torch.arange(length, device=inputs.device) + (self.cfg.max_len - length)
        x = table[inputs] * math.sqrt(self.cfg.dim) + self.pos_emb(pos).unsqueeze(0) + self.gap_emb(gaps)
        x = self.in_drop(x)
        pad = inputs == 0
        # Causal, padding keys hidden; every position may attend to itself so no row is all -inf.
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).triu(1)
        blocked = causal.unsqueeze(0) | pad.unsqueeze(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=inputs.device).unsqueeze(0)
        mask = torch.zeros(b, length, length, device=inputs.device).masked_fill(blocked, float("-inf"))
        mask = mask.repeat_interleave(self.cfg.heads, dim=0)
        h = self.seq(x, mask=mask)
        return _normalize(self.out(self.out_norm(h)))

    def user_embedding(self, inputs: torch.Tensor, gaps: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.user_states(inputs, gaps, table)[:, -1]

    def fuse_query(self, users: torch.Tensor, queries: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        w = self.cfg.query_weight if weight is None else weight
        return _normalize(users + w * queries)

    # --- training objective -------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, gaps: torch.Tensor, targets: torch.Tensor, **kw: Any) -> torch.Tensor:
        """The training loss (forward() so DistributedDataParallel sees the whole step)."""
        return self.next_item_loss(inputs, gaps, targets, **kw)

    def next_item_loss(self, inputs: torch.Tensor, gaps: torch.Tensor, targets: torch.Tensor, *, loss: str,
                       fresh_items: int, log_q: torch.Tensor | None = None, sampled_negatives: int = 1024,
                       mask_seen: bool = False, generator: torch.Generator | None = None,
                       hard_negatives: torch.Tensor | None = None, hard_negative_weight: float = 1.0) -> torch.Tensor:
        """Mean cross-entropy of the next item(s) at every position with a target (targets > 0).

        `targets` is (B, L) -- the next item -- or (B, L, H): the next H items, each a softmax
        target of the same user state, weighted 1, 1/2, ..., 1/H (a future-window objective: on
        data where several items are consumed together, such as MovieLens rating sessions whose
        order within a session is arbitrary, predicting only the very next one throws signal away).
        `hard_negatives` (B, K): item rows the user was shown and did not click (0 = pad), pushed down at
        every position of the row by `hard_negative_weight` x `declined_penalty`.
        """
        dev = inputs.device
        if targets.dim() == 2:
            targets = targets.unsqueeze(-1)
        text_feats = None
        if self.text is not None:
            text_feats = self.text_cache
            tg = torch.unique(targets[..., 0][targets[..., 0] > 0])
            if fresh_items > 0 and len(tg) and self.training and any(p.requires_grad for p in self.text.parameters()):
                pick = tg[torch.randperm(len(tg), generator=generator, device="cpu")[:fresh_items].to(dev)]
                fresh = self.encode_texts(self.item_input_ids[pick - 1], self.item_attention[pick - 1]).float()
                text_feats = self.text_cache.clone()
                text_feats[pick] = fresh
                with torch.no_grad():
                    self.text_cache[pick] = fresh.detach()  # write-back: the cache stays close to current weights
        id_keep = None
        if self.id_emb is not None and self.training and self.cfg.id_dropout > 0 and self.text is not None:
            id_keep = (torch.rand(self.n_items + 1, device=dev) >= self.cfg.id_dropout).float()
        table = self.item_table(text_feats, id_keep)
        states = self.user_states(inputs, gaps, table)
        sel = targets[..., 0] > 0
        s = states[sel]
        ys = targets[sel]  # (M, H)
        horizon = ys.shape[1]
        hard = None if hard_negatives is None else hard_negatives.unsqueeze(1).expand(-1, inputs.shape[1], -1)[sel]
        weights = 1.0 / torch.arange(1, horizon + 1, device=dev, dtype=torch.float32)
        mode = loss if loss != "auto" else ("full" if self.n_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled")
        if mode == "full":
            logits = s @ table.T / self.cfg.temperature
            if self.cfg.warm_negatives:
                # Never-interacted items are only ever negatives here; the text path would learn to
                # bury exactly the items that must work from text alone (cold-start recall ~0).
                logits = logits.masked_fill(self.warm.unsqueeze(0) == 0, float("-inf"))
            # No logQ term here: the full softmax has no sampling bias to correct, and adding
            # -log p(i) boosted never-seen (cold) items in training, which the model learned to
            # bury -- cold-start recall fell to 0 on MovieLens-100K.
            logits[:, 0] = float("-inf")
            if mask_seen:
                logits = logits.masked_fill(self._seen_mask(inputs, targets)[sel], float("-inf"))
            logp = F.log_softmax(logits, dim=-1)
        elif mode == "sampled":
            negatives = torch.randint(1, self.n_items + 1, (sampled_negatives,), device=dev)
            flat = ys[ys > 0]
            declined = [hard[hard > 0]] if hard is not None else []
            cands, inverse = torch.unique(torch.cat([flat, negatives, *declined]), return_inverse=True)
            logits = s @ table[cands].T / self.cfg.temperature
            if log_q is not None:
                # Candidates come from the batch's targets (popularity-proportional) and a uniform draw.
                b, k = float(len(flat)), float(sampled_negatives)
                q = (b * log_q[cands - 1].exp() + k / self.n_items) / (b + k)
                logits = logits - torch.log(q)
            logp = F.log_softmax(logits, dim=-1)
            lookup = torch.zeros(self.n_items + 1, dtype=torch.long, device=dev)
            lookup[cands] = torch.arange(len(cands), device=dev)
            ys = torch.where(ys > 0, lookup[ys], torch.zeros_like(ys))
        else:
            raise ValueError(f"loss={loss!r}: expected auto, full or sampled")
        valid = targets[sel] > 0
        picked = torch.where(valid, logp.gather(1, ys), torch.zeros((), device=dev))  # (M, H)
        w = weights.unsqueeze(0) * valid.float()
        nll = -(picked * w).sum() / w.sum()
        if hard is None or hard_negative_weight == 0:
            return nll
        cols = hard if mode == "full" else lookup[hard]
        return nll + hard_negative_weight * declined_penalty(logp, cols, hard > 0).mean()

    def _seen_mask(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, L, n+1) True where the item was already among the inputs up to that position.

        Serving and evaluation never recommend what the user has seen, so the softmax should not
        spend probability on it either (a large gain on MovieLens, which has no repeats). A target
        that repeats an earlier item stays unmasked.
        """
        b, length = inputs.shape
        seen = torch.zeros(b, length, self.n_items + 1, dtype=torch.float32, device=inputs.device)
        seen.scatter_(2, inputs.unsqueeze(-1), 1.0)
        seen = seen.cumsum(1) > 0
        seen[..., 0] = False
        tg = targets if targets.dim() == 3 else targets.unsqueeze(-1)
        seen.scatter_(2, tg, False)
        return seen

    # --- checkpoint ---------------------------------------------------------------------------
    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("text.")}

