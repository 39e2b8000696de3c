"""What the serving scenarios share: the real API (`streamrec serve` as a child process, on its own
local Ray, a synthetic adapter published to a private registry), its replicas' processes, and a
paced HTTP load whose every answer is recorded.

The adapter is untrained (tests/fixtures/synthetic_adapter.py): these scenarios measure whether
requests are answered, not how well. Redis is seeded with what serving reads (the catalog,
popularity and trending snapshots, a few users' recent items); half of the load are POSTs that
carry their own recent items, so the model path runs whatever the user keys look like."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from bench.chaos_scenarios.common import cli_env, log_tail, progress, spawn_cli, terminate, wait_for
from streaming.settings import Settings

API_KEY = "chaos-key"
N_ITEMS = 40  # the synthetic catalog: m0 .. m39
N_USERS = 50  # users with recent items (u0 .. u49)
HISTORY = 3  # recent items per user / per POST
K = 10
REPLICA_TITLE = "ServeReplica:"  # in a Serve replica's process title (`ray::ServeReplica:<app>:<deployment>`)
START_TIMEOUT_S = 420.0  # `streamrec serve` on a busy 2-core machine: Ray, the Serve actors, MiniLM per replica
PROBE_TIMEOUT_S = 2.0  # one /readyz or /healthz probe
REQUEST_TIMEOUT_S = 10.0  # one request of the load: longer counts as failed
STOP_TIMEOUT_S = 60.0  # `streamrec serve` deletes the app and stops its Ray on SIGTERM
ORPHAN_TIMEOUT_S = 15.0  # how long its Ray processes may take to follow it before they are killed
# `streamrec serve` started again when it exits before it is ready: its local Ray's raylet was seen to
# abort on a starved machine ("Timed out waiting for file .../metrics_agent_port"); the scenario is
# about a replica dying later, not about that
START_ATTEMPTS = 2


@dataclass(frozen=True)
class Answer:
    """One request of the load: when it was sent and answered (time.monotonic), HTTP status (0: no answer:
    connection error or timeout), the answer's `fallback` and number of items, the error text of an
    answer that is not a 200, and whether the request named a user (its history then comes from
    Redis) or carried its recent items."""

    sent: float
    status: int
    fallback: str | None = None
    error: str | None = None
    items: int = 0
    by_user: bool = True
    answered: float = 0.0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def serving_settings(settings: Settings, port: int) -> Settings:
    """`settings` (isolated: prefix, data dir) with an API key and the port the API binds."""
    return settings.model_copy(update={"api_keys": (API_KEY,), "serve_port": port})


def seed(settings: Settings) -> None:
    """Publish the synthetic adapter to `settings`' registry and put in Redis what serving reads."""
    from streaming.events import Item
    from streaming.online_store import OnlineStore, popular_key, trending_key
    from streaming.redis_io import make_redis
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter, synthetic_catalog
    from training.registry import Registry

    publish_synthetic_adapter(Registry(settings.registry_uri), settings.data_dir / "staging", n_items=N_ITEMS,
                              seed=1)
    ids, titles, texts = synthetic_catalog(N_ITEMS)
    r = make_redis(settings)
    try:
        store = OnlineStore(r, settings.redis_prefix, settings.recent_items_max)
        store.apply_items(settings.items_topic, 0, [
            (i, Item(item_id=item, title=title, text=texts[i], ts=1_700_000_000_000))
            for i, (item, title) in enumerate(zip(ids, titles))])
        r.zadd(popular_key(settings.redis_prefix), {item: float(N_ITEMS - i) for i, item in enumerate(ids)})
        r.zadd(trending_key(settings.redis_prefix), {item: float(i) for i, item in enumerate(ids)})
        for u in range(N_USERS):
            r.zadd(store.recent_key(f"u{u}"), {ids[(u + j) % N_ITEMS]: 1000 + j for j in range(HISTORY)})
    finally:
        r.close()


def replica_processes(root_pid: int) -> list[psutil.Process]:
    """The Serve replicas' worker processes under `root_pid` (`streamrec serve` started Ray, so its
    raylet and that raylet's workers are its descendants), found by their process title."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in children:
        try:
            if REPLICA_TITLE in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class ServeExited(RuntimeError):
    """`streamrec serve` ended before it was ready."""


class ServedApi:
    """`streamrec serve --replicas N` over a seeded registry and Redis, ready once `/readyz` says so
    and every replica answered `/healthz` through the proxy (Serve routes to RUNNING replicas only)."""

    def __init__(self, settings: Settings, workdir: Path, replicas: int = 1) -> None:
        from services.processes import free_port

        self.settings = serving_settings(settings, free_port())
        self.workdir, self.replicas = workdir, replicas
        self.base = f"http://127.0.0.1:{self.settings.serve_port}"
        self.proc = None
        self.replica_ids: set[str] = set()  # every replica id seen answering
        self._probe = requests.Session()
        self._ray: list[psutil.Process] = []

    def __enter__(self) -> "ServedApi":
        from services.processes import free_port

        seed(self.settings)
        for attempt in range(1, START_ATTEMPTS + 1):
            self._spawn(self.workdir / ("serve.log" if attempt == 1 else f"serve-{attempt}.log"))
            try:
                wait_for(self._ready, START_TIMEOUT_S, f"`streamrec serve --replicas {self.replicas}` to be ready")
                break
            except ServeExited as exc:  # its local Ray did not come up (seen on a starved machine): once more
                self.__exit__(None, None, None)
                if attempt == START_ATTEMPTS:
                    raise
                progress(f"{exc}; starting it again")
                self.settings = self.settings.model_copy(update={"serve_port": free_port()})
                self.base = f"http://127.0.0.1:{self.settings.serve_port}"
                self._probe = requests.Session()
                self.replica_ids.clear()
            except BaseException:
                self.__exit__(None, None, None)
                raise
        self._ray = self._descendants()
        progress(f"API up at {self.base}: replicas {sorted(self.replica_ids)}")
        return self

    def _spawn(self, log_path: Path) -> None:
        # Its own local Ray (not a cluster this process knows of), offline like `up`'s parts.
        env = {k: v for k, v in cli_env(self.settings, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                                        RAY_USAGE_STATS_ENABLED="0").items()
               if k not in ("RAY_ADDRESS", "STREAMREC_RAY_ADDRESS")}
        self.proc = spawn_cli(self.settings, log_path, "serve", "--port",
                              str(self.settings.serve_port), "--replicas", str(self.replicas), env=env)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ServeExited(f"`streamrec serve` exited {self.proc.returncode}: {log_tail(self.proc.log_path)}")
        try:
            if self._probe.get(f"{self.base}/readyz", timeout=PROBE_TIMEOUT_S).status_code != 200:
                return False
        except requests.RequestException:
            return False
        self.probe_replica()
        return len(self.replica_ids) >= self.replicas and len(self.processes()) == self.replicas

    def probe_replica(self) -> str | None:
        """The replica that answered one `GET /healthz` through the proxy (None: no 200 answer)."""
        try:
            resp = self._probe.get(f"{self.base}/healthz", timeout=PROBE_TIMEOUT_S)
            if resp.status_code != 200:
                return None
            rid = resp.json()["replica"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        self.replica_ids.add(rid)
        return rid

    def processes(self) -> list[psutil.Process]:
        return replica_processes(self.proc.pid)

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def __exit__(self, *exc) -> None:
        self._probe.close()
        if self.proc is None:
            return
        # those seen when it was ready and those of now (a replacement replica started since)
        ray_procs = list({p.pid: p for p in self._ray + self._descendants()}.values())
        code = terminate(self.proc, STOP_TIMEOUT_S)
        if code not in (0, -15):
            progress(f"`streamrec serve` exited {code}: {log_tail(self.proc.log_path, 600)}")
        _, alive = psutil.wait_procs(ray_procs, timeout=ORPHAN_TIMEOUT_S)
        for p in alive:  # a Ray worker that did not follow its driver: not ours to leave behind
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


class Load:
    """`clients` threads sending requests at `rate`/s in all, each answer recorded (`answers`).

    Even requests: GET /v1/recommendations for a seeded user; odd ones: POST with the recent items
    in the body. One connection per thread, reused (a client of an API keeps its connections)."""

    def __init__(self, base: str, rate: float, clients: int = 4) -> None:
        self.base, self.rate, self.clients = base, rate, clients
        self.answers: list[Answer] = []  # appended from the threads (list.append is atomic)
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self.started = self.stopped = 0.0

    def start(self) -> "Load":
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Answer]:
        self._halt.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 5)
        self.stopped = time.monotonic()
        return list(self.answers)

    def measured_rate(self) -> float:
        return len(self.answers) / max((self.stopped or time.monotonic()) - self.started, 1e-9)

    def since(self, t: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.sent >= t]

    def _run(self, worker: int) -> None:
        from streaming.producer import Pacer

        session = requests.Session()
        session.headers["X-API-Key"] = API_KEY
        pacer = Pacer(self.rate / self.clients)
        n = 0
        while not self._halt.is_set():
            pacer.wait()
            i = n * self.clients + worker
            n += 1
            user = i % N_USERS
            sent = time.monotonic()
            by_user = i % 2 == 0
            try:
                if by_user:
                    resp = session.get(f"{self.base}/v1/recommendations", params={"user_id": f"u{user}", "k": K},
                                       timeout=REQUEST_TIMEOUT_S)
                else:
                    recent = [f"m{(user + j) % N_ITEMS}" for j in range(HISTORY)]
                    resp = session.post(f"{self.base}/v1/recommendations", json={"recent_items": recent, "k": K},
                                        timeout=REQUEST_TIMEOUT_S)
                if resp.status_code == 200:
                    body = resp.json()
                    answer = Answer(sent, 200, body.get("fallback"), items=len(body.get("items") or ()),
                                    by_user=by_user, answered=time.monotonic())
                else:
                    answer = Answer(sent, resp.status_code, error=resp.text[:200], by_user=by_user,
                                    answered=time.monotonic())
            except (requests.RequestException, ValueError) as exc:
                answer = Answer(sent, 0, None, f"{type(exc).__name__}: {exc}"[:200], by_user=by_user,
                                answered=time.monotonic())
            self.answers.append(answer)
        session.close()


def failures(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if not a.ok]


def describe_failures(answers: list[Answer], limit: int = 3) -> str:
    """'N failed: <status> <error>, ...' for the first `limit` failures (empty when none)."""
    bad = failures(answers)
    if not bad:
        return ""
    kinds: dict[str, int] = {}
    for a in bad:
        key = f"{a.status or 'no answer'}: {(a.error or '')[:120]}"
        kinds[key] = kinds.get(key, 0) + 1
    return f"{len(bad)} failed: " + "; ".join(f"{n} x {k}" for k, n in list(kinds.items())[:limit])
