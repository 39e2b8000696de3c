"""Run several long-lived parts as child processes: restart the ones that die, report why, stop
them all cleanly. The base of `streamrec up` (ingest consumer, trainer loop, Serve app).

    sup = Supervisor([Part("ingest", ["streamrec", "ingest", "--no-progress"])], log_dir)
    sup.start()
    while running: sup.poll(); show(sup.status())
    sup.stop()          # SIGTERM in reverse start order, SIGKILL after STOP_TIMEOUT_S, then orphans

A part that exits is restarted after a growing back-off (`RESTART_BACKOFF_S`, doubling up to
`RESTART_BACKOFF_MAX_S`); after `MAX_RESTARTS` exits within `RESTART_WINDOW_S` it is marked
failed, with its exit code and the tail of its log as the reason -- it never hangs silently. A
part started with `restart=False` (a one-shot job) is done when it exits 0 and failed otherwise.
Each part runs in its own session with its output in `<log_dir>/<name>.log`; on stop, every
descendant seen while it ran (e.g. the Ray processes a part started) is stopped too, so nothing
is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from services.processes import ProcessError, exited, kill_spawned, log_tail, spawn, terminate

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
MAX_RESTARTS = 5  # exits within RESTART_WINDOW_S before a part is declared failed
RESTART_WINDOW_S = 300.0
STOP_TIMEOUT_S = 30.0  # SIGTERM -> SIGKILL: an ingest consumer flushes and commits in this time
ORPHAN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Part:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None  # the whole environment of the child (None: this one's)
    restart: bool = True
    ready: Callable[[], bool] | None = None  # probe; None: ready once started


@dataclass
class PartState:
    part: Part
    proc: object | None = None  # subprocess.Popen
    state: str = "pending"  # pending | starting | ready | restarting | done | failed | stopped
    restarts: list[float] = field(default_factory=list)  # monotonic times of unplanned exits
    next_start: float = 0.0
    reason: str | None = None
    descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return getattr(self.proc, "pid", None)


class Supervisor:
    def __init__(self, parts: list[Part], log_dir: Path, *, max_restarts: int = MAX_RESTARTS,
                 backoff_s: float = RESTART_BACKOFF_S, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"part names must be unique: {names}")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.parts = {p.name: PartState(p) for p in parts}
        self.max_restarts, self.backoff_s, self.stop_timeout_s = max_restarts, backoff_s, stop_timeout_s
        self.stopping = False

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self) -> None:
        for st in self.parts.values():
            self._spawn(st)

    def add(self, part: Part) -> None:
        """Start another part later (e.g. the Serve app once the first adapter exists)."""
        if part.name in self.parts:
            raise ValueError(f"part {part.name!r} exists")
        st = self.parts[part.name] = PartState(part)
        self._spawn(st)

    def _spawn(self, st: PartState) -> None:
        try:
            st.proc = spawn(st.part.argv, self.log_path(st.part.name), env=st.part.env)
        except ProcessError as exc:
            st.state, st.reason = "failed", str(exc)
            return
        st.state = "starting" if st.part.ready else "ready"

    def poll(self) -> None:
        """Notice exits (restart or fail them), readiness, and new descendants; call it often."""
        now = time.monotonic()
        for st in self.parts.values():
            if st.state in ("failed", "done", "stopped"):
                continue
            if st.state == "restarting":
                if now >= st.next_start and not self.stopping:
                    self._spawn(st)
                continue
            code = st.proc.poll()
            if code is None:
                self._track_descendants(st)
                if st.state == "starting" and st.part.ready is not None:
                    with contextlib.suppress(Exception):
                        if st.part.ready():
                            st.state = "ready"
                continue
            kill_spawned(st.proc)  # reaped already: this only forgets it in the table of children
            self._reap_descendants(st)
            if self.stopping:
                st.state = "stopped"
                continue
            if not st.part.restart:
                st.state = "done" if code == 0 else "failed"
                if code != 0:
                    st.reason = self._why(st, code)
                continue
            st.restarts = [t for t in st.restarts if now - t <= RESTART_WINDOW_S] + [now]
            st.reason = self._why(st, code)
            if len(st.restarts) > self.max_restarts:
                st.state = "failed"
                log.error("%s failed for good: %s", st.part.name, st.reason)
                continue
            delay = min(self.backoff_s * 2 ** (len(st.restarts) - 1), RESTART_BACKOFF_MAX_S)
            log.warning("%s exited (%s); restart %d in %.1f s", st.part.name, st.reason.splitlines()[0],
                        len(st.restarts), delay)
            st.state, st.next_start = "restarting", now + delay

    def _why(self, st: PartState, code: int) -> str:
        return f"exit code {code}; last lines of {self.log_path(st.part.name)}:\n{log_tail(self.log_path(st.part.name))}"

    def _track_descendants(self, st: PartState) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(st.pid).children(recursive=True):
                st.descendants.setdefault(child.pid, child)

    def _reap_descendants(self, st: PartState) -> None:
        """Stop what a part left running (processes it started that outlived it)."""
        for proc in st.descendants.values():
            with contextlib.suppress(psutil.Error, ProcessError):
                if not exited(proc):
                    terminate(proc, ORPHAN_TIMEOUT_S)
        st.descendants.clear()

    def status(self) -> list[PartState]:
        return list(self.parts.values())

    def failed(self) -> list[PartState]:
        return [st for st in self.parts.values() if st.state == "failed"]

    def stop(self) -> None:
        """SIGTERM each running part, last started first (consumers commit on SIGTERM), SIGKILL
        after the timeout, then any descendant still running."""
        self.stopping = True
        for st in reversed(list(self.parts.values())):
            self._stop_part(st)

    def remove(self, name: str) -> PartState:
        """Stop one part (and what it started) and forget it, e.g. a start that must be retried
        with other arguments."""
        st = self.parts.pop(name)
        self._stop_part(st)
        return st

    def _stop_part(self, st: PartState) -> None:
        if st.proc is not None:
            if st.proc.poll() is None:
                self._track_descendants(st)
            kill_spawned(st.proc, self.stop_timeout_s)
        self._reap_descendants(st)
        if st.state not in ("failed", "done"):
            st.state = "stopped"


def pid_alive(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return not exited(psutil.Process(pid))
    return False


__all__ = ["Part", "PartState", "Supervisor", "pid_alive"]
