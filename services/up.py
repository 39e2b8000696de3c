"""`streamrec up`: the whole loop on one machine, as supervised child processes.

    streamrec up                                # embedded broker + Redis + local Ray; Ctrl-C stops
    streamrec up --train-every 5000events --preset quick --port 8001

Parts, started in this order and stopped in the reverse one (`services.supervisor`); the others
start once the Ray head answers, with its final address (`services.ray_head` says why):

| part      | command                                   | when                                      |
|-----------|-------------------------------------------|-------------------------------------------|
| `ray`     | `ray start --head --block` on 127.0.0.1   | only when `RAY_ADDRESS` is unset          |
| `ingest`  | `streamrec ingest` (+ its periodic features) | always                                 |
| `trainer` | `streamrec train-loop --every ...`        | unless `--no-train`                       |
| `serve`   | `streamrec serve --port ...`              | once the registry holds an adapter        |

`serve` counts as ready -- and the "streamrec is up" banner appears -- once `GET /readyz` answers
200 with the scene in it (`ApiClient.ready`): the API can answer, not merely runs.

Every part gets the same settings through its environment (`settings_env`), with the embedded
stack's addresses and the Ray head's address filled in, so all of them talk to one broker, one
Redis and one Ray cluster. A part that exits is restarted with back-off; one that keeps failing
is reported with its exit code and the tail of its log, and `up` then stops everything and exits 1
(it never hangs silently). SIGINT / SIGTERM stop the parts last-first: the Serve app is deleted,
the trainer abandons a run in progress (publishing is atomic, so nothing half-done is visible),
the consumer commits what it wrote, the Ray head drains; the embedded stack is stopped too if this
command started it (`--keep-stack` leaves it running; a stack that was already running, even in
part, is left as it was). Logs: `<data dir>/up/logs/<part>.log`.

The embedded broker keeps its topics in memory, so one started afresh over a data directory whose
Redis holds applied offsets (from an earlier broker) would hand out the same offsets again, and the
idempotent writers would skip those events as already applied. `up` refuses that case with a clear
message; `--fresh` moves the old log, features, registry and runs to `<data dir>/archive/<time>/`
(never deleting them) and clears the Redis keys of the prefix. Watermarks recorded against another
cluster id or topic id (an external broker replaced, a topic recreated) are refused the same way, by
the guard `streamrec ingest` runs too (`streaming.broker_identity`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.api_client import ApiClient, ApiError
from services.processes import HOST, free_port
from services.ray_head import CPUS_MIN, RayHead, RayHeadError
from services.stack import StackError, stack_status, start_stack, stop_stack
from services.supervisor import Part, PartState, Supervisor
from streaming.settings import Settings, settings_env
from training.continuous_trainer import read_status

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5  # supervisor poll / status refresh
STATUS_EVERY_S = 30.0  # a status line at least this often, even when nothing changed
STATUS_MIN_INTERVAL_S = 2.0  # and at most this often
STATUS_REDIS_TIMEOUT_S = 1.0  # the status line's Redis read gives up quickly: it retries next time
STALE_CHECK_TIMEOUT_S = 5.0
READY_PROBE_TIMEOUT_S = 2.0  # one GET /readyz of the serve part's readiness wait
UP_DIRNAME = "up"
TRAINER_STATUS_FILE = "trainer.json"
PART_ORDER = ("ray", "ingest", "trainer", "serve")


class UpError(RuntimeError):
    """Something `up` cannot start with; the message says what to change."""


@dataclass(frozen=True)
class UpOptions:
    host: str = "127.0.0.1"
    port: int | None = None  # None: settings.serve_port
    replicas: int = 1
    train: bool = True
    train_every: str = "10m"
    preset: str = "default"
    scene: str = "default"
    workers: int = 1
    gpu: bool = False
    min_events: int = 1000
    keep_stack: bool = False
    fresh: bool = False
    ray_cpus: int | None = None


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def _applied_offsets(settings: Settings, timeout_s: float) -> int:
    """Offsets of the events topic the online store has applied (OnlineStore.applied_offsets)."""
    from streaming.online_store import OnlineStore
    from streaming.redis_io import make_redis

    client = make_redis(settings, socket_timeout=timeout_s)
    try:
        return OnlineStore(client, settings.redis_prefix).applied_offsets(settings.events_topic)
    finally:
        client.close()


def archive_state(settings: Settings) -> Path:
    """--fresh: move the offline log, features, registry and runs aside (never deleted) and remove
    the Redis keys of `settings.redis_prefix`. Returns the archive directory."""
    from streaming.forget import FORGET_DIR
    from streaming.redis_io import make_redis

    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = settings.data_dir / "archive" / stamp
    for path in (settings.log_dir, settings.features_dir, settings.runs_dir, settings.data_dir / "registry"):
        if Path(path).exists():
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest / Path(path).name)
    # Forget tombstones stay: a user forgotten before the fresh start stays forgotten after it.
    archived_tombstones = dest / Path(settings.log_dir).name / FORGET_DIR
    if archived_tombstones.is_dir():
        Path(settings.log_dir).mkdir(parents=True, exist_ok=True)
        shutil.copytree(archived_tombstones, Path(settings.log_dir) / FORGET_DIR)
    client = make_redis(settings)
    try:
        batch = []
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()
    return dest


class Up:
    """Start, watch and stop the parts; `run()` is the command, the methods are its steps."""

    def __init__(self, settings: Settings, opts: UpOptions, echo: Callable[[str], None] = print) -> None:
        data_dir = Path(settings.data_dir).expanduser().resolve()  # the parts run with another cwd
        self.settings = settings.model_copy(update={"data_dir": data_dir})
        self.opts, self.echo = opts, echo
        self.port = opts.port or settings.serve_port
        self.dir = data_dir / UP_DIRNAME
        self.status_path = self.dir / TRAINER_STATUS_FILE
        self.started_stack = False
        self.shared_stack = False
        self.sup: Supervisor | None = None
        self.ray_head: RayHead | None = None
        self.env: dict[str, str] = {}
        self.ready_announced = False
        self._last_line, self._last_line_t = "", 0.0
        self._reported_failures: set[str] = set()
        self._stopped = False

    # --- start ------------------------------------------------------------------------------
    def start(self, stop: threading.Event | None = None) -> None:
        """Start everything; returns early, with only what was started so far, once `stop` is set."""
        s = self.settings
        if free_port(self.port, self.opts.host) != self.port:
            raise UpError(f"port {self.port} is in use: pass --port or set STREAMREC_SERVE_PORT")
        if s.ingest_metrics_port:  # held by another ingest on this machine (another `up`, a test): take a free one
            from streaming.ingest_metrics import METRICS_BIND_HOST

            s = s.model_copy(update={"ingest_metrics_port": free_port(s.ingest_metrics_port, METRICS_BIND_HOST)})
        need_kafka, need_redis = s.kafka_bootstrap_servers is None, s.redis_url is None
        fresh_broker = False
        if need_kafka or need_redis:
            before = stack_status(s.data_dir)
            fresh_broker = need_kafka and (before is None or before.kafka_bootstrap is None)
            try:
                info = start_stack(s.data_dir, kafka=need_kafka, redis=need_redis)
            except StackError as exc:
                raise UpError(str(exc)) from None
            self.started_stack = before is None and not self.opts.keep_stack
            # part of the stack ran before us (e.g. its Redis, for another command): it all stays up
            self.shared_stack = before is not None
            s = s.model_copy(update={k: v for k, v in {
                "kafka_bootstrap_servers": info.kafka_bootstrap if need_kafka else None,
                "redis_url": info.redis_url if need_redis else None}.items() if v is not None})
        if self.opts.fresh:
            dest = archive_state(s)
            self.echo(f"--fresh: earlier log, features, registry and runs moved to {dest}; Redis keys "
                      f"{s.redis_prefix}* removed")
        elif fresh_broker and _applied_offsets(s, STALE_CHECK_TIMEOUT_S) > 0:
            raise UpError(
                f"{s.data_dir} holds ingestion state (applied offsets) from an embedded broker that is no longer "
                "running: its topics lived in memory and are gone, and new events would reuse its offsets and be "
                "skipped as already applied. Run `streamrec up --fresh` (moves the old log, features and "
                f"adapters to {s.data_dir / 'archive'}), or use another STREAMREC_DATA_DIR; `--keep-stack` keeps "
                "the broker running between runs")
        from streaming.kafka_io import ensure_topics

        ensure_topics(s)
        from streaming.broker_identity import UP_FIX, BrokerMismatch, guard_broker_identity

        try:  # the guard of `streamrec ingest`, before any part starts: watermarks of another broker or topic
            guard_broker_identity(s, fix=UP_FIX)
        except BrokerMismatch as exc:
            raise UpError(str(exc)) from None
        self.sup = Supervisor([], self.dir / "logs")
        self.echo(f"streamrec up: data in {s.data_dir}; publish events to Kafka topic {s.events_topic!r} and the "
                  f"catalog to {s.items_topic!r} at {s.kafka_bootstrap_servers}; logs in {self.dir / 'logs'}"
                  + (f"; ingest metrics on port {s.ingest_metrics_port}" if s.ingest_metrics_port else ""))
        ray_address = s.ray_address
        auth: dict[str, str] = {}
        if not ray_address:  # our own head: token authentication with a token of this run, known only to its parts
            auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
            cpus = self.opts.ray_cpus or max(CPUS_MIN, os.cpu_count() or 1)
            # nothing is left to drain once the parts above it have stopped (they stop first)
            self.ray_head = RayHead(self.sup, lambda address: {**self._env(s, address, auth),
                                                               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                                    cpus=cpus, gpu=self.opts.gpu)
            try:
                ray_address = self.ray_head.start(stop)
            except RayHeadError as exc:
                raise UpError(str(exc)) from None
            if ray_address is None:  # asked to stop while the head was starting
                return
        self.settings = s = s.model_copy(update={"ray_address": ray_address, "serve_port": self.port})
        self.env = self._env(s, ray_address, auth)
        self.status_path.unlink(missing_ok=True)
        self.sup.add(Part("ingest", _cli("ingest", "--no-progress"), env=self.env))
        if self.opts.train:
            argv = _cli("train-loop", "--every", self.opts.train_every, "--preset", self.opts.preset,
                        "--scene", self.opts.scene, "--workers", str(self.opts.workers),
                        "--min-events", str(self.opts.min_events), "--status-file", str(self.status_path))
            self.sup.add(Part("trainer", argv + (["--gpu"] if self.opts.gpu else []), env=self.env))

    def _env(self, s: Settings, ray_address: str, auth: dict[str, str]) -> dict[str, str]:
        """The whole environment of a part: these settings, this Ray cluster, no network at run time."""
        s = s.model_copy(update={"ray_address": ray_address, "serve_port": self.port})
        return {**os.environ, **settings_env(s), "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **auth}

    def _serve_part(self) -> Part:
        api = ApiClient(f"http://{_probe_host(self.opts.host)}:{self.port}", timeout_s=READY_PROBE_TIMEOUT_S)
        return Part("serve", _cli("serve", "--port", str(self.port), "--host", self.opts.host,
                                  "--replicas", str(self.opts.replicas)), env=self.env,
                    ready=lambda: _ready(api, self.opts.scene))

    # --- watch ------------------------------------------------------------------------------
    def poll(self) -> None:
        sup = self.sup
        sup.poll()
        if "serve" not in sup.parts and self._live_version() is not None:
            sup.add(self._serve_part())
        serve = sup.parts.get("serve")
        if serve is not None and serve.state == "ready" and not self.ready_announced:
            self.ready_announced = True
            self.echo(self.banner())
        self._show_status()


    def banner(self) -> str:
        s, h = self.settings, _probe_host(self.opts.host)
        return "\n".join([
            "streamrec is up:",
            f"  API      http://{h}:{self.port}/v1/recommendations?user_id=<user>&k=10",
            f"  docs     http://{h}:{self.port}/docs     models: http://{h}:{self.port}/v1/models",
            f"  publish  events -> topic {s.events_topic!r}, catalog -> topic {s.items_topic!r} "
            f"at {s.kafka_bootstrap_servers}",
            f"  data     {s.data_dir}   (Ctrl-C stops everything)",
        ])

    def failed(self) -> list[PartState]:
        return self.sup.failed() if self.sup else []

    def status_line(self) -> str:
        bits = []
        for name in PART_ORDER:
            st = self.sup.parts.get(name) if self.sup else None
            if st is None:
                if name == "serve":
                    bits.append("serve: waiting for the first adapter")
                continue
            text = f"{name}: {st.state}"
            if name == "ingest":
                n = self._ingested()
                if n is not None:
                    text += f" ({n:,} event offsets applied)"
            elif name == "trainer":
                t = read_status(self.status_path)
                if t:
                    text += f" ({t['state']}: {t['detail']})" if st.state in ("ready", "starting") else ""
            elif name == "serve" and st.state == "ready":
                live = self._live_version()
                text += f" ({self.opts.scene}@{live})" if live else ""
            if st.restarts and st.state != "failed":
                text += f" [{len(st.restarts)} restart(s)]"
            bits.append(text)
        return " | ".join(bits)

    def _ingested(self) -> int | None:
        with contextlib.suppress(Exception):
            return _applied_offsets(self.settings, STATUS_REDIS_TIMEOUT_S)
        return None

    def _live_version(self) -> str | None:
        from training.registry import Registry

        with contextlib.suppress(Exception):
            cur = Registry(self.settings.registry_uri).current(self.opts.scene)
            return cur.version if cur else None
        return None

    def _show_status(self) -> None:
        for st in self.failed():
            if st.part.name not in self._reported_failures:
                self._reported_failures.add(st.part.name)
                self.echo(f"{st.part.name} FAILED: {st.reason}")
        now = time.monotonic()
        if now - self._last_line_t < STATUS_MIN_INTERVAL_S:
            return
        line = self.status_line()
        if line != self._last_line or now - self._last_line_t >= STATUS_EVERY_S:
            self.echo(line)
            self._last_line, self._last_line_t = line, now

    # --- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.sup is not None:
            self.echo("stopping: " + ", ".join(reversed(list(self.sup.parts))))
            self.sup.stop()
            self.sup.poll()
            if self.ray_head is not None:
                self.ray_head.forget()
        if self.started_stack:
            stop_stack(self.settings.data_dir)
            self.echo("embedded broker and Redis stopped (the broker's topics were in memory; use --keep-stack "
                      "to keep them between runs)")
        elif self.shared_stack:
            self.echo(f"the embedded stack of {self.settings.data_dir} was running before `up` and is left running "
                      "(`streamrec stack stop` stops it)")

    def run(self, stop: threading.Event) -> int:
        """The command: start, poll until `stop` or a part fails for good, stop. Returns the exit code."""
        try:
            self.start(stop)
            while not stop.is_set():
                self.poll()
                if self.failed():
                    self.echo("a part failed for good (reason above); stopping everything")
                    return 1
                stop.wait(POLL_INTERVAL_S)
            return 0
        finally:
            self.stop()


def _ready(api: ApiClient, scene: str) -> bool:
    """The serve part is ready (and the banner says the API is up) once `GET /readyz` says the API can
    answer: every live scene loaded or on a declared fallback, `scene` among them. Alive is not enough:
    a replica still loading its first adapter answers 503."""
    try:
        return api.ready(scene)
    except ApiError:
        return False


def _probe_host(host: str) -> str:
    return HOST if host in ("0.0.0.0", "::", "") else host


__all__ = ["PART_ORDER", "Up", "UpError", "UpOptions", "archive_state"]
