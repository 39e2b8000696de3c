"""The evaluation harness: every model and baseline, both protocols, one run, one table.

    streamrec evaluate --dataset ml-100k         # or the live feature tables by default
    python bench/quality.py --json results.json  # the same on MovieLens-100K, with timings

Models: `popular`, `itemknn` (co-visitation), `sasrec_id` (the same sequence head as the
fine-tuned model, ID embeddings only, trained by the same Ray Train loop), `zeroshot_lm` (the
base LM without adapters: cosine between the user's recent items' text and every item's text)
and `finetuned` (LM + LoRA + heads + the co-visitation prior of training/covis.py), with
`finetuned_neural` -- the same adapter without that prior -- as an ablation row. Protocols: `test` (leave-one-out, all items ranked, seen
excluded) and `cold` (20% of the items and all their interactions held out of training; users
whose test item is cold) -- the trained models are trained once per protocol.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.corpus import Corpus, Split, cold_start_split, describe, leave_one_out
from training.lm import TextEncoder, resolve_base_model
from training.train_step import TrainConfig
from training.model import ENCODE_BATCH, ModelConfig

logger = logging.getLogger(__name__)

MODEL_NAMES = ("popular", "itemknn", "sasrec_id", "zeroshot_lm", "finetuned")


@dataclass
class HarnessReport:
    results: dict[str, dict[str, dict[str, float]]]
    markdown: str
    paths: dict[str, Path]
    meta: dict[str, Any]


@torch.no_grad()
def base_lm_embeddings(texts: list[str], base_model: str, max_tokens: int, progress: bool = False) -> np.ndarray:
    """Normalized pooled embeddings of the base LM without adapters (zero-shot; diversity reference)."""
    enc = TextEncoder(base_model, lora_r=1, lora_alpha=1, lora_dropout=0.0, lora_layers=0, max_tokens=max_tokens,
                      lora=False).eval()
    out = []
    starts = range(0, len(texts), ENCODE_BATCH)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="zero-shot item embeddings", unit="batch")
    for s in starts:
        tok = enc.tokenize(texts[s:s + ENCODE_BATCH])
        out.append(enc(tok["input_ids"], tok["attention_mask"]).float().numpy())
    emb = np.concatenate(out) if out else np.zeros((0, enc.hidden_size), dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)


def default_configs(base_model: str, epochs: int | None = None) -> tuple[ModelConfig, ModelConfig, TrainConfig]:
    finetuned = ModelConfig(base_model=base_model)
    sasrec = dataclasses.replace(finetuned, use_text=False, lora=False, covis_prior=False)
    tcfg = TrainConfig()
    if epochs is not None:
        tcfg = dataclasses.replace(tcfg, epochs=epochs)
    return finetuned, sasrec, tcfg


def run_harness(corpus: Corpus, *, settings: Any, epochs: int | None = None, workers: int = 1, use_gpu: bool = False,
                cold_share: float = 0.2, seed: int = 0, progress: bool = True, run_dir: Path | None = None,
                train_config: TrainConfig | None = None, models: tuple[str, ...] = MODEL_NAMES) -> HarnessReport:
    from training.baselines import ItemKNNScorer, PopularScorer, ZeroShotScorer
    from training.evaluation import evaluate, results_table_markdown, save_report
    from training.train_run import new_run_dir, save_loss_curve, train_on_split

    t_start = time.perf_counter()
    base = resolve_base_model(getattr(settings, "base_model", None))
    ft_cfg, id_cfg, tcfg = default_configs(base, epochs)
    if train_config is not None:
        tcfg = train_config
    run_dir = run_dir or new_run_dir(settings.runs_dir, "evaluate")
    logger.info("evaluating on %s", describe(corpus))
    splits: dict[str, Split] = {"test": leave_one_out(corpus), "cold": cold_start_split(corpus, cold_share=cold_share,
                                                                                        seed=seed)}
    live = corpus.catalog.live
    ref = base_lm_embeddings(corpus.catalog.texts, base, ft_cfg.max_text_tokens, progress)
    results: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
    if "finetuned" in models:
        results["finetuned_neural"] = {}
    timings: dict[str, float] = {}
    for proto, split in splits.items():
        cases = split.test
        counts = split.train_counts()
        scorers: dict[str, Any] = {}
        if "popular" in models:
            scorers["popular"] = PopularScorer(counts)
        if "itemknn" in models:
            scorers["itemknn"] = ItemKNNScorer.fit(split.train_items, len(live))
        if "zeroshot_lm" in models:
            scorers["zeroshot_lm"] = ZeroShotScorer(ref)
        for name, cfg in (("sasrec_id", id_cfg), ("finetuned", ft_cfg)):
            if name not in models:
                continue
            t0 = time.perf_counter()
            sub = run_dir / f"{name}-{proto}"
            fit, scorer = train_on_split(split, cfg, tcfg, sub, workers=workers, use_gpu=use_gpu, progress=progress,
                                 ray_address=getattr(settings, "ray_address", None))
            save_loss_curve(sub, fit.history)
            scorer.name = name
            scorers[name] = scorer
            if name == "finetuned" and scorer.prior is not None:
                # ablation: the same model without its co-visitation prior
                neural = copy.copy(scorer)
                neural.name, neural.prior = "finetuned_neural", None
                scorers["finetuned_neural"] = neural
                timings[f"covis_beta_{proto}"] = scorer.prior.beta
            timings[f"train_{name}_{proto}_s"] = time.perf_counter() - t0
        for name, scorer in scorers.items():
            results[name][proto] = evaluate(scorer, cases, live=live, ref_embeddings=ref, progress=False)
            logger.info("%s / %s: NDCG@10 %.4f Recall@10 %.4f", name, proto, results[name][proto]["ndcg10"],
                        results[name][proto]["recall10"])
    meta = {"data": describe(corpus), "source": corpus.source, "cold_share": cold_share, "seed": seed,
            "base_model": base, "train_config": tcfg.to_dict(), "finetuned_config": ft_cfg.to_dict(),
            "workers": workers, "use_gpu": use_gpu, "timings_s": timings,
            "seconds": time.perf_counter() - t_start}
    paths = save_report(run_dir, results, meta=meta)
    return HarnessReport(results, results_table_markdown(results), paths, meta)
