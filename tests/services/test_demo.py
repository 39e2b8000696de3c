"""`streamrec demo --quick` as a newcomer runs it: a child process, the real stack, start to finish."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.processes import free_port
from services.stack import stack_status

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_quick_demo_tells_the_whole_story_and_stops_cleanly(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STREAMREC_", "RAY_ADDRESS", "KAFKA_BOOTSTRAP", "REDIS_URL"))}
    env.update(STREAMREC_DATA_DIR=str(tmp_path / "data"), COLUMNS="160", RAY_USAGE_STATS_ENABLED="0",
               STREAMREC_MAX_POLL_INTERVAL_MS="3000", STREAMREC_SESSION_TIMEOUT_MS="3000")
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--quick", "--port", str(port)],
                          env=env, capture_output=True, text=True, timeout=840)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for expected in ("first LoRA adapter", "published default/v000001", "answer changed",
                     "published default/v000002", "is served", "searchable", "nearest items to new",
                     "history + query", "| candidate |", "| itemknn |", "evaluation.png",
                     "simulated answers", "$ streamrec experiment status default", "experiment stopped",
                     "stopped; nothing left running"):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out[-6000:]}"
    assert stack_status(tmp_path / "data" / "demo") is None
