"""Offline quality on MovieLens-100K: every model of the evaluation harness, one run.

    python bench/quality.py --json bench/results/quality.json [--epochs N] [--gpu] [--workers N]

Runs `training.eval_harness.run_harness` (the same code as `streamrec evaluate`) on MovieLens-100K
(fetched into $STREAMREC_DATA_DIR/datasets on first use; no download when it is there):
leave-one-out with full ranking, and the cold-start protocol (20% of items held out of
training). Prints the Markdown table; the JSON has `ndcg10`, `recall10` and `cold_recall10`,
each {model: value}, plus the whole results, timings and the targets' verdicts.

Targets (issue 3): finetuned has the best NDCG@10 of all and at least 0.125; on the cold split
its Recall@10 beats zeroshot_lm and every content-free baseline; wall time < 30 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NDCG_TARGET = 0.125
CONTENT_FREE = ("popular", "itemknn", "sasrec_id")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--dataset", default="ml-100k", help="dataset spec (default ml-100k)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the trained models (default: TrainConfig)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)

    from streaming.datasets import load_dataset
    from streaming.settings import load_settings
    from training.corpus import Corpus
    from training.eval_harness import run_harness

    settings = load_settings()
    t0 = time.perf_counter()
    corpus = Corpus.from_dataset(load_dataset(args.dataset, settings.datasets_dir), source=args.dataset)
    report = run_harness(corpus, settings=settings, epochs=args.epochs, workers=args.workers, use_gpu=args.gpu,
                         progress=not args.no_progress)
    wall = time.perf_counter() - t0
    res = report.results
    ndcg = {m: res[m]["test"]["ndcg10"] for m in res}
    recall = {m: res[m]["test"]["recall10"] for m in res}
    cold = {m: res[m]["cold"]["recall10"] for m in res}
    best_other = max(v for m, v in ndcg.items() if m != "finetuned")
    verdicts = {
        "finetuned_best_ndcg10": ndcg["finetuned"] > best_other,
        "finetuned_ndcg10_at_least_0.125": ndcg["finetuned"] >= NDCG_TARGET,
        "cold_recall_beats_zeroshot_and_content_free": all(
            cold["finetuned"] > cold[m] for m in ("zeroshot_lm", *CONTENT_FREE)),
        "under_30_min": wall < 1800,
    }
    out = {"ndcg10": ndcg, "recall10": recall, "cold_recall10": cold, "wall_s": wall, "cpus": os.cpu_count(),
           "gpu": args.gpu, "targets": verdicts, "results": res, "meta": report.meta,
           "report_dir": str(report.paths["json"].parent)}
    print(report.markdown)
    print(f"\nwall {wall:.0f} s on {os.cpu_count()} CPUs; report in {report.paths['json'].parent}")
    for k, v in verdicts.items():
        print(f"  {'PASS' if v else 'MISS'}  {k}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
