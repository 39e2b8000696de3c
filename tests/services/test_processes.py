"""services.processes with small real child processes (python -c ...) and real sockets."""

from __future__ import annotations

import socket
import sys
import time

import psutil
import pytest

from services.processes import (
    CHILDREN,
    exited,
    find_process,
    free_port,
    kill_spawned,
    log_tail,
    port_open,
    spawn,
    terminate,
)

PY = sys.executable


def _until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_spawn_logs_to_a_file_keeps_the_previous_log_and_kill_spawned_reaps(tmp_path):
    log_path = tmp_path / "part.log"
    first = spawn([PY, "-c", "print('first run')"], log_path)
    first.wait(10)
    kill_spawned(first)
    proc = spawn([PY, "-c", "import time; print('second run', flush=True); time.sleep(600)"], log_path)
    try:
        assert proc.pid in CHILDREN
        _until(lambda: "second run" in log_path.read_text())
        assert "first run" in (tmp_path / "part.log.1").read_text()
    finally:
        kill_spawned(proc, timeout_s=5)
    assert proc.returncode is not None and proc.pid not in CHILDREN


def test_a_process_is_its_pid_and_creation_time(tmp_path):
    proc = spawn([PY, "-c", "import time; time.sleep(600)"], tmp_path / "p.log")
    created = psutil.Process(proc.pid).create_time()
    try:
        assert find_process(proc.pid, created).pid == proc.pid
        assert find_process(proc.pid, created - 100) is None  # same pid, another process: dead to us
        assert find_process(proc.pid, None) is None and find_process(None, created) is None
    finally:
        kill_spawned(proc)
    assert find_process(proc.pid, created) is None


def test_terminate_escalates_to_sigkill_for_a_process_that_ignores_sigterm(tmp_path):
    stubborn = spawn([PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('ready', flush=True); time.sleep(600)"], tmp_path / "s.log")
    _until(lambda: "ready" in (tmp_path / "s.log").read_text())
    proc = psutil.Process(stubborn.pid)
    t0 = time.monotonic()
    terminate(proc, timeout_s=0.3)
    assert exited(proc) and time.monotonic() - t0 < 10
    kill_spawned(stubborn)


def test_free_port_prefers_the_given_port_and_port_open_probes_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert port_open(taken)
        other = free_port(taken)
        assert other != taken and other > 0
    assert free_port(taken) == taken  # free again once the listener is gone
    assert not port_open(taken, timeout_s=0.5)


@pytest.mark.parametrize("lines", [1, 3])
def test_log_tail_quotes_the_last_lines_without_colours(tmp_path, lines):
    log_path = tmp_path / "x.log"
    log_path.write_text("one\n\x1b[31mtwo\x1b[0m\n\nthree\n")
    tail = log_tail(log_path, lines=lines).splitlines()
    assert tail == ["    one", "    two", "    three"][-lines:]
    assert log_tail(tmp_path / "missing.log") == "(no log)"
