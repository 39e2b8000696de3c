"""redis-server SIGKILLed under the API's load, restarted on its AOF (serving's side of `redis-sigkill`).

`streamrec serve` (one replica) reads a private redis-server (append-only file, fsync every second)
and takes a steady paced load. The server is SIGKILLed; for `outage_s` the API must answer every
request with a 200, never a 5xx: a request naming a user (whose recent items live in Redis) with
`fallback: "popular"` and items from the replica's last popularity snapshot (the architecture's
"Redis down: degrade, not fail"); one carrying its own recent items may still be answered by the
model, which needs no Redis. Then the server is started again on the same port and AOF, and the
API must answer users from Redis again by itself.
Requests / failed: the API requests made during the outage (sent after the kill, answered before
the restart began), and those of them not answered 2xx
(a notes line counts the fallback answers; a 5xx at any time of the run is a problem too).
Events: none. Recovery: Redis back -> the first user's request sent after it answered without the
fallback."""

from __future__ import annotations

import time
from pathlib import Path

from bench.chaos_scenarios.common import ScenarioResult, isolated_settings, progress, wait_for
from bench.chaos_scenarios.serving import Load, ServedApi, describe_failures, failures

NAME = "redis-sigkill-serving"
FALLBACK = "popular"  # what the API answers with while Redis is down
STEADY_TIMEOUT_S = 180.0
RECOVERY_TIMEOUT_S = 120.0


def run(kafka_bootstrap: str | None, redis_url: str | None, workdir: Path, *, rate: float = 80.0,
        clients: int = 8, steady_s: float = 10.0, outage_s: float = 30.0) -> ScenarioResult:
    from tests.fixtures.redis_server import RedisServer  # on an AOF, so it can be killed and restarted

    del redis_url  # this scenario kills its Redis: it starts its own
    result = ScenarioResult(NAME)
    with RedisServer(workdir / "redis") as server:
        settings = isolated_settings(kafka_bootstrap, server.url, workdir / "data")
        with ServedApi(settings, workdir, replicas=1) as api:
            load = Load(api.base, rate, clients).start()
            try:
                wait_for(lambda: len(load.answers) >= rate * steady_s, STEADY_TIMEOUT_S, f"{steady_s:.0f} s of load")
                server.kill()
                down = time.monotonic()
                progress(f"{NAME}: redis-server SIGKILLed ({len(load.answers)} requests so far)")
                wait_for(lambda: len(load.since(down)) >= rate * outage_s, STEADY_TIMEOUT_S,
                         f"{outage_s:.0f} s of load during the outage")
                restarting = time.monotonic()
                server.start()
                up = time.monotonic()
                progress(f"{NAME}: redis-server restarted on its AOF")
                try:
                    wait_for(lambda: any(a.by_user and a.ok and a.fallback != FALLBACK for a in load.since(up)),
                             RECOVERY_TIMEOUT_S, "a user's answer from Redis again after its restart")
                    result.recovery_s = time.monotonic() - up
                except TimeoutError as exc:
                    result.problems.append(str(exc))
            finally:
                answers = load.stop()
    # sent once Redis was dead, answered before its restart began: none of them could have reached it
    outage = [a for a in answers if a.sent >= down and a.answered < restarting]
    users = [a for a in outage if a.by_user]
    fallbacks = sum(a.ok and a.fallback == FALLBACK for a in outage)
    result.requests, result.failed = len(outage), len(failures(outage))
    result.check(len(users) > 0, "no user's request was sent during the outage")
    result.check(result.failed == 0, f"during the outage {describe_failures(outage)}")
    others = [a.fallback for a in users if a.ok and a.fallback != FALLBACK]
    result.check(not others, f"{len(others)} of {len(users)} users' answers during the outage without fallback "
                             f"{FALLBACK!r}: {others[:3]}")
    empty = sum(a.ok and a.items == 0 for a in outage)
    result.check(not empty, f"{empty} answers during the outage held no items (no popularity snapshot)")
    server_errors = [a for a in answers if a.status >= 500]
    result.check(not server_errors, f"{len(server_errors)} 5xx answers in the run: {describe_failures(server_errors)}")
    result.notes.append(f"{fallbacks} of {len(outage)} answers during the outage were fallback {FALLBACK!r} "
                        f"({len(users)} named a user, the others carried their recent items); "
                        f"{len(answers)} requests in the run ({load.measured_rate():.0f}/s), "
                        f"{len(failures(answers))} failed")
    return result
