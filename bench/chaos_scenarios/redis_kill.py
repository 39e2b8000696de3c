"""redis-server SIGKILLed under `streamrec ingest` with events flowing, restarted on its AOF (ingest's side).

A private redis-server (append-only file, fsync every second) serves one `streamrec ingest`; it is
SIGKILLed mid-stream while the feeder keeps producing, then started again on the same port and AOF.
Ingest must wait (still running, one WARNING for the outage, no traceback), resume by itself, and
end with every event counted and logged once. Recovery: Redis back -> every event sent during the
outage applied. Serving's side (answers `fallback: popular`, never a 5xx) is not in this scenario."""

from __future__ import annotations

import time
from pathlib import Path

from bench.chaos_scenarios.common import (
    Feeder,
    ScenarioResult,
    count_loss,
    event,
    isolated_settings,
    log_tail,
    popularity_total,
    progress,
    spawn_cli,
    terminate,
    wait_for,
)

NAME = "redis-sigkill"
STEP_TIMEOUT_S = 120.0
OUTAGE_EVENTS = 1000  # events produced while Redis is down
DRAIN_TIMEOUT_S = 240.0


def run(kafka_bootstrap: str, redis_url: str | None, workdir: Path, *, rate: float = 600.0) -> ScenarioResult:
    # The tests' private redis-server, on its append-only file (appendfsync everysec, as the stack runs it).
    from tests.fixtures.redis_server import RedisServer

    del redis_url  # this scenario kills its Redis: it starts its own
    result = ScenarioResult(NAME)
    server = RedisServer(workdir / "redis")
    server.start()
    try:
        settings = isolated_settings(kafka_bootstrap, server.url, workdir / "data", max_poll_records=400,
                                     log_flush_records=1500, log_flush_interval_s=0.3)
        feeder = Feeder(settings, rate, tag="r")
        feeder.start()
        ingest = spawn_cli(settings, workdir / "ingest.log", "ingest", "--no-progress", "--features-every", "0")
        try:
            wait_for(lambda: popularity_total(settings) >= 1000, STEP_TIMEOUT_S, "ingestion to get going")
            server.kill()
            at_kill = feeder.sent
            progress(f"{NAME}: redis-server SIGKILLed at {at_kill} events sent")
            wait_for(lambda: "stopped answering" in log_tail(ingest.log_path, 10**6), STEP_TIMEOUT_S,
                     "ingest to see Redis go")
            wait_for(lambda: feeder.sent >= at_kill + OUTAGE_EVENTS, STEP_TIMEOUT_S, "events to flow meanwhile")
            result.check(ingest.poll() is None, f"ingest exited during the outage: {log_tail(ingest.log_path)}")
            server.start()
            back = time.monotonic()
            sent_by_then = feeder.sent
            wait_for(lambda: popularity_total(settings) >= sent_by_then, DRAIN_TIMEOUT_S,
                     "the events of the outage to be applied")
            result.recovery_s = time.monotonic() - back
            n = feeder.stop()
            wait_for(lambda: popularity_total(settings) >= n, DRAIN_TIMEOUT_S, "every event to be counted")
        except TimeoutError as exc:
            result.problems.append(str(exc))
        finally:
            if feeder.is_alive():
                feeder.stop()
            code = terminate(ingest)
        text = log_tail(ingest.log_path, 10**6)
        result.check(code == 0, f"ingest exited {code}: {text[-800:]}")
        warnings = [line for line in text.splitlines() if " WARNING streaming." in line]
        result.check(len(warnings) == 1, f"{len(warnings)} WARNING lines for one outage: {warnings[:3]}")
        result.check("Traceback" not in text, f"a traceback in ingest's log: {text[-800:]}")
        if warnings:
            result.notes.append("warning: " + warnings[0][:300])
        count_loss(result, settings, {event("r", i)["event_id"] for i in range(feeder.sent)})
    finally:
        server.stop()
    return result
