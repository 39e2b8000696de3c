"""The evaluation harness: every model and baseline, both protocols, one run, one table with intervals.

    streamrec evaluate --dataset ml-100k         # or the live feature tables by default
    python bench/quality.py --json results.json  # the same on MovieLens-100K, with timings

**The rule: every choice is made on validation; the test split is read once, at the end.** Each
protocol's split is *sealed* before anything is fitted (`seal`): the fitting code gets a `Split`
whose `test` is None, so reading it fails, and the test cases sit in a `SealedTest` that hands
them out once -- after every model of every protocol is fitted and tuned. What is chosen on the
validation cases (each user's second-to-last interaction): ItemKNN's window, decay and history
length; SASRec's and GRU4Rec's dropout, length and size (and their epochs, by early stopping);
the co-visitation prior's weight; the ranker's parameters, rounds and the query weight.
`tests/training/test_eval_harness.py` asserts it.

Models (`MODEL_NAMES`): `popular`; `itemknn` (co-visitation, tuned); `sasrec` (the standard
SASRec, `training/sasrec.py`, tuned); `gru4rec` (`training/gru4rec.py`, tuned); `sasrec_id` (our
own sequence head with text switched off, same Ray Train loop); `zeroshot_lm` (the base LM, no
adapter); `finetuned` -- the full two-stage model (`training/two_stage.py`: LM + LoRA towers and
co-visitation retrieve, the LightGBM ranker ranks, new items calibrated). Ablations beside it:
`finetuned_first_stage` (towers + co-visitation prior, no ranker: the model before issue 16),
`finetuned_neural` (the towers alone) and, on the cold protocol, `finetuned_nocal` (the two-stage
model without the new-item calibration: does the ranker learn new items' share itself?).

Protocols: `test` (leave-one-out, all items ranked, seen excluded) and `cold` (20% of the items
and all their interactions held out of training; users whose test item is cold); the trained
models are trained once per protocol (the sequential baselines on `cold` with the configuration
tuned on `test`'s validation cases). Every metric gets a 95% bootstrap interval over users
(`training/bootstrap.py`), and `finetuned` a paired interval of its NDCG@10 difference against
the best baseline.
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

from training.corpus import Corpus, EvalSet, Split, cold_start_split, describe, leave_one_out
from training.lm import TextEncoder, resolve_base_model
from training.model import ENCODE_BATCH, ModelConfig
from training.train_step import TrainConfig

logger = logging.getLogger(__name__)

MODEL_NAMES = ("popular", "itemknn", "sasrec", "gru4rec", "sasrec_id", "zeroshot_lm", "finetuned")
BASELINES = ("popular", "itemknn", "sasrec", "gru4rec", "sasrec_id", "zeroshot_lm")
PROTOCOLS = ("test", "cold")


@dataclass
class HarnessReport:
    results: dict[str, dict[str, dict[str, float]]]
    markdown: str
    paths: dict[str, Path]
    meta: dict[str, Any]
    ci: dict[str, dict[str, dict[str, list[float]]]] = dataclasses.field(default_factory=dict)
    paired: dict[str, Any] = dataclasses.field(default_factory=dict)
    scorers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # protocol -> model -> fitted scorer


class SealedTest:
    """A protocol's test cases, handed out once (`read`); a second read is an error."""

    def __init__(self, cases: EvalSet) -> None:
        self._cases = cases
        self.reads = 0

    def read(self) -> EvalSet:
        if self.reads:
            raise RuntimeError("the test split was already read: it is read once, after every choice is made")
        self.reads += 1
        return self._cases


def seal(split: Split) -> tuple[Split, SealedTest]:
    """(the split without its test cases, for fitting; the sealed test cases)."""
    return dataclasses.replace(split, test=None), SealedTest(split.test)


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


@dataclass
class HarnessOptions:
    """Budgets of one harness run (`quick`: the CI smoke configuration, figures not comparable)."""

    epochs: int | None = None
    seq_max_epochs: int | None = None  # SASRec / GRU4Rec cap per configuration (None: their modules' default)
    seq_grids: dict[str, Any] | None = None  # model -> grid (None / absent: the module's own grid)
    half_life_ms: float = 6 * 3_600_000.0
    retrieval: Any = None  # RetrievalSizes (None: defaults)


def fit_protocol(proto: str, split: Split, *, models: tuple[str, ...], ft_cfg: ModelConfig, id_cfg: ModelConfig,
                 tcfg: TrainConfig, ref: np.ndarray, run_dir: Path, opts: HarnessOptions, tuned: dict[str, Any],
                 workers: int, use_gpu: bool, progress: bool, ray_address: str | None) -> tuple[dict[str, Any], dict]:
    """Fit and tune every model of one protocol on `split` (sealed: no test cases). Returns the
    scorers and a JSON-able record of every choice."""
    from training.baselines import PopularScorer, ZeroShotScorer, tune_itemknn
    from training.gru4rec import fit_gru4rec, tune_gru4rec
    from training.ranking_features import RetrievalSizes
    from training.sasrec import fit_sasrec, tune_sasrec
    from training.train_run import save_loss_curve, train_on_split
    from training.two_stage import fit_two_stage

    assert split.test is None, "fit_protocol must get a sealed split"
    live, n = split.corpus.catalog.live, split.n_items
    scorers: dict[str, Any] = {}
    record: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if "popular" in models:
        scorers["popular"] = PopularScorer(split.train_counts())
    if "itemknn" in models:
        scorers["itemknn"], record["itemknn"] = tune_itemknn(split.train_items, split.valid, live, n)
    for name, tune, fit in (("sasrec", tune_sasrec, fit_sasrec), ("gru4rec", tune_gru4rec, fit_gru4rec)):
        if name not in models:
            continue
        t0 = time.perf_counter()
        if name in tuned:  # another protocol's choice: the same configuration and epochs, refit here
            rec = tuned[name]
            cfg_cls = type(rec["scorer"].config)
            scorers[name] = fit(split.train_items, n, cfg_cls(**rec["chosen_config"]),
                                epochs=max(1, int(rec["chosen_epochs"])))
            record[name] = {"refit_of": rec["protocol"], "config": rec["chosen_config"],
                            "epochs": rec["chosen_epochs"]}
        else:
            kw: dict[str, Any] = {"progress": progress}
            if opts.seq_max_epochs is not None:
                kw["max_epochs"] = opts.seq_max_epochs
            if (opts.seq_grids or {}).get(name) is not None:
                kw["grid"] = opts.seq_grids[name]
            scorers[name], rec = tune(split.train_items, split.valid, live, n, **kw)
            tuned[name] = {**rec, "scorer": scorers[name], "protocol": proto}
            record[name] = rec
        scorers[name].name = name
        timings[f"{name}_{proto}_s"] = time.perf_counter() - t0
    if "zeroshot_lm" in models:
        scorers["zeroshot_lm"] = ZeroShotScorer(ref)
    for name, cfg in (("sasrec_id", id_cfg), ("finetuned", ft_cfg)):
        if name not in models:
            continue
        t0 = time.perf_counter()
        sub = run_dir / f"{name}-{proto}"
        fit_result, scorer = train_on_split(split, cfg, tcfg, sub, workers=workers, use_gpu=use_gpu,
                                            progress=progress, ray_address=ray_address)
        save_loss_curve(sub, fit_result.history)
        timings[f"train_{name}_{proto}_s"] = time.perf_counter() - t0
        scorer.name = name
        if name != "finetuned":
            scorers[name] = scorer
            continue
        neural = copy.copy(scorer)  # ablation: the towers alone
        neural.name, neural.prior = "finetuned_neural", None
        scorers["finetuned_neural"] = neural
        scorer.name = "finetuned_first_stage"
        scorers["finetuned_first_stage"] = scorer
        if scorer.prior is not None:
            record["covis_prior"] = {"beta": scorer.prior.beta, "valid_full_mrr_by_beta": scorer.prior.tuning}
        t0 = time.perf_counter()
        two, rec = fit_two_stage(split, scorer, sizes=opts.retrieval or RetrievalSizes(),
                                 half_life_ms=opts.half_life_ms, name="finetuned")
        scorers["finetuned"] = two
        record["ranker"] = rec
        timings[f"ranker_{proto}_s"] = time.perf_counter() - t0
        if proto == "cold":
            nocal = copy.copy(two)
            nocal.name, nocal.cat = "finetuned_nocal", dataclasses.replace(two.cat, calibrate=False)
            scorers["finetuned_nocal"] = nocal
    record["timings_s"] = timings
    return scorers, record


def run_harness(corpus: Corpus, *, settings: Any, epochs: int | None = None, workers: int = 1, use_gpu: bool = False,
                cold_share: float = 0.2, seed: int = 0, progress: bool = True, run_dir: Path | None = None,
                train_config: TrainConfig | None = None, models: tuple[str, ...] = MODEL_NAMES,
                options: HarnessOptions | None = None) -> HarnessReport:
    from training.bootstrap import metric_intervals, paired_bootstrap
    from training.evaluation import case_metrics, evaluate, results_table_markdown, save_report
    from training.train_run import new_run_dir

    t_start = time.perf_counter()
    opts = options or HarnessOptions(epochs=epochs,
                                     half_life_ms=float(getattr(settings, "trending_half_life_s", 6 * 3600)) * 1000)
    base = resolve_base_model(getattr(settings, "base_model", None))
    ft_cfg, id_cfg, tcfg = default_configs(base, opts.epochs if opts.epochs is not None else epochs)
    if train_config is not None:
        tcfg = train_config
    run_dir = run_dir or new_run_dir(settings.runs_dir, "evaluate")
    logger.info("evaluating on %s", describe(corpus))
    sealed = {"test": seal(leave_one_out(corpus)), "cold": seal(cold_start_split(corpus, cold_share=cold_share,
                                                                                 seed=seed))}
    live = corpus.catalog.live
    ref = base_lm_embeddings(corpus.catalog.texts, base, ft_cfg.max_text_tokens, progress)

    # 1. every choice, on validation only
    fitted: dict[str, dict[str, Any]] = {}
    choices: dict[str, Any] = {}
    tuned: dict[str, Any] = {}
    for proto in PROTOCOLS:
        fitted[proto], choices[proto] = fit_protocol(
            proto, sealed[proto][0], models=models, ft_cfg=ft_cfg, id_cfg=id_cfg, tcfg=tcfg, ref=ref,
            run_dir=run_dir, opts=opts, tuned=tuned, workers=workers, use_gpu=use_gpu, progress=progress,
            ray_address=getattr(settings, "ray_address", None))

    # 2. the test cases, read once per protocol
    results: dict[str, dict[str, dict[str, float]]] = {}
    ci: dict[str, dict[str, dict[str, list[float]]]] = {}
    per_case: dict[str, dict[str, np.ndarray]] = {}
    for proto in PROTOCOLS:
        cases = sealed[proto][1].read()
        for name, scorer in fitted[proto].items():
            metrics, ranks = evaluate(scorer, cases, live=live, ref_embeddings=ref, return_ranks=True)
            results.setdefault(name, {})[proto] = metrics
            cm = case_metrics(ranks)
            ci.setdefault(name, {})[proto] = metric_intervals(cm, seed=seed)
            if proto == "test":
                per_case[name] = cm["ndcg10"]
            logger.info("%s / %s: NDCG@10 %.4f Recall@10 %.4f", name, proto, metrics["ndcg10"], metrics["recall10"])
        if "finetuned" in fitted[proto]:
            choices[proto]["ranker"]["test_candidate_recall"] = fitted[proto]["finetuned"].candidate_recall(cases)
    paired: dict[str, Any] = {}
    baselines = [m for m in BASELINES if m in per_case]
    if "finetuned" in per_case and baselines:
        best = max(baselines, key=lambda m: results[m]["test"]["ndcg10"])
        paired = {"baseline": best, **paired_bootstrap(per_case["finetuned"], per_case[best], seed=seed)}
    results = {m: results[m] for m in _row_order(results)}
    meta = {"data": describe(corpus), "source": corpus.source, "cold_share": cold_share, "seed": seed,
            "base_model": base, "train_config": tcfg.to_dict(), "finetuned_config": ft_cfg.to_dict(),
            "workers": workers, "use_gpu": use_gpu, "choices": _jsonable_choices(choices),
            "paired_ndcg10": paired, "seconds": time.perf_counter() - t_start,
            "rule": "every choice on validation; the test split read once, at the end"}
    paths = save_report(run_dir, results, meta=meta, ci=ci)
    return HarnessReport(results, results_table_markdown(results, ci=ci), paths, meta, ci, paired, fitted)


def _row_order(results: dict[str, Any]) -> list[str]:
    order = [*BASELINES, "finetuned", "finetuned_first_stage", "finetuned_neural", "finetuned_nocal"]
    return [m for m in order if m in results] + [m for m in results if m not in order]


def _jsonable_choices(choices: dict[str, Any]) -> dict[str, Any]:
    """The choices record without live objects (the tuned scorers kept for the refit)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k != "scorer"}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(choices)


__all__ = ["BASELINES", "HarnessOptions", "HarnessReport", "MODEL_NAMES", "PROTOCOLS", "SealedTest",
           "base_lm_embeddings", "default_configs", "fit_protocol", "run_harness", "seal"]
