"""Training throughput: Ray Train with 1 and 2 workers against a bare PyTorch loop, same run.

    python bench/train.py --json bench/results/train.json [--epochs 3] [--gpu]

All three run `training.train_step.train_epoch` on the same model (the fine-tuned LM recommender),
the same batch size and the same MovieLens-100K training windows. Samples/s is measured over
the epochs after the first (the first pays for Ray Data's pipeline start-up and the
catalog encoding), from the loop's own step timings. `ray2` runs 2 DDP workers, each with
half the CPU threads (on a 2-core machine it cannot be faster; on GPUs each worker has its own).
Target: 1-worker Ray Train within 15% of the bare loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def steady(history: list[dict]) -> float:
    tail = history[1:] or history
    return sum(h["samples"] for h in tail) / sum(h["seconds"] for h in tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from streaming.datasets import load_dataset
    from streaming.settings import load_settings
    from training.corpus import Corpus, leave_one_out, popularity_log_q, training_windows
    from training.lm import resolve_base_model
    from training.train_step import TrainConfig, build_model, make_optimizer, numpy_batches, train_epoch
    from training.model import ModelConfig
    from training.ray_trainer import fit

    settings = load_settings()
    corpus = Corpus.from_dataset(load_dataset(args.dataset, settings.datasets_dir))
    split = leave_one_out(corpus)
    mcfg = ModelConfig(base_model=resolve_base_model(settings.base_model))
    tcfg = dataclasses.replace(TrainConfig(), epochs=args.epochs)
    windows = training_windows(split.train_items, split.train_ts, mcfg.max_len, horizon=tcfg.horizon)
    counts = split.train_counts()
    warm = counts > 0
    log_q = popularity_log_q(counts)
    threads = os.cpu_count() or 1
    device = "cuda" if args.gpu else "cpu"

    # Bare PyTorch: the same loop, in this process.
    torch.set_num_threads(threads)
    model = build_model(mcfg, corpus.catalog.texts, warm, seed=tcfg.seed).to(device)
    opt = make_optimizer(model, tcfg)
    model.refresh_text_cache()
    lq = torch.tensor(log_q, device=device)
    bare_hist = []
    for epoch in range(tcfg.epochs):
        st = train_epoch(model, numpy_batches(windows, tcfg.batch_size, seed=epoch), opt, tcfg, log_q=lq,
                         device=device, autocast_dtype=torch.bfloat16 if args.gpu else None)
        bare_hist.append(st)
    bare = steady(bare_hist)
    print(f"bare: {bare:.1f} samples/s", flush=True)
    del model, opt

    out = {"bare_samples_per_s": bare}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            r = fit(windows=windows, item_ids=corpus.catalog.item_ids, item_texts=corpus.catalog.texts, warm=warm,
                    model_config=mcfg, train_config=tcfg, run_dir=Path(d), workers=workers, use_gpu=args.gpu,
                    log_q=log_q, progress=False, threads_per_worker=max(1, threads // workers))
        # Per-worker samples/s (each worker reads its shard); the job's throughput is the sum.
        out[f"ray{workers}_samples_per_s"] = steady(r.history) * workers
        print(f"ray{workers}: {out[f'ray{workers}_samples_per_s']:.1f} samples/s", flush=True)
    out["ray1_vs_bare"] = out["ray1_samples_per_s"] / bare
    out["ray2_vs_bare"] = out["ray2_samples_per_s"] / bare
    out.update(machine={"cpus": threads, "gpu": torch.cuda.get_device_name(0) if args.gpu else None},
               windows=int(len(windows["inputs"])), batch_size=tcfg.batch_size, epochs=tcfg.epochs)
    emit(out, args.json)
    print(f"{'PASS' if out['ray1_vs_bare'] >= 0.85 else 'MISS'}  1-worker Ray Train within 15% of bare "
          f"(ratio {out['ray1_vs_bare']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
