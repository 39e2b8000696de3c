"""The local Ray head of `streamrec up`: `ray start --head --block` as a supervised part, on ports
chosen for it, started again on fresh ports when one of them was taken before Ray bound it.

Why retry rather than hold the ports: each port is chosen free and then bound seconds later by
one of Ray's own processes (the GCS, the dashboard agent, the metrics exporter), after `ray start`
has imported Ray and spawned them. A socket held open by `up` cannot cover that window -- Ray
binds its ports itself and cannot inherit ours -- and leaving the choice to Ray does not remove
it: its defaults are fixed numbers (6379, 8265, 10001, 52365) that a second head on the machine
would share, and the ports it picks itself are chosen the same way. Any other process may take a
port in that window (outgoing connections draw from the same ephemeral range). So a start that
fails is checked for a clash -- its log says the address is in use, or one of its ports is still
taken once its processes are gone -- and is then retried on fresh ports, `START_ATTEMPTS` times
at most; any other failure is reported at once. The other parts of `up` start only after the head
is up, with its final address.

A clash shows in three ways: the GCS exits at once ("Address already in use"), a taken metrics
port ends `ray start` after Ray's own node timeout, and a taken agent port leaves it waiting.
Hence readiness is `ray start`'s own "Ray runtime started." in its log with the GCS port
answering, within `START_TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from services.processes import HOST, free_port, log_tail, port_open
from services.supervisor import Part, Supervisor
from streaming.ray_runtime import RAY_WORKER_NICENESS_ENV

log = logging.getLogger(__name__)

PART_NAME = "ray"
START_ATTEMPTS = 3
"""Starts tried on fresh ports when a port was taken before Ray bound it."""
START_TIMEOUT_S = 180.0
"""Longest wait for one start to be up (a busy two-core machine needs tens of seconds)."""
POLL_S = 0.2
"""Interval between checks of a starting head."""
CPUS_MIN = 4
"""Logical CPUs of the local head: Serve + a Train worker + Ray Data actors must fit at once."""
STARTED_MARK = "Ray runtime started."
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port")  # --port (the GCS) first: the address
_CLASH = re.compile(r"address (already )?in use|already occupied|addrinuse", re.IGNORECASE)


class RayHeadError(RuntimeError):
    """The local Ray head did not start; the message says why and quotes its log."""


def ray_bin() -> str:
    """The `ray` script of this interpreter's environment (else the one on PATH)."""
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def head_argv(binary: str, ports: list[int], cpus: int, gpu: bool) -> list[str]:
    """`ray start --head --block` bound to 127.0.0.1 on `ports` (in `PORT_FLAGS` order)."""
    argv = [binary, "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard", "false",
            "--node-ip-address", HOST, "--num-cpus", str(cpus)]
    for flag, port in zip(PORT_FLAGS, ports, strict=True):
        argv += [flag, str(port)]
    return argv + ([] if gpu else ["--num-gpus", "0"])


def _says(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _fresh_ports() -> list[int]:
    ports: list[int] = []
    while len(ports) < len(PORT_FLAGS):
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class RayHead:
    """Starts the head as part `ray` of `sup`; `start()` returns its address once it is up.
    `env(address)` is the head's whole environment when it answers at `address`."""

    def __init__(self, sup: Supervisor, env: Callable[[str], dict[str, str]], *, cpus: int, gpu: bool = False,
                 binary: str | None = None, attempts: int = START_ATTEMPTS,
                 timeout_s: float = START_TIMEOUT_S) -> None:
        self.sup, self.env, self.cpus, self.gpu = sup, env, cpus, gpu
        self.binary = binary or ray_bin()
        self.attempts, self.timeout_s = attempts, timeout_s
        self.tried: list[list[int]] = []  # the ports of each start, first to last
        self.address: str | None = None

    def start(self, stop: threading.Event | None = None) -> str | None:
        """Start the head and wait until it is up; its address, or None when `stop` was set first.
        Raises RayHeadError when it fails for another reason than a taken port, or keeps finding
        its ports taken."""
        log_path = self.sup.log_path(PART_NAME)
        for attempt in range(1, self.attempts + 1):
            ports = _fresh_ports()
            self.tried.append(ports)
            gcs = ports[0]
            env = {**self.env(f"{HOST}:{gcs}"), **RAY_WORKER_NICENESS_ENV}  # Serve's workers at nice 0, not 15
            self.sup.add(Part(PART_NAME, head_argv(self.binary, ports, self.cpus, self.gpu), env=env,
                              ready=lambda gcs=gcs: _says(log_path, STARTED_MARK) and port_open(gcs)))
            why = self._wait(stop)
            if why is None:
                self.address = f"{HOST}:{gcs}"
                return self.address
            tail = log_tail(log_path)
            self.sup.remove(PART_NAME)  # its processes are gone after this: a port still taken is someone else's
            if why == "stopped":
                return None
            taken = [p for p in ports if free_port(p) != p]
            if not (_CLASH.search(tail) or taken):
                raise RayHeadError(f"the local Ray head did not start: {why}; last lines of {log_path}:\n{tail}")
            log.warning("the local Ray head did not start (%s; ports taken meanwhile: %s); attempt %d of %d "
                        "on fresh ports", why.splitlines()[0], taken or "its log says so", attempt, self.attempts)
        raise RayHeadError(f"the local Ray head found one of its ports taken in each of {self.attempts} starts "
                           f"(ports {self.tried}); last lines of {log_path}:\n{tail}")

    def _wait(self, stop: threading.Event | None) -> str | None:
        """None once the head is up; else why not ("stopped" when `stop` was set)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.sup.poll()
            st = self.sup.parts[PART_NAME]
            if st.state == "ready":
                return None
            if st.state != "starting":
                return st.reason.splitlines()[0] if st.reason else f"it is {st.state}"
            if time.monotonic() >= deadline:
                return f"not up within {self.timeout_s:.0f} s"
            if stop is None:
                time.sleep(POLL_S)
            elif stop.wait(POLL_S):
                return "stopped"

    def forget(self) -> None:
        """`ray start --head` records its address in /tmp/ray/ray_current_cluster, and a plain
        `ray.init()` anywhere on the machine follows that file -- to a head that is gone once it stops."""
        if not self.address:
            return
        port = self.address.rsplit(":", 1)[-1]
        path = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if path.read_text().strip().rsplit(":", 1)[-1] == port:
                path.unlink()


__all__ = ["CPUS_MIN", "PART_NAME", "PORT_FLAGS", "RayHead", "RayHeadError", "head_argv", "ray_bin"]
