"""Offline quality on MovieLens-100K: every model of the evaluation harness, with intervals, one run;
then natural-language intent on the synthetic catalog, whose topics are ground truth.

    python bench/quality.py --json bench/results/quality.json [--epochs N] [--gpu] [--workers N]
    python bench/quality.py --quick --json /tmp/q.json      # CI smoke run: small budgets, figures not comparable

Part 1 runs `training.eval_harness.run_harness` (the same code as `streamrec evaluate`) on
MovieLens-100K (fetched into $STREAMREC_DATA_DIR/datasets on first use; no download when it is
there): leave-one-out with full ranking, and the cold-start protocol (20% of items held out of
training). Every choice is made on validation, the test split is read once at the end (the
harness's docstring). Part 2 trains the fine-tuned model on a synthetic catalog and measures
`training/query_intent.py`'s two query metrics through the serving code path.

JSON: `ndcg10`, `recall10`, `cold_recall10` (model -> value), `ndcg10_ci95` / `recall10_ci95` /
`cold_recall10_ci95` (model -> [lo, hi], 95% bootstrap over users), `paired_ndcg10`
({"baseline", "diff", "ci95"}: finetuned minus the best baseline, paired bootstrap),
`query_only_topic_precision10`, `query_blend_topic_share10`, `candidate_recall` (per source and
total, test cases), the choices made on validation, timings and the targets' verdicts.

Targets (issue 16): finetuned's NDCG@10 >= 1.10 x the best baseline's, with the paired interval
above 0; the towers alone (`finetuned_neural`) >= `sasrec`; cold Recall@10 >= 1.5 x
`zeroshot_lm`'s; query-only precision >= 0.9; blend share >= 0.5 at the default query weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIFT_TARGET = 1.10
COLD_TARGET = 1.5
QUERY_ONLY_TARGET = 0.9
BLEND_TARGET = 0.5
SYNTHETIC = "synthetic:n_users=400,n_items=300,n_events=16000,n_topics=10"
# --quick: one synthetic catalog for both parts (the harness's fine-tuned model answers the queries),
# and no `sasrec_id` (another two Ray Train runs; the full run has it)
QUICK_DATASET = "synthetic:n_users=120,n_items=120,n_events=3000,n_topics=6"
QUICK_MODELS = ("popular", "itemknn", "sasrec", "gru4rec", "zeroshot_lm", "finetuned")
QUICK_EPOCHS = 2
QUICK_SEQ_EPOCHS = 4
SYNTHETIC_EPOCHS = 6


def intent(settings, ds, epochs: int, workers: int, use_gpu: bool, progress: bool, two=None) -> dict:
    """Part 2: train on the synthetic catalog `ds` (unless `two`, a two-stage scorer already trained on
    its leave-one-out split, is given), then the query metrics at the default query weight."""
    import numpy as np

    from streaming.datasets.synthetic import topic_words
    from training.corpus import Corpus, leave_one_out
    from training.eval_harness import default_configs
    from training.lm import resolve_base_model
    from training.query_intent import query_intent_metrics
    from training.ranking_features import RetrievalSizes
    from training.train_run import new_run_dir, train_on_split
    from training.two_stage import fit_two_stage

    corpus = Corpus.from_dataset(ds)
    split = leave_one_out(corpus)
    if two is None:
        ft_cfg, _, tcfg = default_configs(resolve_base_model(settings.base_model), epochs)
        _, scorer = train_on_split(split, ft_cfg, tcfg, new_run_dir(settings.runs_dir, "intent"), workers=workers,
                                   use_gpu=use_gpu, progress=progress, ray_address=settings.ray_address)
        two, _ = fit_two_stage(split, scorer, sizes=RetrievalSizes.from_n(settings.retrieval_n),
                               half_life_ms=float(settings.trending_half_life_s) * 1000)
    topic_of = np.full(len(corpus.catalog), -1)
    for j, t in enumerate(ds.truth.item_topic):
        row = corpus.catalog.index.get(f"i{j}")
        if row is not None:
            topic_of[row] = int(t)
    now = int(max(int(t.max()) for t in corpus.ts if len(t))) + 60_000
    return query_intent_metrics(two, topic_of, topic_words(len(ds.truth.topic_names)),
                                popularity=split.train_counts(), now_ts=now)


def popular_recount(corpus) -> dict[str, float]:
    """An independent re-count of the `popular` baseline in plain Python (not the harness's code):
    per user with >= 3 interactions, the last is the target, everything before it is the history
    (masked), training counts are every user's sequence minus its last two (users with fewer keep
    all); items ranked by count, ties by catalog index; HR@10 and NDCG@10 over users."""
    import math
    from collections import Counter

    counts: Counter = Counter()
    for seq in corpus.items:
        seq = [int(i) for i in seq]
        counts.update(seq[:-2] if len(seq) >= 3 else seq)
    order = sorted(range(len(corpus.catalog)), key=lambda i: (-counts[i], i))
    live = [bool(x) for x in corpus.catalog.live]
    hits, gains, users = 0, 0.0, 0
    for seq in corpus.items:
        seq = [int(i) for i in seq]
        if len(seq) < 3:
            continue
        users += 1
        seen, target = set(seq[:-1]), seq[-1]
        top = [i for i in order if live[i] and i not in seen][:10]
        if target in top:
            hits += 1
            gains += 1.0 / math.log2(top.index(target) + 2)
    return {"hr10": hits / users, "ndcg10": gains / users, "users": users}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--dataset", default=None, help="dataset spec (default ml-100k; --quick: a small synthetic one)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the trained models (default: TrainConfig)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: small data and budgets (figures not comparable)")
    ap.add_argument("--no-intent", action="store_true", help="skip part 2 (the synthetic query metrics)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)

    from streaming.datasets import load_dataset
    from streaming.settings import load_settings
    from training.corpus import Corpus
    from training.eval_harness import BASELINES, MODEL_NAMES, HarnessOptions, run_harness

    settings = load_settings()
    progress = not args.no_progress
    spec = args.dataset or (QUICK_DATASET if args.quick else "ml-100k")
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)
    opts = HarnessOptions(epochs=epochs, half_life_ms=float(settings.trending_half_life_s) * 1000)
    if args.quick:
        opts = dataclasses.replace(opts, seq_max_epochs=QUICK_SEQ_EPOCHS,
                                   seq_grids={"sasrec": {"dropout": (0.2,), "max_len": (50,), "hidden": (32,)},
                                              "gru4rec": {"hidden": (32,), "dropout": (0.1,)}})
    t0 = time.perf_counter()
    dataset = load_dataset(spec, settings.datasets_dir)
    corpus = Corpus.from_dataset(dataset, source=spec)
    report = run_harness(corpus, settings=settings, epochs=epochs, workers=args.workers, use_gpu=args.gpu,
                         progress=progress, options=opts, models=QUICK_MODELS if args.quick else MODEL_NAMES)
    wall_eval = time.perf_counter() - t0
    res, ci = report.results, report.ci
    out: dict = {}
    for key, proto, metric in (("ndcg10", "test", "ndcg10"), ("recall10", "test", "recall10"),
                               ("cold_recall10", "cold", "recall10")):
        out[key] = {m: res[m][proto][metric] for m in res if proto in res[m]}
        out[f"{key}_ci95"] = {m: ci[m][proto][metric] for m in ci if proto in ci[m]}
    out["paired_ndcg10"] = report.paired
    out["popular_recount"] = popular_recount(corpus)
    choices = report.meta["choices"]
    out["candidate_recall"] = choices.get("test", {}).get("ranker", {}).get("test_candidate_recall")
    t1 = time.perf_counter()
    if not args.no_intent:
        if args.quick:
            q = intent(settings, dataset, QUICK_EPOCHS, args.workers, args.gpu, progress,
                       two=report.scorers["test"]["finetuned"])
        else:
            q = intent(settings, load_dataset(SYNTHETIC, settings.datasets_dir), SYNTHETIC_EPOCHS, args.workers,
                       args.gpu, progress)
        out.update(q)
    wall = time.perf_counter() - t0
    ndcg = out["ndcg10"]
    best = report.paired.get("baseline") or max((m for m in BASELINES if m in ndcg), key=ndcg.get)
    verdicts = {
        "finetuned_ndcg10_at_least_1.1x_best_baseline": ndcg["finetuned"] >= LIFT_TARGET * ndcg[best],
        "paired_ci_excludes_0": bool(report.paired and report.paired["ci95"][0] > 0),
        "towers_alone_at_least_sasrec": ndcg.get("finetuned_neural", 0) >= ndcg.get("sasrec", float("inf")),
        "cold_recall_at_least_1.5x_zeroshot": out["cold_recall10"]["finetuned"]
        >= COLD_TARGET * out["cold_recall10"]["zeroshot_lm"],
        "under_30_min": wall < 1800,
        "popular_matches_plain_recount": abs(out["popular_recount"]["ndcg10"] - ndcg["popular"]) < 1e-9
        and abs(out["popular_recount"]["hr10"] - out["recall10"]["popular"]) < 1e-9,
    }
    if not args.no_intent:
        verdicts["query_only_precision_at_least_0.9"] = out["query_only_topic_precision10"] >= QUERY_ONLY_TARGET
        verdicts["query_blend_share_at_least_0.5"] = out["query_blend_topic_share10"] >= BLEND_TARGET
    out.update({"wall_s": wall, "wall_evaluation_s": wall_eval, "wall_intent_s": time.perf_counter() - t1,
                "cpus": os.cpu_count(), "gpu": args.gpu, "quick": args.quick, "dataset": spec, "best_baseline": best,
                "targets": verdicts, "results": res, "ci95": ci, "meta": report.meta,
                "report_dir": str(report.paths["json"].parent)})
    print(report.markdown)
    p = report.paired
    if p:
        print(f"paired NDCG@10 finetuned - {p['baseline']}: {p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
    print(f"candidate recall (test): {out['candidate_recall']}")
    rc = out["popular_recount"]
    print(f"popular, plain re-count: HR@10 {rc['hr10']:.4f} NDCG@10 {rc['ndcg10']:.4f} over {rc['users']} users "
          f"(harness: {out['recall10']['popular']:.4f} / {ndcg['popular']:.4f})")
    if not args.no_intent:
        print(f"query only: topic precision@10 {out['query_only_topic_precision10']:.3f}; blend: query topic share@10 "
              f"{out['query_blend_topic_share10']:.3f} at the default weight {out['query_weight_default']}, "
              f"by weight {out['query_blend_by_weight']}")
    print(f"\nwall {wall:.0f} s on {os.cpu_count()} CPUs; report in {report.paths['json'].parent}")
    for k, v in verdicts.items():
        print(f"  {'PASS' if v else 'MISS'}  {k}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
