"""Training at 10^6 users: what the driver holds when it reads a sample of the sequences (issue 18).

    nice -n 10 python bench/train_scale.py --data-dir /tmp/trainscale-data --events 10000000 --users 1000000 \\
        --items 20000 --max-users 20000 --json bench/results/train-scale.json

Steps (each in a fresh child process, so every peak is that step's own):

1. the feature tables (built once into `<data-dir>/features`, reused while `<data-dir>/build.json` matches
   --events/--users/--items): `bench/features_scale.py`'s synthetic log writer (numpy -> Parquet, ingest's
   layout) and a full `run_features` over it, both run from a snapshot of the committed code
   (`git archive HEAD` into `--src`, `PYTHONPATH` pointing there), so the tables do not depend on
   uncommitted edits of the feature job in the working tree;
2. loading only, three ways (`load_modes`): the old path (`load_feature_tables` + `Corpus.from_feature_tables`:
   every sequence as Python lists in the driver), `Corpus.from_feature_parts` with max_users=0 (every user,
   part by part, vectorised) and with the default `DEFAULT_MAX_USERS`: each child's peak RSS (VmHWM),
   seconds, users and events;
3. a training run (`training.train_run.run_training`, --no-publish, 1 epoch, an ID-only model without the
   co-visitation prior and the ranker unless --full-model) with max_users = --max-users: the driver's VmHWM,
   the Ray processes' peak RSS (psutil, sampled every `SAMPLE_EVERY_S`: the largest single process and the
   largest sum at one sample; RSS counts shared pages -- the object store's mapped pages included -- in each
   process that maps them), the load/sample seconds, users read vs sampled, training windows, the fit's
   seconds and the whole run's.

`--skip-old` skips the old-path load (at 10^6 users it is the slowest and largest step), `--skip-loads` all
of step 2, `--skip-train` step 3; `--only-build` stops after step 1. `--loss sampled` keeps the fit of a large
sample short (the default `auto` is a full softmax over the catalog at 20,000 items). JSON on stdout; `--json PATH` writes it there too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

SAMPLE_EVERY_S = 0.5  # how often the training child samples the RSS of its Ray processes
BUILD_FILE = "build.json"  # in --data-dir: the parameters the tables there were built with
CHILD_TIMEOUT_S = 3 * 3600  # a step that takes longer than this is stuck

# Step 1, run by a child with PYTHONPATH=<src snapshot of HEAD> and cwd there: nothing of the working tree.
BUILD_CODE = r"""
import json, sys, time
from pathlib import Path
from bench.features_scale import SyntheticLog
from streaming.features import read_manifest, run_features
from streaming.settings import load_settings

a = json.loads(sys.argv[1])
s = load_settings(data_dir=Path(a["data_dir"]))
log = SyntheticLog(s, users=a["users"], items=a["items"], seed=0)
t0 = time.monotonic()
log.write_catalog()
log.append(a["events"])
gen_s = time.monotonic() - t0
t0 = time.monotonic()
r = run_features(s, full=True)
feat_s = time.monotonic() - t0
m = read_manifest(s)
print("RESULT " + json.dumps({"generate_s": round(gen_s, 1), "features_s": round(feat_s, 1),
                              "new_events": r.new_events, "counts": m.get("counts", {}),
                              "user_buckets": s.user_buckets, "version": m.get("version")}))
"""


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def _child(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run a step in a fresh process; its result is the JSON on its last `RESULT ` line."""
    t0 = time.monotonic()
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    wall = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"step {args[1:4]} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["child_wall_s"] = round(wall, 1)
    return out


def build_tables(data_dir: Path, src: Path, *, events: int, users: int, items: int) -> dict[str, Any]:
    """Step 1: the feature tables in `data_dir` (reused when built with the same parameters)."""
    want = {"events": events, "users": users, "items": items}
    marker = data_dir / BUILD_FILE
    if marker.is_file():
        built = json.loads(marker.read_text())
        if {k: built.get(k) for k in want} == want and (data_dir / "features" / "manifest.json").is_file():
            return {**built, "reused": True}
        raise SystemExit(f"{data_dir} holds tables built with {built}, not {want}: choose another --data-dir")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SystemExit(f"{data_dir} is not empty and has no {BUILD_FILE}: choose an empty or new --data-dir")
    if not (src / "bench" / "features_scale.py").is_file():
        src.mkdir(parents=True, exist_ok=True)
        # read-only on the repository: the committed tree, unpacked elsewhere
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = _child([sys.executable, "-c", BUILD_CODE, json.dumps({**want, "data_dir": str(data_dir)})],
                 env=env, cwd=src)
    record = {**want, **out, "src": str(src)}
    marker.write_text(json.dumps(record, indent=1))
    return {**record, "reused": False}


# --- children ----------------------------------------------------------------------------------


def child_load(data_dir: Path, mode: str, max_users: int) -> dict[str, Any]:
    """Step 2 (in the child): load the corpus one way; peak RSS and seconds."""
    from streaming.settings import load_settings
    from training.corpus import Corpus, load_corpus

    settings = load_settings(data_dir=data_dir)
    base = vm_hwm_mb()
    t0 = time.monotonic()
    if mode == "tables":
        from streaming.features import load_feature_tables

        corpus = Corpus.from_feature_tables(load_feature_tables(settings))
    else:
        corpus = load_corpus(settings, max_users=max_users)
    seconds = time.monotonic() - t0
    return {"mode": mode, "max_users": max_users if mode != "tables" else None, "load_s": round(seconds, 2),
            "users": len(corpus.user_ids), "users_in_tables": corpus.users_in_tables, "events": corpus.n_events,
            "items": len(corpus.catalog), "peak_rss_mb": round(vm_hwm_mb(), 1),
            "rss_before_load_mb": round(base, 1)}


class RaySampler:
    """Samples the RSS of this process's descendants (the local Ray cluster it started and its workers)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak_one_mb = 0.0
        self.peak_one_name = ""
        self.peak_sum_mb = 0.0
        self.peak_workers_sum_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RaySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(SAMPLE_EVERY_S):
            total = workers = 0.0
            for p in self.me.children(recursive=True):
                try:
                    mb = p.memory_info().rss / 2**20
                    name = p.name()
                except psutil.Error:  # exited meanwhile
                    continue
                total += mb
                if name.startswith("ray::"):  # task / actor workers (Train workers, Data tasks)
                    workers += mb
                if mb > self.peak_one_mb:
                    self.peak_one_mb, self.peak_one_name = mb, name
            self.peak_sum_mb = max(self.peak_sum_mb, total)
            self.peak_workers_sum_mb = max(self.peak_workers_sum_mb, workers)


def child_train(data_dir: Path, max_users: int, epochs: int, full_model: bool, loss: str) -> dict[str, Any]:
    """Step 3 (in the child): one training run on the tables; peaks and timings."""
    import dataclasses
    import logging

    import training.corpus as corpus_mod
    import training.train_run as train_run
    from streaming.settings import load_settings
    from training.lm import resolve_base_model
    from training.model import ModelConfig
    from training.train_step import TrainConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings(data_dir=data_dir)
    if full_model:
        mcfg = ModelConfig(base_model=resolve_base_model(settings.base_model), dim=32, max_len=20, heads=2,
                           blocks=1, lora_layers=1)
    else:  # what is measured is the data path: an ID-only head keeps the fit short on 2 cores
        mcfg = ModelConfig(base_model=resolve_base_model(settings.base_model), use_text=False, dim=32, max_len=20,
                           heads=2, blocks=1, covis_prior=False, ranker=False)
    tcfg = TrainConfig(epochs=epochs, batch_size=256, lr=3e-3, loss=loss)
    if "max_users" in {f.name for f in dataclasses.fields(TrainConfig)}:
        tcfg = dataclasses.replace(tcfg, max_users=max_users)
    else:  # until TrainConfig has the field, run_training reads this default
        train_run.DEFAULT_MAX_USERS = max_users

    # what run_training spends where: the corpus load and the windows it cuts
    timings: dict[str, Any] = {}
    real_load, real_windows = train_run.load_corpus, train_run.training_windows

    def timed_load(*a: Any, **k: Any):
        t0 = time.monotonic()
        c = real_load(*a, **k)
        timings.update(load_s=round(time.monotonic() - t0, 2), users=len(c.user_ids),
                       users_in_tables=c.users_in_tables, events=c.n_events, rss_after_load_mb=round(vm_hwm_mb(), 1))
        return c

    def counted_windows(*a: Any, **k: Any):
        w = real_windows(*a, **k)
        timings["windows"] = int(len(w["inputs"]))
        return w

    train_run.load_corpus, train_run.training_windows = timed_load, counted_windows
    req = train_run.TrainRequest(model_config=mcfg, train_config=tcfg, progress=False, publish=False,
                                 embed_actors=1)
    t0 = time.monotonic()
    with RaySampler() as ray_rss:
        outcome = train_run.run_training(settings, req)
    run_s = time.monotonic() - t0
    import ray

    ray.shutdown()
    return {"max_users": max_users, "epochs": epochs, "full_model": full_model, "loss": loss, **timings,
            "fit_s": round(outcome.fit.seconds, 1), "run_s": round(run_s, 1), "outcome": outcome.kind,
            "metrics": outcome.metrics, "driver_peak_rss_mb": round(vm_hwm_mb(), 1),
            "ray_peak_process_rss_mb": round(ray_rss.peak_one_mb, 1), "ray_peak_process": ray_rss.peak_one_name,
            "ray_peak_sum_rss_mb": round(ray_rss.peak_sum_mb, 1),
            "ray_workers_peak_sum_rss_mb": round(ray_rss.peak_workers_sum_mb, 1),
            "default_max_users": corpus_mod.DEFAULT_MAX_USERS}


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "trainscale-data",
                    help="where the feature tables are built (kept, reused) and the run directories go")
    ap.add_argument("--src", type=Path, default=Path(tempfile.gettempdir()) / "trainscale-src",
                    help="snapshot of the committed code (git archive HEAD) that builds the tables")
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--max-users", type=int, default=20_000, help="users the training run samples (0 = all)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--full-model", action="store_true",
                    help="train the quick preset's model (MiniLM + LoRA, co-visitation prior, ranker)")
    ap.add_argument("--loss", default="auto", help="TrainConfig.loss of the training run (auto | full | sampled)")
    ap.add_argument("--skip-old", action="store_true", help="skip loading through the old whole-table path")
    ap.add_argument("--skip-loads", action="store_true", help="skip step 2 (the load-only children)")
    ap.add_argument("--skip-train", action="store_true", help="loading figures only")
    ap.add_argument("--only-build", action="store_true", help="build (or check) the tables, then stop")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--child", choices=("load", "train"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="parts", help=argparse.SUPPRESS)
    a = ap.parse_args()
    data_dir = a.data_dir.absolute()

    if a.child == "load":
        print("RESULT " + json.dumps(child_load(data_dir, a.mode, a.max_users)), flush=True)
        return
    if a.child == "train":
        print("RESULT " + json.dumps(child_train(data_dir, a.max_users, a.epochs, a.full_model, a.loss)), flush=True)
        return

    out: dict[str, Any] = {"tables": build_tables(data_dir, a.src.absolute(), events=a.events, users=a.users,
                                                  items=a.items)}
    if not a.only_build:
        from training.corpus import DEFAULT_MAX_USERS

        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--data-dir", str(data_dir)]
        loads = [("parts", 0), ("parts", DEFAULT_MAX_USERS)]
        if a.max_users not in (0, DEFAULT_MAX_USERS):
            loads.append(("parts", a.max_users))
        if not a.skip_old:
            loads.insert(0, ("tables", 0))
        out["load_modes"] = [] if a.skip_loads else [_child([*me, "--child", "load", "--mode", mode, "--max-users", str(n), *common])
                             for mode, n in loads]
        if not a.skip_train:
            flags = ["--full-model"] if a.full_model else []
            out["train"] = _child([*me, "--child", "train", "--max-users", str(a.max_users), "--epochs",
                                   str(a.epochs), "--loss", a.loss, *flags, *common])
    out["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "nice": os.nice(0)}
    emit(out, a.json, indent=2)


if __name__ == "__main__":
    main()
