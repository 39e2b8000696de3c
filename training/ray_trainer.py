"""The Ray Train driver: `fit` runs `train_loop_per_worker` in a `TorchTrainer` (DDP over N workers).

Data path: the training windows (`training.corpus.training_windows`) become a Ray Dataset;
each worker reads its shard with `ray.train.get_dataset_shard("train")` and
`iter_torch_batches` (shuffled per epoch). The model is wrapped in DDP by
`ray.train.torch.prepare_model` when there is more than one worker.

Fault tolerance: every epoch rank 0 reports a checkpoint (`state.pt`: the adapter dict, the
optimizer state, the epoch and the loss history). `FailureConfig(max_failures)` makes Ray Train
restart a worker group whose worker died; the loop then resumes from `ray.train.get_checkpoint()`
at the next epoch. (The test that kills a worker finds its pid through the fault-injection
setting of `training.fault_injection`.)

Progress: rank 0 appends its step count to `<run_dir>/progress.json`; the driver shows a tqdm bar
from it (Ray workers' own stderr is not a terminal).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from streaming.ray_runtime import ensure_ray, run_as_batch_work
from streaming.versioned_store import atomic_write_json
from training import fault_injection
from training.adapter import checkpoint_dict, load_adapter, load_state, load_torch_file, save_adapter
from training.model import ModelConfig
from training.train_step import TrainConfig, build_model, make_optimizer, numpy_batches, train_epoch, unwrap

STATE_FILE = "state.pt"
PARENT_FILE = "parent.pt"  # the parent adapter, handed to the workers through the run directory
PROGRESS_FILE = "progress.json"
PROGRESS_POLL_S = 0.5
PROGRESS_WRITE_EVERY_S = 0.5
SHUFFLE_BUFFER_ROWS = 4096
CACHE_SHARD_MAX_BYTES = 256 * 2**20  # a worker shard up to this size is kept in memory after the first read
CACHE_READ_ROWS = 4096


@dataclass
class FitResult:
    adapter: dict  # checkpoint_dict(...) of the final model
    history: list[dict]  # per epoch: epoch, loss, samples, seconds, samples_per_s
    seconds: float
    restored_from_epoch: int | None  # the epoch a restarted worker group resumed after (None: no restart)


def windows_dataset(windows: dict[str, np.ndarray]):
    """(N, L) int arrays -> a Ray Dataset with tensor columns."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    return ray.data.from_arrow(pa.table({k: ArrowTensorArray.from_numpy(v) for k, v in windows.items()}))


def _write_progress(path: Path, progress: dict[str, Any]) -> None:
    # Read by the driver's progress bar only: no fsync (a lost update is redrawn half a second later).
    atomic_write_json(path, progress, indent=None, durable=False)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (runs on every worker)."""
    import ray.train
    import ray.train.torch

    run_as_batch_work()  # serving on the same machine keeps its CPU share
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(config["run_dir"])
    if config.get("write_worker_pids"):
        fault_injection.write_worker_pid(run_dir, rank)
    torch.set_num_threads(int(config["threads"]))
    mcfg = ModelConfig.from_dict(config["model_config"])
    tcfg = TrainConfig.from_dict(config["train_config"])
    parent = load_adapter(config["parent_path"]) if config.get("parent_path") else None
    index = {item: i for i, item in enumerate(config["item_ids"])}
    model = build_model(mcfg, config["item_texts"], np.asarray(config["warm"], dtype=bool), seed=tcfg.seed,
                        parent=parent, item_index=index)
    opt = make_optimizer(model, tcfg)
    start_epoch, history, restored = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_torch_file(Path(d) / STATE_FILE)
        load_state(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, restored = state["epoch"] + 1, state["history"], state["epoch"]
    device = ray.train.torch.get_device()
    ddp = ray.train.torch.prepare_model(model)  # .to(device), DDP when world > 1
    inner = unwrap(ddp)
    use_gpu = device.type == "cuda"
    log_q = torch.tensor(config["log_q"], device=device) if config.get("log_q") is not None else None
    shard = ray.train.get_dataset_shard("train")
    progress = {"epoch": start_epoch, "epochs": tcfg.epochs, "steps": 0, "restored": restored, "loss": None}
    last_write = [0.0]

    def on_step(samples: int, loss: float) -> None:
        if rank != 0:
            return
        progress["steps"] += 1
        progress["loss"] = loss
        now = time.monotonic()
        if now - last_write[0] >= PROGRESS_WRITE_EVERY_S:
            last_write[0] = now
            _write_progress(run_dir / PROGRESS_FILE, progress)

    cached: dict[str, np.ndarray] | None = None
    inner.refresh_text_cache()
    for epoch in range(start_epoch, tcfg.epochs):
        if epoch > start_epoch and tcfg.refresh_every > 0 and epoch % tcfg.refresh_every == 0:
            inner.refresh_text_cache()
        progress["epoch"] = epoch
        if config.get("cache_shard"):
            # A shard this small is read from Ray Data once and reshuffled in memory every epoch:
            # restarting the streaming pipeline each epoch cost ~15% of a CPU epoch here.
            if cached is None:
                parts = list(shard.iter_batches(batch_size=CACHE_READ_ROWS, batch_format="numpy"))
                cached = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
            batches = numpy_batches(cached, tcfg.batch_size, seed=tcfg.seed * 1000 + epoch)
        else:
            batches = shard.iter_torch_batches(batch_size=tcfg.batch_size,
                                               local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                               local_shuffle_seed=tcfg.seed * 1000 + epoch, device=device)
        stats = train_epoch(ddp, batches, opt, tcfg, log_q=log_q, device=device,
                            autocast_dtype=torch.bfloat16 if use_gpu else None, on_step=on_step)
        stats.update(epoch=epoch, samples_per_s=stats["samples"] / max(stats["seconds"], 1e-9), world=world)
        history.append(stats)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                adapter = checkpoint_dict(inner, config["item_ids"], np.asarray(config["warm"], dtype=bool))
                torch.save({"adapter": adapter, "optimizer": opt.state_dict(), "epoch": epoch, "history": history},
                           Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                progress["loss"] = stats["loss"]
                _write_progress(run_dir / PROGRESS_FILE, progress)
            ray.train.report({"epoch": epoch, "loss": stats["loss"], "samples_per_s": stats["samples_per_s"]},
                             checkpoint=checkpoint)


class _ProgressBar:
    """Driver-side tqdm fed from rank 0's progress file."""

    def __init__(self, path: Path, total_steps: int, enabled: bool) -> None:
        self.path, self.stop = path, threading.Event()
        self.thread = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        base, last_epoch, done = 0, None, 0
        while not self.stop.wait(PROGRESS_POLL_S):
            try:
                p = json.loads(self.path.read_text())
            except (OSError, ValueError):
                continue
            self.bar.set_postfix(epoch=f"{p['epoch'] + 1}/{p['epochs']}",
                                 loss=f"{p['loss']:.3f}" if p.get("loss") is not None else "-")
            if p.get("restored") is not None and last_epoch is None:
                self.bar.write(f"resumed from the checkpoint of epoch {p['restored'] + 1}")
            last_epoch = p["epoch"]
            steps = p["steps"]
            if steps < done - base:  # a restarted worker counts from zero again
                base = done
            new = base + steps
            if new > done:
                self.bar.update(new - done)
                done = new

    def close(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.bar.close()


def fit(*, windows: dict[str, np.ndarray], item_ids: list[str], item_texts: list[str], warm: np.ndarray,
        model_config: ModelConfig, train_config: TrainConfig, run_dir: Path, workers: int = 1, use_gpu: bool = False,
        parent: dict | None = None, log_q: np.ndarray | None = None, max_failures: int = 2, progress: bool = True,
        threads_per_worker: int | None = None, ray_address: str | None = None) -> FitResult:
    """Train with a Ray Train TorchTrainer; returns the final adapter and the loss history."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ensure_ray(ray_address)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    parent_path = None
    if parent is not None:
        parent_path = save_adapter(parent, run_dir / PARENT_FILE)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(workers, 1))
    config = {
        "run_dir": str(run_dir), "threads": threads, "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict(), "item_ids": list(item_ids), "item_texts": list(item_texts),
        "warm": np.asarray(warm, dtype=bool).tolist(), "parent_path": str(parent_path) if parent_path else None,
        "log_q": None if log_q is None else np.asarray(log_q, dtype=np.float32).tolist(),
        "cache_shard": sum(v.nbytes for v in windows.values()) <= CACHE_SHARD_MAX_BYTES * max(workers, 1),
        # Read here, not in the workers: they may run in processes started before it was set.
        "write_worker_pids": fault_injection.active(fault_injection.WORKER_PIDS),
    }
    # One CPU per worker in Ray's books (the data shard readers need the rest); torch threads as set above.
    per_worker = {"CPU": 1} if not use_gpu else {"CPU": 1, "GPU": 1}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": windows_dataset(windows)},
    )
    steps_per_epoch = -(-len(windows["inputs"]) // (train_config.batch_size * workers))
    bar = _ProgressBar(run_dir / PROGRESS_FILE, steps_per_epoch * train_config.epochs, progress)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        state = load_torch_file(Path(d) / STATE_FILE)
    restored = None
    try:
        p = json.loads((run_dir / PROGRESS_FILE).read_text())
        restored = p.get("restored")
    except (OSError, ValueError):
        pass
    return FitResult(adapter=state["adapter"], history=state["history"], seconds=seconds, restored_from_epoch=restored)

