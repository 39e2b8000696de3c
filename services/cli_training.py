"""The training commands of `streamrec`: `train` (one run), `train-loop` (the continuous trainer
`streamrec up` runs) and `evaluate` (the evaluation table). Registered on the one `app` by
`services/cli.py`, in the order its help lists them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from services.cli_common import (
    EXIT_FAILURE,
    CommandFailed,
    PRESET_HELP,
    fail,
    preset_or_exit,
    schedule_or_exit,
    settings_or_exit,
    setup_logging,
    training_guard,
    with_stack,
)
from services.shutdown import run_until_stopped, stop_on_signals


def _check_gpus(ray_address: str | None, workers: int) -> None:
    """--gpu: on a Ray cluster (a KubeRay RayJob's driver runs on a GPU-less head) the cluster must
    have a GPU per worker; on one machine, PyTorch must see CUDA."""
    if ray_address:
        import ray

        from streaming.ray_runtime import ensure_ray

        ensure_ray(ray_address)
        have = ray.cluster_resources().get("GPU", 0)
        if have < workers:
            raise fail(f"--gpu --workers {workers}: the Ray cluster at {ray_address} has {have:g} GPUs")
        return
    import torch

    if not torch.cuda.is_available():
        raise fail("--gpu: no CUDA device is visible to PyTorch on this machine")


def train(
    scene: str = typer.Option("default", help="Scene whose adapter to train ('default' = every event)."),
    workers: int = typer.Option(1, min=1, max=512, help="Ray Train workers (DDP)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker, bf16 autocast."),
    incremental: bool = typer.Option(False, "--incremental", help="Start from the scene's live adapter; train on "
                                     "the events since its data window plus a replay sample of older ones."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (default: the preset's; fewer with --incremental)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Windows per step and worker."),
    hard_negatives: Optional[bool] = typer.Option(
        None, "--hard-negatives/--no-hard-negatives", help="Also push down each user's shown-but-not-clicked items "
        "(impressions log; training/hard_negatives.py). Default: the preset's (off; `--preset NAME+hard-negatives`)."),
    max_users: Optional[int] = typer.Option(None, min=0, help="Users whose sequences the run reads from the feature "
                                            "tables: a deterministic sample by hash of user id (0 = all). Default: "
                                            "100,000."),
    force: bool = typer.Option(False, "--force", help="Publish even if the gate refuses."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Publish to the registry through the gate."),
    dataset: Optional[str] = typer.Option(None, help="Train on a dataset spec (ml-100k, synthetic:...) instead "
                                          "of the feature tables (its data window is then timestamps only)."),
    preset: str = typer.Option("default", help=f"Model and training size: {PRESET_HELP}."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    outcome_json: Optional[Path] = typer.Option(None, "--outcome-json", help="Also write how the run ended to this "
                                                "JSON file (outcome: published, gate_refused, not_published, "
                                                "nothing_new, canary or failed), for monitoring; 'running' while it runs."),
) -> None:
    """Fine-tune LoRA adapters + heads with Ray Train, evaluate, and publish through the gate.

    Ends with one `outcome:` line. Exit status 0 for every normal end -- published, gate refused
    (the live adapter stays), nothing new to train on, --no-publish -- so that a failed run (a
    scheduler's failed Job) means a failure: 1 for a failure, 2 for bad configuration."""
    setup_logging()
    from training.train_run import FAILED, RUNNING, outcome_line, outcome_record

    try:
        _write_outcome(outcome_json, outcome_record(RUNNING, "", scene=scene))
    except OSError as exc:
        raise fail(f"--outcome-json {outcome_json}: {exc}") from None
    started = time.time()
    try:
        record = _train(scene, workers, gpu, incremental, epochs, batch_size, force, publish, dataset, preset, progress,
                        hard_negatives=hard_negatives, max_users=max_users)
    except BaseException as exc:
        if isinstance(exc, typer.Exit) and exc.exit_code == 0:
            raise
        code = exc.exit_code if isinstance(exc, typer.Exit) else EXIT_FAILURE
        detail = (exc.message if isinstance(exc, CommandFailed)
                  else f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        failed = outcome_record(FAILED, detail, scene=scene, exit_code=code)
        typer.echo(outcome_line(failed), err=True)
        _record_metrics(scene, FAILED, started)
        try:
            _write_outcome(outcome_json, failed)
        except OSError as write_error:  # the failure itself is what matters; say why the file is stale
            typer.echo(f"--outcome-json {outcome_json}: {write_error}", err=True)
        raise
    _record_metrics(scene, record["outcome"], started)
    _write_outcome(outcome_json, {**record, "exit_code": 0})
    typer.echo(outcome_line(record))


def _record_metrics(scene: str, kind: str, started: float) -> None:
    """The run's outcome metrics (training/train_metrics.py: train-<scene>.prom, the Pushgateway).
    Skipped when the settings or the scene name are what failed: there is nowhere valid to write."""
    from streaming.settings import SettingsError, load_settings
    from training.registry import RegistryError, validate_name
    from training.train_metrics import record_train_run

    try:
        settings = load_settings()
        validate_name(scene, "scene")
    except (SettingsError, RegistryError):
        return
    record_train_run(settings, scene, kind, started=started)


def _write_outcome(path: Path | None, record: dict) -> None:
    if path is not None:
        from streaming.versioned_store import atomic_write_json

        atomic_write_json(path, record)  # whole or not at all: a monitor may read it at any time


def _train(scene: str, workers: int, gpu: bool, incremental: bool, epochs: int | None, batch_size: int | None,
           force: bool, publish: bool, dataset: str | None, preset: str, progress: bool, *,
           hard_negatives: bool | None = None, max_users: int | None = None) -> dict:
    """`streamrec train` up to its outcome record (failures raise)."""
    import dataclasses as dc

    from training.corpus import NotEnoughData
    from training.train_run import NOTHING_NEW, TrainRequest, outcome_record, run_training
    from training.registry import validate_name

    settings = settings_or_exit()
    training_guard(lambda: validate_name(scene, "scene"))
    chosen = preset_or_exit(preset)
    tcfg = chosen.train_config(incremental)
    tcfg = dc.replace(tcfg, **{k: v for k, v in {"epochs": epochs, "batch_size": batch_size,
                                                  "hard_negatives": hard_negatives,
                                                  "max_users": max_users}.items() if v is not None})
    req = TrainRequest(scene=scene, workers=workers, use_gpu=gpu, incremental=incremental, force=force,
                       model_config=chosen.model, train_config=tcfg, progress=progress, publish=publish)

    def go():
        corpus = None
        if dataset:
            from streaming.datasets import load_dataset
            from training.corpus import Corpus

            corpus = Corpus.from_dataset(load_dataset(dataset, settings.datasets_dir), source=dataset)
        try:
            return run_training(settings, req, corpus)
        except NotEnoughData as exc:  # a normal end of a scheduled run (exit 0), not a failure
            return outcome_record(NOTHING_NEW, str(exc), scene=scene)

    if gpu:
        _check_gpus(settings.ray_address or os.environ.get("RAY_ADDRESS"), workers)
    outcome = training_guard(go)
    if isinstance(outcome, dict):
        return outcome
    m = outcome.metrics
    typer.echo(f"validation NDCG@10 {m['val_ndcg10']:.4f}, test NDCG@10 {m['test_ndcg10']:.4f}, "
               f"test Recall@10 {m['test_recall10']:.4f}")
    typer.echo(outcome.gate_message)
    typer.echo(f"run directory: {outcome.run_dir} (loss.png, evaluation.md/.json/.png, outcome.json)")
    return outcome.record(scene)


def train_loop(
    every: str = typer.Option("10m", "--every", help="When to train: 10m / 90s / 1h (at most that often, when "
                              "there are new events; a bare number is minutes) or 5000events (after that many)."),
    preset: str = typer.Option("default", help=f"Model and training size: {PRESET_HELP}."),
    scene: str = typer.Option("default", help="Scene whose adapter to train."),
    workers: int = typer.Option(1, min=1, max=512, help="Ray Train workers (DDP)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker."),
    min_events: int = typer.Option(1000, min=1, help="Events in the feature tables before the first adapter is trained."),
    status_file: Optional[Path] = typer.Option(None, help="Write the loop's state here as JSON (streamrec up reads it)."),
) -> None:
    """Train continuously: the feature job, then an incremental run from the live adapter whenever the
    schedule is due, published through the gate. This is the trainer `streamrec up` runs; Ctrl-C stops
    (a run in progress is abandoned: nothing half-published is ever visible)."""
    setup_logging()
    from streaming.ray_runtime import run_as_batch_work
    from training.continuous_trainer import ContinuousTrainer
    from training.registry import validate_name

    run_as_batch_work()  # the trainer's own evaluation and embedding yield the CPU to serving and ingest

    schedule = schedule_or_exit(every)
    chosen = preset_or_exit(preset)
    settings = with_stack(settings_or_exit())
    training_guard(lambda: validate_name(scene, "scene"))
    if gpu:
        _check_gpus(settings.ray_address or os.environ.get("RAY_ADDRESS"), workers)
    from streaming.redis_io import check_redis, make_redis

    training_guard(lambda: check_redis(settings))
    trainer = ContinuousTrainer(settings, schedule=schedule, preset=chosen, scene=scene, workers=workers,
                                use_gpu=gpu, min_events=min_events, status_path=status_file,
                                redis_client=make_redis(settings))
    from streaming.ray_runtime import ensure_ray

    # Ray's own SIGTERM handler (installed by ray.init) would end the process without our cleanup,
    # so Ray is started first and our handlers installed after it.
    ensure_ray(settings.ray_address)
    with stop_on_signals() as stop:
        # The loop runs on a worker thread and stops between checks; a run in progress is abandoned
        # rather than waited for (it may take an hour): the process exits and takes it along, and
        # publishing is atomic, so nothing half-done is visible.
        abandoned, _ = training_guard(lambda: run_until_stopped(
            lambda: trainer.run(stop), stop, abandon=lambda: trainer.status.state == "training"))
        if abandoned:
            typer.echo("stopped during a training run: nothing was published by it", err=True)
        st = trainer.status
        typer.echo(f"trainer stopped after {st.runs} run(s), {st.published} published; live: {st.live_version}")


# Users `streamrec eval` reads from the feature tables by default: the training run's default sample
# (training/corpus.py DEFAULT_MAX_USERS), so an evaluation sees the users a training run trains on.
DEFAULT_EVAL_MAX_USERS = 100_000


def evaluate(
    dataset: Optional[str] = typer.Option(None, help="Dataset spec (ml-100k, synthetic:..., a MovieLens dir); "
                                          "default: the live feature tables."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs of the trained models (fine-tuned, sasrec_id)."),
    workers: int = typer.Option(1, min=1, max=512, help="Ray Train workers."),
    gpu: bool = typer.Option(False, "--gpu", help="Train on GPUs."),
    cold_share: float = typer.Option(0.2, min=0.01, max=0.9, help="Share of items held out for the cold-start protocol."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results JSON here."),
    max_users: int = typer.Option(DEFAULT_EVAL_MAX_USERS, min=0, help="Users read from the feature tables: the "
                                  "same deterministic sample by hash of user id that `streamrec train` reads "
                                  "(0 = all; ignored with --dataset)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The evaluation table: fine-tuned LM, zero-shot LM, SASRec (IDs), ItemKNN, popular; test + cold start."""
    setup_logging()
    from training.eval_harness import run_harness

    settings = settings_or_exit()

    def go():
        from training.corpus import Corpus

        if dataset:
            from streaming.datasets import load_dataset

            corpus = Corpus.from_dataset(load_dataset(dataset, settings.datasets_dir), source=dataset)
        else:
            from training.corpus import load_corpus

            # A sample, read bucket by bucket (training/corpus.py): at 10^6 users the whole tables in
            # the driver cost gigabytes for an evaluation that needs a fraction of them.
            corpus = load_corpus(settings, max_users=max_users)
        return run_harness(corpus, settings=settings, epochs=epochs, workers=workers, use_gpu=gpu,
                           cold_share=cold_share, progress=progress)

    report = training_guard(go)
    typer.echo(report.markdown)
    typer.echo(f"written: {', '.join(str(p) for p in report.paths.values())}")
    if json_out:
        import shutil

        shutil.copyfile(report.paths["json"], json_out)


__all__ = ["evaluate", "train", "train_loop"]
