"""The embedded broker restarted (its log is in memory: a fresh cluster whose offsets start at 0).

Ingest fed by broker A records A's identity beside its Redis watermarks. Broker A goes; broker B
comes up and receives new events. `streamrec ingest` must refuse B with exit 2 and a message naming
both clusters and `--fresh` -- counting B's events as "already applied" (their offsets are below
A's watermarks) would skip them silently. Then `ingest --fresh` takes exactly B's events.
Recovery: from B's first refused ingest to the end of the `--fresh` one (operator time excluded)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.chaos_scenarios.common import (
    Feeder,
    ScenarioResult,
    event,
    isolated_settings,
    log_event_ids,
    popularity_total,
    progress,
    run_cli,
)
from services.stack import EmbeddedStack
from streaming.kafka_io import ensure_topics

NAME = "broker-restart"
CLI_TIMEOUT_S = 240.0
INGEST_ARGS = ("ingest", "--until-idle", "2", "--no-progress", "--features-every", "0")
MUST_NAME = ("streamrec ingest --fresh", "skipped as already applied")  # in the refusal, besides both cluster ids


def run(kafka_bootstrap: str, redis_url: str, workdir: Path, *, events: int = 2000, rate: float = 2000.0
        ) -> ScenarioResult:
    del kafka_bootstrap  # this scenario restarts a broker: it starts its own two
    result = ScenarioResult(NAME)
    with EmbeddedStack(workdir / "broker-a", redis=False) as a:
        settings_a = isolated_settings(a.kafka_bootstrap, redis_url, workdir / "data")
        first = Feeder(settings_a, rate, tag="a", limit=events)
        first.run()  # in this thread: A's events, all sent
        done = run_cli(settings_a, *INGEST_ARGS, timeout_s=CLI_TIMEOUT_S)
        result.check(done.returncode == 0, f"ingest from broker A exited {done.returncode}: {done.stderr[-800:]}")
    counted_a = popularity_total(settings_a)
    progress(f"{NAME}: broker A gone after {counted_a} events; starting broker B")
    with EmbeddedStack(workdir / "broker-b", redis=False) as b:
        settings_b = settings_a.model_copy(update={"kafka_bootstrap_servers": b.kafka_bootstrap})
        ensure_topics(settings_b)
        second = Feeder(settings_b, rate, tag="b", limit=events)
        second.run()
        t0 = time.monotonic()
        refused = run_cli(settings_b, *INGEST_ARGS, timeout_s=CLI_TIMEOUT_S)
        result.check(refused.returncode == 2, f"ingest over a new broker exited {refused.returncode}, not 2")
        missing = [s for s in (*MUST_NAME, b.kafka_bootstrap) if s not in refused.stderr]
        result.check(not missing, f"the refusal does not name {missing}: {refused.stderr[-800:]}")
        result.check(popularity_total(settings_b) == counted_a, "events were taken from the new broker before --fresh")
        result.notes.append("refusal: " + next((line for line in refused.stderr.splitlines() if "broker" in line),
                                               refused.stderr.strip()[:200]))
        fresh = run_cli(settings_b, *INGEST_ARGS, "--fresh", timeout_s=CLI_TIMEOUT_S)
        result.recovery_s = time.monotonic() - t0
        result.check(fresh.returncode == 0, f"ingest --fresh exited {fresh.returncode}: {fresh.stderr[-800:]}")
        counted_b = popularity_total(settings_b)
        ids = log_event_ids(settings_b)  # the old log was archived by --fresh: this is B's
    sent_b = {event("b", i)["event_id"] for i in range(second.sent)}
    result.events = first.sent + second.sent
    result.lost = max(first.sent - counted_a, 0) + max(len(sent_b - set(ids)), second.sent - counted_b, 0)
    result.duplicated = max(counted_a - first.sent, 0) + max(len(ids) - len(set(ids)), counted_b - second.sent, 0)
    result.check(result.lost == 0, f"{result.lost} events lost (A counted {counted_a}/{first.sent}, "
                                   f"B counted {counted_b}, logged {len(set(ids))}/{second.sent})")
    result.check(result.duplicated == 0, f"{result.duplicated} events duplicated")
    return result
