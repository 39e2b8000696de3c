"""Child processes and local ports: the toolkit under the embedded stack (`services.stack`), the
supervisor of `streamrec up` (`services.supervisor`), the local Ray head (`services.ray_head`)
and the tests.

A process is named by its pid *and* its creation time, because pids get reused: a recorded pid
that now runs another program must never be signalled, and it means the recorded process is
dead. Dead is decided from the process table only (`find_process`): a process that is alive but
does not answer its probe in time is busy or hung, which is for the caller to judge -- never a
reason to treat it as gone.

Children are started detached (own session, no stdin, output in a log file), so they outlive a
terminal's Ctrl-C and are stopped on purpose (`terminate`: SIGTERM, then SIGKILL). `CHILDREN`
keeps the `Popen` objects of this interpreter's children until they are reaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 10.0
"""Longest wait for a process to exit after SIGTERM before it gets SIGKILL."""
KILL_TIMEOUT_S = 5.0
"""Longest wait for a process to disappear after SIGKILL."""
STOP_POLL_S = 0.02
"""Interval between checks whether a signalled process has exited."""
PROBE_TIMEOUT_S = 2.0
"""Network timeout of one connection probe."""
LOG_TAIL_LINES = 20
"""Lines of a log quoted in an error message."""
LOG_TAIL_BYTES = 64 * 1024
"""How far from the end of a log `log_tail` reads (a log may be large; its tail is what matters)."""
CREATE_TIME_TOLERANCE_S = 0.01
"""Two process creation times within this many seconds are the same process."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ProcessError(RuntimeError):
    """A process could not be started or stopped; the message says which and why."""


class ChildTable:
    """The `Popen` objects of the processes this interpreter spawned, by pid.

    Kept so that an exited child is reaped (no zombie lingers) and a running one is not
    garbage-collected with a "still running" warning. One table per interpreter (`CHILDREN`):
    pids are per machine, so two tables could disagree about who reaps a child.
    """

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs[proc.pid] = proc

    def discard(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)

    def reap(self, pid: int) -> bool:
        """True when `pid` is a child of ours that has exited; it is reaped and forgotten then."""
        with self._lock:
            child = self._procs.get(pid)
            if child is not None and child.poll() is not None:
                del self._procs[pid]
                return True
        return False

    def __contains__(self, pid: object) -> bool:
        with self._lock:
            return pid in self._procs

    def __len__(self) -> int:
        with self._lock:
            return len(self._procs)


CHILDREN = ChildTable()


# --- alive or dead ------------------------------------------------------------------------


def find_process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The running process with this pid and creation time, or None: dead, a zombie, or the pid
    now belongs to another process."""
    if not pid or create_time is None:
        return None
    if CHILDREN.reap(pid):
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def exited(proc: psutil.Process) -> bool:
    """True once `proc` has exited. A zombie counts: detached children are reaped by init, which
    may take its time; our own children are reaped here."""
    if CHILDREN.reap(proc.pid):
        return True
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_exited(proc: psutil.Process, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `proc` to exit; True if it did."""
    deadline = time.monotonic() + timeout_s
    while not exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(STOP_POLL_S)
    return True


def terminate(proc: psutil.Process, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns once the process has exited.
    Raises ProcessError when it survives SIGKILL for KILL_TIMEOUT_S."""
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process acts on SIGTERM only when resumed
    if wait_exited(proc, timeout_s):
        return
    log.warning("process %d did not exit %.0f s after SIGTERM; sending SIGKILL", proc.pid, timeout_s)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
    if not wait_exited(proc, KILL_TIMEOUT_S):
        raise ProcessError(f"process {proc.pid} survived SIGKILL for {KILL_TIMEOUT_S:.0f} s")


# --- children -----------------------------------------------------------------------------


def _rotate(path: Path) -> None:
    """Keep the previous run's log as `<name>.1` so a crash stays inspectable after a restart."""
    if path.exists():
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".1"))


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` detached from this command: own session, no stdin, stdout and stderr to
    `log_path` (the previous one kept as `<log>.1`), working directory the log's. `env` is the
    child's whole environment (None: this process's). Raises ProcessError when it cannot run."""
    _rotate(log_path)
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, env=env, cwd=str(log_path.parent),
            )
        except OSError as exc:
            raise ProcessError(f"cannot run {argv[0]!r}: {exc}") from exc
    CHILDREN.add(proc)
    return proc


def kill_spawned(proc: subprocess.Popen, timeout_s: float = KILL_TIMEOUT_S) -> None:
    """Stop (SIGTERM, SIGKILL after `timeout_s`) and reap a child from `spawn`, and forget it."""
    if proc.poll() is None:
        with contextlib.suppress(psutil.Error, ProcessError):
            terminate(psutil.Process(proc.pid), timeout_s=timeout_s)
    with contextlib.suppress(Exception):
        proc.wait(timeout=KILL_TIMEOUT_S)
    CHILDREN.discard(proc.pid)


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` has a listening TCP socket on `port` (None: the OS will not say)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, NotImplementedError):
        return None
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port for c in conns)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-blank `lines` of a log, indented and without colour codes, for an error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    tail = [_ANSI.sub("", ln).rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in tail) if tail else "(log is empty)"


# --- ports --------------------------------------------------------------------------------


def free_port(preferred: int | None = None, host: str = HOST) -> int:
    """A TCP port of `host` that can be bound now: `preferred` if it can, else one the OS picks.

    The check binds as servers do, with SO_REUSEADDR: a port whose earlier connections linger in
    TIME_WAIT is free to them, one with a listener is not. Free *now* only: whoever binds it
    later may find it taken and must be ready to retry."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ProcessError(f"no free TCP port on {host}")  # pragma: no cover - port 0 always binds


def port_open(port: int, host: str = HOST, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections on `host:port` (a connection probe)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


__all__ = [
    "CHILDREN", "HOST", "KILL_TIMEOUT_S", "PROBE_TIMEOUT_S", "STOP_TIMEOUT_S", "ChildTable", "ProcessError",
    "exited", "find_process", "free_port", "kill_spawned", "listens", "log_tail", "port_open", "spawn",
    "terminate", "wait_exited",
]
