"""What every chaos scenario shares: its result row, condition waits and isolated settings on a stack
(those of the streaming tests, tests/streaming/helpers.py), a paced event feeder, `streamrec` child
processes (the real CLI, so a SIGKILL hits what runs in production), and the log + feature version
the feature-job scenarios start from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from streaming.events import EVENT_LOG_SCHEMA
from streaming.offline_log import OfflineLog, read_table
from streaming.producer import EventProducer, Pacer
from streaming.redis_io import make_redis
from streaming.settings import Settings, settings_env
# the streaming tests' condition wait and isolated settings, for the scenarios (imported from here)
from tests.streaming.helpers import isolated_settings_at as isolated_settings  # noqa: F401
from tests.streaming.helpers import wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
N_USERS = 300  # users / items of the generated traffic: enough keys to spread over every partition
N_ITEMS = 200
BASE_TS_MS = 1_700_000_000_000  # event time of the first generated event


@dataclass
class ScenarioResult:
    """One row of the chaos table (the JSON's keys are the issue's), plus what went wrong.

    `problems` lists every property of the scenario that did not hold, in words; empty = passed."""

    name: str
    requests: int = 0
    failed: int = 0
    events: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["recovery_s"] = round(self.recovery_s, 2)
        return row


def progress(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def event(tag: str, i: int) -> dict[str, Any]:
    """The `i`-th generated event of a run: unique id, users and items spread over the partitions."""
    return {"event_id": f"{tag}-{i}", "user_id": f"u{(i * 7919) % N_USERS}", "item_id": f"i{(i * 104729) % N_ITEMS}",
            "type": "click", "ts": BASE_TS_MS + i}


class Feeder(threading.Thread):
    """Produces generated events at `rate`/s until `stop()` (or `limit`); `sent` is what was sent."""

    def __init__(self, settings: Settings, rate: float, tag: str, limit: int | None = None):
        super().__init__(daemon=True)
        self.settings, self.rate, self.tag, self.limit = settings, rate, tag, limit
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with EventProducer(self.settings, validate=False) as producer:
                pacer = Pacer(self.rate)
                while not self._halt.is_set() and (self.limit is None or self.sent < self.limit):
                    pacer.wait()
                    producer.send_event(event(self.tag, self.sent))
                    self.sent += 1
                producer.flush()
        except BaseException as exc:  # reported by stop(): the scenario then fails, naming it
            self.error = exc

    def stop(self) -> int:
        self._halt.set()
        self.join()
        if self.error is not None:
            raise RuntimeError(f"the event feeder failed: {self.error!r}") from self.error
        return self.sent


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra}


def spawn_cli(settings: Settings, log_path: Path, *args: str, env: dict[str, str] | None = None,
              preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    """`streamrec <args>` as a child process, output (both streams) to `log_path`."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env or cli_env(settings),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=preexec_fn)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def run_cli(settings: Settings, *args: str, timeout_s: float, env: dict[str, str] | None = None,
            preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env or cli_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s, preexec_fn=preexec_fn)


def log_event_ids(settings: Settings) -> list[str]:
    """Every event id in the offline log (duplicates kept: they are what a scenario counts)."""
    log = OfflineLog(settings.log_dir)
    return read_table(log, log.list_files(settings.events_topic), EVENT_LOG_SCHEMA).column("event_id").to_pylist()


def popularity_total(settings: Settings) -> int:
    """Events counted in Redis (the all-time popularity sums one per applied event)."""
    r = make_redis(settings)
    try:
        return int(sum(score for _, score in r.zrange(f"{settings.redis_prefix}pop:all", 0, -1, withscores=True)))
    finally:
        r.close()


def count_loss(result: ScenarioResult, settings: Settings, sent_ids: set[str]) -> None:
    """Fill lost / duplicated from the log and from Redis's counts (the worse of the two)."""
    ids = log_event_ids(settings)
    counted = popularity_total(settings)
    n = len(sent_ids)
    result.events = n
    result.lost = max(len(sent_ids - set(ids)), n - counted, 0)
    result.duplicated = max(len(ids) - len(set(ids)), counted - n, 0)
    result.check(result.lost == 0, f"{result.lost} events lost (log {len(set(ids))}, Redis {counted}, sent {n})")
    result.check(result.duplicated == 0, f"{result.duplicated} events duplicated (log {len(ids)}, Redis {counted})")


def terminate(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM a child and wait for it; SIGKILL when it does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


INGEST_UNTIL_IDLE = ("ingest", "--until-idle", "2", "--no-progress", "--features-every", "0")


def ingest_until_idle(settings: Settings, result: ScenarioResult, tag: str, n: int, rate: float,
                      timeout_s: float) -> int:
    """Produce `n` generated events at `rate`/s, then `streamrec ingest` until the topic is idle;
    returns the events sent (a failed ingest is a problem of `result`)."""
    feeder = Feeder(settings, rate, tag=tag, limit=n)
    feeder.run()
    done = run_cli(settings, *INGEST_UNTIL_IDLE, timeout_s=timeout_s)
    result.check(done.returncode == 0, f"ingest exited {done.returncode}: {done.stderr[-800:]}")
    return feeder.sent


@dataclass
class HalfFolded:
    """A log whose first half is folded into the live feature version and whose second half is not,
    and `clean`: an untouched copy of it (other data dir) on which the feature job already ran once."""

    settings: Settings
    clean: Settings
    sent: int  # events produced (and logged)
    live_before: bytes  # the live version's manifest.json before anything was done to `settings`
    clean_bucket_files: int  # files the clean run wrote: the size of a run's version


def half_folded_log(kafka_bootstrap: str, redis_url: str, workdir: Path, result: ScenarioResult, *, events: int,
                    rate: float, tags: tuple[str, str], log_flush_records: int, timeout_s: float) -> HalfFolded:
    """The starting point of the feature-job scenarios (corrupt-parquet, feature-job-sigkill)."""
    from streaming.features import run_features

    settings = isolated_settings(kafka_bootstrap, redis_url, workdir / "data", log_flush_records=log_flush_records)
    sent = ingest_until_idle(settings, result, tags[0], events // 2, rate, timeout_s)
    run_features(settings)
    live_before = (settings.features_dir / "manifest.json").read_bytes()
    sent += ingest_until_idle(settings, result, tags[1], events - events // 2, rate, timeout_s)
    result.events = sent
    clean = settings.model_copy(update={"data_dir": workdir / "clean"})
    shutil.copytree(settings.log_dir, clean.log_dir)
    shutil.copytree(settings.features_dir, clean.features_dir)
    before = set(clean.features_dir.glob("v*/**/*.parquet"))
    run_features(clean)
    written = len(set(clean.features_dir.glob("v*/**/*.parquet")) - before)
    return HalfFolded(settings, clean, sent, live_before, written)


TABLE_KEYS = {"sequences": ("user_id",), "items": ("item_id",), "popularity": ("item_id",),
              "covisit_topk": ("item_id",), "covisit_counts": ("item_a", "item_b")}
TRENDING_REL_TOL = 1e-9  # trending is a float sum: equal within rounding, whatever order it was folded in


def table_differences(a: Any, b: Any) -> list[str]:
    """The feature tables (`FeatureTables`) that differ between two versions, in rows, not layout."""
    import math

    out = []
    for name, key in TABLE_KEYS.items():
        ra = sorted(getattr(a, name).to_pylist(), key=lambda r: tuple(r[c] for c in key))
        rb = sorted(getattr(b, name).to_pylist(), key=lambda r: tuple(r[c] for c in key))
        if name == "popularity":
            same = [(r["item_id"], r["count"]) for r in ra] == [(r["item_id"], r["count"]) for r in rb] and all(
                math.isclose(x["trending"], y["trending"], rel_tol=TRENDING_REL_TOL, abs_tol=1e-12)
                for x, y in zip(ra, rb))
        else:
            same = ra == rb
        if not same:
            out.append(name)
    for field_name in ("ref_ts", "watermarks", "counts"):
        if a.manifest.get(field_name) != b.manifest.get(field_name):
            out.append(f"manifest {field_name}")
    return out
