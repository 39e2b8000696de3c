"""services.ray_head: the retry of the local Ray head on fresh ports, with a stand-in `ray` script
that behaves as `ray start --head --block` does: it binds the GCS port it is given (failing with
"Address already in use" when that port is taken), says "Ray runtime started." and blocks."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from services import ray_head
from services.ray_head import PORT_FLAGS, RayHead, RayHeadError, head_argv
from services.supervisor import Supervisor

FAKE_RAY = """#!{python}
import os, socket, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
counter = os.environ["FAKE_RAY_COUNTER"]
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
plan = os.environ["FAKE_RAY_PLAN"].split(",")[n]
if plan == "fail":
    print("boom: the raylet could not find its session directory", flush=True)
    sys.exit(2)
if plan == "hang":
    time.sleep(600)
gcs = socket.socket()
gcs.bind(("127.0.0.1", port))  # raises OSError: [Errno 98] Address already in use when taken
gcs.listen()
print("Ray runtime started.", flush=True)
time.sleep(600)
"""


@pytest.fixture
def fake_ray(tmp_path):
    path = tmp_path / "ray"
    path.write_text(FAKE_RAY.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _head(tmp_path: Path, fake_ray: str, plan: str, **kw) -> tuple[RayHead, Supervisor]:
    env = {**os.environ, "FAKE_RAY_PLAN": plan, "FAKE_RAY_COUNTER": str(tmp_path / "starts")}
    sup = Supervisor([], tmp_path / "logs")
    return RayHead(sup, lambda address: env, cpus=4, binary=fake_ray, **kw), sup


@pytest.fixture
def taken_port():
    """A port some other process holds (a listener), as when it was taken after being chosen."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _first_choice_is(port: int, monkeypatch) -> None:
    """The head's first port choice is `port` (a race lost in advance); later choices are fresh."""
    real = ray_head.free_port
    handed: list[int] = []

    def choose(preferred=None, host="127.0.0.1"):
        if preferred is None and not handed:
            handed.append(port)
            return port
        return real(preferred, host)

    monkeypatch.setattr(ray_head, "free_port", choose)


def test_head_argv_names_every_port_and_no_gpu_unless_asked():
    argv = head_argv("ray", [1, 2, 3, 4, 5, 6], cpus=4, gpu=False)
    for flag, port in zip(PORT_FLAGS, range(1, 7)):
        assert argv[argv.index(flag) + 1] == str(port)
    assert argv[-2:] == ["--num-gpus", "0"] and "--block" in argv and "127.0.0.1" in argv
    assert "--num-gpus" not in head_argv("ray", [1, 2, 3, 4, 5, 6], cpus=4, gpu=True)


def test_a_port_taken_before_ray_binds_it_is_retried_on_fresh_ports(tmp_path, fake_ray, taken_port, monkeypatch):
    _first_choice_is(taken_port, monkeypatch)
    head, sup = _head(tmp_path, fake_ray, "ok,ok")
    try:
        address = head.start()
        assert len(head.tried) == 2 and head.tried[0][0] == taken_port
        assert not set(head.tried[0]) & set(head.tried[1])  # every port chosen afresh
        assert address == f"127.0.0.1:{head.tried[1][0]}" and sup.parts["ray"].state == "ready"
        assert "Address already in use" in (tmp_path / "logs" / "ray.log.1").read_text()
    finally:
        sup.stop()


def test_a_start_that_hangs_with_a_port_taken_is_retried(tmp_path, fake_ray, taken_port, monkeypatch):
    # as a taken dashboard-agent port leaves the real `ray start` waiting: no message, only the port tells
    _first_choice_is(taken_port, monkeypatch)
    head, sup = _head(tmp_path, fake_ray, "hang,ok", timeout_s=2.0)
    try:
        assert head.start() == f"127.0.0.1:{head.tried[1][0]}"
    finally:
        sup.stop()


def test_another_failure_is_reported_at_once_with_its_log(tmp_path, fake_ray):
    head, sup = _head(tmp_path, fake_ray, "fail,ok")
    with pytest.raises(RayHeadError) as err:
        head.start()
    assert "boom: the raylet" in str(err.value) and "exit code 2" in str(err.value)
    assert len(head.tried) == 1 and "ray" not in sup.parts


def test_clashing_every_time_gives_up_after_the_attempts(tmp_path, fake_ray, monkeypatch):
    holders = []

    def always_taken(preferred=None, host="127.0.0.1"):
        if preferred is not None:  # the check after a failed start: still taken
            return preferred + 1
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        holders.append(sock)
        return sock.getsockname()[1]

    monkeypatch.setattr(ray_head, "free_port", always_taken)
    head, sup = _head(tmp_path, fake_ray, "ok,ok,ok", attempts=2)
    try:
        with pytest.raises(RayHeadError, match="in each of 2 starts"):
            head.start()
        assert len(head.tried) == 2 and "ray" not in sup.parts
    finally:
        for sock in holders:
            sock.close()


def test_a_stop_request_while_starting_returns_none_and_leaves_nothing(tmp_path, fake_ray):
    head, sup = _head(tmp_path, fake_ray, "hang")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert head.start(stop) is None
    assert "ray" not in sup.parts and head.address is None
