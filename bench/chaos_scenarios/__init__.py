"""The chaos scenarios of issue 15, one module each; `bench/chaos.py` runs them, tests/test_chaos.py
runs each at a small scale. A scenario is `run(kafka_bootstrap, redis_url, workdir, **scale)` ->
`ScenarioResult` (common.py); the stack it is given is shared, so it isolates its topics, group and
Redis prefix, and any stack it must break (a broker to restart) it starts itself."""

from __future__ import annotations

from collections.abc import Callable

from bench.chaos_scenarios import (
    broker_restart,
    corrupt_parquet,
    disk_full,
    feature_kill,
    ingest_kill,
    publish_kill,
    redis_kill,
    redis_serving,
    serve_kill,
    worker_kill,
)
from bench.chaos_scenarios.common import ScenarioResult

# In the order bench/chaos.py runs them.
SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    ingest_kill.NAME: ingest_kill.run,
    broker_restart.NAME: broker_restart.run,
    publish_kill.NAME: publish_kill.run,
    feature_kill.NAME: feature_kill.run,
    corrupt_parquet.NAME: corrupt_parquet.run,
    disk_full.NAME: disk_full.run,
    worker_kill.NAME: worker_kill.run,
    redis_kill.NAME: redis_kill.run,
    redis_serving.NAME: redis_serving.run,
    serve_kill.NAME: serve_kill.run,
}

__all__ = ["SCENARIOS", "ScenarioResult"]
