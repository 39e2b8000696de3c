"""One training run end to end: from the feature tables to a published adapter (`run_training`).

1. reads the live feature tables (`sequences`, `items`) into a `Corpus` -- at most
   `TrainConfig.max_users` users (default `training.corpus.DEFAULT_MAX_USERS`; `streamrec train
   --max-users`), a deterministic sample by hash of user id when the tables hold more, read part by part
   (`training.corpus.load_corpus`); splits leave-one-out;
2. incremental: loads the scene's live adapter as the parent; targets are the events past the
   parent's data window (`training.adapter.new_event_masks`) plus `replay_fraction` of the older
   ones, so the adapter follows fresh data without forgetting the rest;
3. trains with Ray Train (`training.ray_trainer.fit`), checkpoints every epoch;
4. evaluates the candidate -- and the live adapter, on the same validation cases -- plus the
   popular and ItemKNN baselines on the test cases; writes the loss curve and the evaluation
   table (PNG, JSON, Markdown) into the run directory;
5. asks the gate once (`training.gate.decide`: validation NDCG@10 not below the live adapter's
   minus `gate_tolerance`); only a candidate it lets through is embedded with Ray Data
   (`training.embed`), staged as an adapter (`training.adapter`) and published, with
   compare-and-swap on the parent version so the live adapter is still the one it was gated against.

Scenes: the adapter of scene S learns to predict the events whose `scene` is S (all events of
the user still form the history it reads); scene `default` uses every event.

Outcomes: a run that ends normally ends in one of `OUTCOMES` -- published, refused by the gate,
not asked to publish, or published as a canary (training/canary.py) -- recorded in `outcome.json`
in its run directory. Too little data to train on (none past the live adapter's data window, users too short, no event of the scene) is raised as
`training.corpus.NotEnoughData` before any training, and the caller records `NOTHING_NEW`. A
failure is any other exception; `streamrec train` exits non-zero only for those.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.ann_index import write_index
from training.adapter import (
    ADAPTER_FILE,
    EMBEDDINGS_FILE,
    data_window,
    load_adapter,
    manifest_payload,
    new_event_masks,
    save_adapter,
    set_covis_prior,
    set_ranker,
    with_catalog,
    write_embeddings,
)
from training.corpus import (
    Corpus,
    CorpusError,
    NotEnoughData,
    Split,
    leave_one_out,
    load_corpus,
    popularity_log_q,
    training_windows,
)
from training.covis import MAX_NEIGHBORS, CovisPrior, tune_beta
from training.embed import IN_PROCESS_MAX_ITEMS, embed_catalog
from training.forget_retrain import honoured, honoured_by_run, retire_remembering
from training.inference import ModelScorer
from training.lm import resolve_base_model
from training.model import ModelConfig
from training.ray_trainer import FitResult, fit
from training.train_step import TrainConfig, build_model

logger = logging.getLogger(__name__)

DEFAULT_SCENE = "default"
REPLAY_SEED = 1234

# How a run ended (`TrainOutcome.kind`; the `outcome` field of the outcome record). The first five
# are normal ends, so `streamrec train` exits 0 for them; FAILED is what the command records for
# any failure (exit status 1 or 2), RUNNING what it records while it runs.
PUBLISHED = "published"  # a new version is live
GATE_REFUSED = "gate_refused"  # the candidate was worse than the live adapter: that one stays
NOT_PUBLISHED = "not_published"  # --no-publish: trained and evaluated only
NOTHING_NEW = "nothing_new"  # too little (new) data: nothing was trained
CANARY = "canary"  # published not live, as a canary experiment (training/canary.py; STREAMREC_CANARY_PERCENT)
FAILED = "failed"
RUNNING = "running"
OUTCOMES = (PUBLISHED, GATE_REFUSED, NOT_PUBLISHED, NOTHING_NEW, CANARY, FAILED, RUNNING)
OUTCOME_FILE = "outcome.json"  # in the run directory


@dataclass(frozen=True)
class TrainRequest:
    scene: str = DEFAULT_SCENE
    workers: int = 1
    use_gpu: bool = False
    incremental: bool = False
    force: bool = False
    model_config: ModelConfig = field(default_factory=ModelConfig)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    max_failures: int = 2
    embed_actors: int = 2
    progress: bool = True
    publish: bool = True
    force_reason: str = "--force"  # why `force` publishes past the gate (shown in the outcome)


@dataclass
class TrainOutcome:
    run_dir: Path
    published: Any  # registry.VersionInfo | None
    gate_message: str
    metrics: dict[str, float]
    fit: FitResult
    kind: str  # PUBLISHED, GATE_REFUSED, NOT_PUBLISHED or CANARY
    detail: str  # the gate's reason (or why there was none)

    def record(self, scene: str) -> dict[str, Any]:
        return outcome_record(self.kind, self.detail, scene=scene,
                              version=self.published.version if self.published is not None else None,
                              run_dir=self.run_dir, metrics=self.metrics)


def outcome_record(kind: str, detail: str, *, scene: str, version: str | None = None, run_dir: Path | None = None,
                   metrics: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """How a run ended, as the JSON object `outcome.json` / `streamrec train --outcome-json` hold."""
    if kind not in OUTCOMES:
        raise ValueError(f"outcome {kind!r}: expected one of {OUTCOMES}")
    return {"outcome": kind, "detail": detail, "scene": scene, "version": version,
            "run_dir": str(run_dir) if run_dir is not None else None, "metrics": metrics or {},
            "at": round(time.time(), 3), **extra}


def outcome_line(record: dict[str, Any]) -> str:
    """The one log line saying how a run ended: `outcome: published v000003`, `outcome: nothing
    new (...)`, `outcome: gate refused (...)`, `outcome: failed (...)`."""
    kind, detail = record["outcome"], record["detail"]
    if kind == PUBLISHED:
        return f"outcome: published {record['version']}" + (f" ({detail})" if detail else "")
    return f"outcome: {kind.replace('_', ' ')}" + (f" ({detail})" if detail else "")


# --- data ------------------------------------------------------------------------------------


def scene_masks(corpus: Corpus, scene: str) -> list[np.ndarray] | None:
    """Per user, which events belong to `scene` (None: every event, the default scene)."""
    if scene == DEFAULT_SCENE:
        return None
    if corpus.scenes is None:
        raise CorpusError(f"scene {scene!r}: the events carry no scene field")
    masks = [np.asarray([s == scene for s in sc], dtype=bool) for sc in corpus.scenes]
    if not any(m.any() for m in masks):
        raise NotEnoughData(f"scene {scene!r}: no event has this scene yet")
    return masks


def _cut_like(masks: list[np.ndarray], split: Split) -> list[np.ndarray]:
    return [m[: len(s)] for m, s in zip(masks, split.train_items)]


# --- training on a split ---------------------------------------------------------------------


def train_on_split(split: Split, model_config: ModelConfig, train_config: TrainConfig, run_dir: Path, *,
                   workers: int = 1, use_gpu: bool = False, parent: dict | None = None,
                   target_masks: list[np.ndarray] | None = None, max_failures: int = 2, progress: bool = True,
                   ray_address: str | None = None) -> tuple[FitResult, ModelScorer]:
    """Train on `split`; returns the fit and a scorer of the final adapter over the split's catalog
    (with the co-visitation prior when the config asks for one: it is tuned on that scorer)."""
    corpus = split.corpus
    counts = split.train_counts()
    warm = counts > 0
    if parent is not None:  # items the parent learned stay warm
        known = set(i for i, w in zip(parent["item_ids"], parent["warm"]) if w)
        warm |= np.array([i in known for i in corpus.catalog.item_ids], dtype=bool)
    windows = training_windows(split.train_items, split.train_ts, model_config.max_len,
                               target_masks=_cut_like(target_masks, split) if target_masks is not None else None,
                               horizon=train_config.horizon,
                               hard_negatives=corpus.hard_negatives if train_config.hard_negatives else None,
                               hard_negative_max=train_config.hard_negative_max)
    result = fit(windows=windows, item_ids=corpus.catalog.item_ids, item_texts=corpus.catalog.texts, warm=warm,
                 model_config=model_config, train_config=train_config, run_dir=run_dir, workers=workers,
                 use_gpu=use_gpu, parent=parent, log_q=popularity_log_q(counts), max_failures=max_failures,
                 progress=progress, ray_address=ray_address)
    scorer = scorer_for(result.adapter, corpus, "candidate")
    if model_config.covis_prior:
        attach_covis_prior(result.adapter, split, scorer)
    return result, scorer


def attach_covis_prior(adapter: dict, split: Split, base: ModelScorer) -> CovisPrior:
    """Fit the co-visitation prior on `split`'s training sequences -- its window, decay and history
    length chosen on the validation cases like the ItemKNN baseline's (`tune_itemknn`) -- choose its
    weight on the same cases (see training/covis.py) with `base` (the adapter's scorer, no prior
    yet), store it in `adapter["covis"]` and give it to `base`."""
    from training.baselines import tune_itemknn
    from training.evaluation import candidate_mask, target_ranks

    corpus = split.corpus
    valid, live = split.valid, corpus.catalog.live
    knn_choice: dict[str, float] = {}
    if len(valid):
        knn, rec = tune_itemknn(split.train_items, valid, live, len(corpus.catalog), max_neighbors=MAX_NEIGHBORS)
        prior = CovisPrior(knn, 0.0)
        knn_choice = {f"knn_{k}": float(v) for k, v in (rec.get("chosen") or {}).items()
                      if isinstance(v, (int, float))}
    else:
        prior = CovisPrior.fit(split.train_items, len(corpus.catalog))
    if len(valid):  # else beta stays 0: no held-out cases to justify the prior
        neural = base.neural_scores(valid.histories, valid.history_ts, valid.target_ts)
        boost = prior.feature(valid.histories, valid.history_ts, valid.target_ts)
        cand = candidate_mask(valid.histories, live, True)

        def full_mrr(beta: float) -> float:
            ranks = target_ranks(base.finish(neural + beta * boost, valid.histories), valid.targets, cand)
            return float(np.mean(1.0 / (1.0 + ranks)))

        prior.beta, prior.tuning = tune_beta(full_mrr)
        prior.tuning.update(knn_choice)
    logger.info("co-visitation prior: beta %.3g (validation full-ranking MRR by beta: %s)", prior.beta, prior.tuning)
    set_covis_prior(adapter, prior)
    base.prior = prior
    return prior


def attach_ranker(adapter: dict, split: Split, scorer: ModelScorer, settings: Any) -> dict | None:
    """Train the second stage on `split.valid` over `scorer` (the adapter with its prior) and store it
    in `adapter` (training/two_stage.py). None -- the adapter then serves its first stage -- for a
    model without text or a corpus too small to train a ranker on; the gate still compares first
    stages, because the ranker has seen the validation cases it would be gated on."""
    from training.ranking_features import RetrievalSizes
    from training.two_stage import fit_two_stage, ranker_payload

    if scorer.model.text is None or not len(split.valid):
        return None
    try:
        two, record = fit_two_stage(split, scorer, sizes=RetrievalSizes.from_n(settings.retrieval_n),
                                    half_life_ms=float(settings.trending_half_life_s) * 1000.0)
    except ValueError as exc:
        logger.warning("no ranker for this adapter (%s): it serves its first stage", exc)
        return None
    set_ranker(adapter, ranker_payload(two, split.corpus))
    return record


def scorer_for(adapter: dict, corpus: Corpus, name: str, *, device: str = "cpu") -> ModelScorer:
    """A scorer over `corpus`'s catalog for an adapter (ID embeddings and the co-visitation prior
    carried over by item id)."""
    cfg = ModelConfig.from_dict(adapter["model_config"])
    known = {i for i, w in zip(adapter["item_ids"], adapter["warm"]) if w}
    warm = np.array([i in known for i in corpus.catalog.item_ids], dtype=bool)
    same_catalog = list(adapter["item_ids"]) == corpus.catalog.item_ids
    model = build_model(cfg, corpus.catalog.texts, warm, parent=adapter,
                        item_index=None if same_catalog else corpus.catalog.index)
    scorer = ModelScorer(model, name, device=device)
    if adapter.get("covis"):
        if same_catalog:
            prior = CovisPrior.from_dict(adapter["covis"])
        else:
            index_map = np.array([corpus.catalog.index.get(i, -1) for i in adapter["item_ids"]], dtype=np.int64)
            prior = CovisPrior.from_dict(adapter["covis"], index_map, len(corpus.catalog))
        scorer.prior = prior
    return scorer


def save_loss_curve(run_dir: Path, history: list[dict]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = run_dir / "loss.json"
    json_path.write_text(json.dumps(history, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["epoch"] + 1 for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("next-item loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = run_dir / "loss.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"json": json_path, "png": png}


def new_run_dir(runs_dir: Path, scene: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = Path(runs_dir) / f"{scene}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(runs_dir) / f"{scene}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


# --- streamrec train -------------------------------------------------------------------------


def run_training(settings: Any, req: TrainRequest, corpus: Corpus | None = None) -> TrainOutcome:
    from training.baselines import ItemKNNScorer, PopularScorer
    from training.evaluation import evaluate, save_report
    from training.canary import publish_candidate
    from training.gate import decide
    from training.registry import Registry

    if corpus is None:
        # A sample of the users at scale (training/corpus.py): everything below -- windows, evaluation,
        # baselines, incremental masks -- works on it. The data window recorded (`data_window`) keeps the
        # tables' watermarks: the adapter saw every sampled user's events up to them, so a child run's
        # `new_event_masks` (offsets past those watermarks) stays exact for whichever users it samples;
        # a user new to the sample has only "old" events, trained on as replay. Its users/events counts
        # are the sample's.
        max_users = req.train_config.max_users
        t0 = time.perf_counter()
        corpus = load_corpus(settings, max_users=max_users)
        logger.info("read %d of %d users (max_users %d; %d events) from the feature tables in %.1f s",
                    len(corpus.user_ids), corpus.users_in_tables or 0, max_users, corpus.n_events,
                    time.perf_counter() - t0)
    if req.train_config.hard_negatives and corpus.hard_negatives is None:
        from training.hard_negatives import with_hard_negatives

        corpus = with_hard_negatives(corpus, settings, req.train_config.hard_negative_max,
                                     scene=None if req.scene == DEFAULT_SCENE else req.scene)
    split = leave_one_out(corpus)
    registry = Registry(settings.registry_uri)
    current = registry.current(req.scene)
    in_scene = scene_masks(corpus, req.scene)
    masks = in_scene
    parent = None
    mcfg = req.model_config
    if not mcfg.base_model:
        mcfg = dataclasses.replace(mcfg, base_model=resolve_base_model(settings.base_model))
    # Forget requests the live adapter does not honour: only a run from scratch honours them, and it
    # goes live past the gate (training/forget_retrain.py) -- whatever was asked, `--incremental` too.
    forgotten_pending = set(corpus.forgotten) - honoured(current.manifest) if current is not None else set()
    if forgotten_pending:
        logger.warning("%d forget requests are not honoured by %s/%s: training from scratch%s, to be published "
                       "past the gate", len(forgotten_pending), req.scene, current.version,
                       " instead of incrementally" if req.incremental else "")
    if req.incremental and not forgotten_pending:
        if current is None:
            logger.warning("--incremental: scene %r has no live adapter yet; training from scratch", req.scene)
        else:
            parent = load_adapter(registry.open(req.scene, current.version) / ADAPTER_FILE)
            mcfg = ModelConfig.from_dict({**parent["model_config"], "base_model": mcfg.base_model})
            new = new_event_masks(corpus, current.manifest.get("data_window") or {})
            rng = np.random.default_rng(REPLAY_SEED)
            replay = [rng.random(len(m)) < req.train_config.replay_fraction for m in new]
            inc = [n | r for n, r in zip(new, replay)]
            masks = inc if masks is None else [a & b for a, b in zip(masks, inc)]
            n_new = int(sum(m.sum() for m in new))
            logger.info("incremental from %s: %d new events + replay %.0f%% of older", current.version, n_new,
                        100 * req.train_config.replay_fraction)
            if n_new == 0 and not req.force:
                raise NotEnoughData(f"no events past {current.version}'s data window; {current.version} stays live")
    run_dir = new_run_dir(settings.runs_dir, req.scene)
    result, cand = train_on_split(split, mcfg, req.train_config, run_dir, workers=req.workers,
                                  use_gpu=req.use_gpu, parent=parent, target_masks=masks,
                                  max_failures=req.max_failures, progress=req.progress,
                                  ray_address=settings.ray_address)
    save_loss_curve(run_dir, result.history)
    if mcfg.ranker:
        attach_ranker(result.adapter, split, cand, settings)

    # Evaluation: candidate vs live adapter on the same validation cases; baselines on test.
    valid, test, live = split.valid, split.test, corpus.catalog.live
    if in_scene is not None:
        valid = valid.subset(np.array([in_scene[u][-2] for u in valid.users], dtype=bool))
        test = test.subset(np.array([in_scene[u][-1] for u in test.users], dtype=bool))
    results: dict[str, dict[str, dict[str, float]]] = {
        "candidate": {"valid": evaluate(cand, valid, live=live), "test": evaluate(cand, test, live=live)}}
    current_valid = None
    if current is not None:
        try:
            live_adapter = parent if parent is not None else load_adapter(
                registry.open(req.scene, current.version) / ADAPTER_FILE)
            cur = scorer_for(live_adapter, corpus, f"live {current.version}")
            results[f"live {current.version}"] = {"valid": evaluate(cur, valid, live=live),
                                                  "test": evaluate(cur, test, live=live)}
            current_valid = results[f"live {current.version}"]["valid"]["ndcg10"]
        except Exception as exc:  # a live adapter we cannot even score should not block a good one
            logger.warning("could not evaluate the live adapter %s (%s); gating against none", current.version, exc)
    counts = split.train_counts()
    results["popular"] = {"test": evaluate(PopularScorer(counts), test, live=live)}
    results["itemknn"] = {"test": evaluate(ItemKNNScorer.fit(split.train_items, len(live)), test, live=live)}
    metrics = {"val_ndcg10": results["candidate"]["valid"]["ndcg10"],
               "val_recall10": results["candidate"]["valid"]["recall10"],
               "test_ndcg10": results["candidate"]["test"]["ndcg10"],
               "test_recall10": results["candidate"]["test"]["recall10"]}
    save_report(run_dir, results, meta={"scene": req.scene, "data": data_window(corpus),
                                        "incremental": bool(parent is not None)})

    published, message, kind, detail = None, "not published (--no-publish)", NOT_PUBLISHED, "--no-publish"
    if req.publish:
        decision = decide(metrics["val_ndcg10"], current_valid, settings.gate_tolerance,
                          force=req.force or bool(forgotten_pending))
        force_reason = req.force_reason if req.force else f"forget retrain for {len(forgotten_pending)} requests"
        if not decision.allows_publish:
            message = f"gate refused: {decision.refusal(req.scene)}"
            kind, detail = GATE_REFUSED, f"{decision.reason}; {current.version if current else 'nothing'} stays live"
        else:
            staged = Path(tempfile.mkdtemp(prefix="stage-", dir=run_dir))
            try:
                adapter = with_catalog(result.adapter, corpus.catalog.texts, corpus.catalog.titles)
                save_adapter(adapter, staged / ADAPTER_FILE)
                t0 = time.perf_counter()
                emb = embed_catalog(staged / ADAPTER_FILE, corpus.catalog.item_ids, corpus.catalog.texts,
                                    adapter["warm"], actors=req.embed_actors, use_gpu=req.use_gpu)
                write_embeddings(staged / EMBEDDINGS_FILE, corpus.catalog.item_ids, adapter["warm"], emb)
                logger.info("embedded %d items in %.1f s (%s)", len(emb), time.perf_counter() - t0,
                            "in process" if len(emb) <= IN_PROCESS_MAX_ITEMS and not req.use_gpu else "Ray Data")
                # a large catalog's index is built here, once, not by every replica that loads it
                write_index(staged, emb)
                window = data_window(corpus)  # an incremental run remembers what its parent saw:
                window["forgotten"] = honoured_by_run(window["forgotten"], current.manifest if parent else None)
                manifest = manifest_payload(model_config=mcfg, train_config=req.train_config,
                                            window=window, metrics=metrics, run_dir=run_dir,
                                            workers=req.workers, use_gpu=req.use_gpu, incremental=parent is not None)
                pub = publish_candidate(settings, registry, req.scene, staged, manifest, decision,
                                        expected_parent=current.version if current else None)
                published = pub.info
                message = f"published {req.scene}/{published.version} ({decision.reason})"
                kind, detail = PUBLISHED, decision.reason + ("" if decision.passed else f"; published anyway ({force_reason})")
                if pub.canary is not None:  # not live: a canary, or waiting for the scene's running experiment
                    message, kind, detail = f"canary {req.scene}/{published.version}: {pub.canary}", CANARY, pub.canary
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            if forgotten_pending:  # nothing that remembers a forgotten user may stay (nor be rolled back to)
                retire_remembering(registry, req.scene, set(corpus.forgotten), settings.runs_dir, run_dir)
    outcome = TrainOutcome(run_dir, published, message, metrics, result, kind, detail)
    (run_dir / OUTCOME_FILE).write_text(json.dumps({
        **outcome.record(req.scene), "published": published.version if published else None, "gate": message,
        "restored_from_epoch": result.restored_from_epoch, "seconds": result.seconds}, indent=1))
    return outcome
