"""Several Ray nodes (issue 18): Ray Train, the Ray Data jobs and Serve on a two-node cluster.

Each test runs one scenario of tests/multinode/scenarios.py in a subprocess (its own two-node
cluster on this machine, torn down at its end; the session's `ray_local` runtime is not touched)
and asserts on the JSON of what the scenario observed. Where work ran is read from Ray's state API
in the scenario, never assumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.multinode.scenarios import ANSWERED_AFTER_STOP, DATA_EVENTS, EMBED_ACTORS, EMBED_ITEMS, TRAIN_EPOCHS

pytestmark = [pytest.mark.multinode, pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 480  # about 60 s each on a quiet 2-core machine; a loaded one takes several times that
OUTPUT_TAIL_CHARS = 6000  # of the scenario's output, in the failure message
BOTH = {"head", "node_b"}


def run_scenario(name: str, tmp_path: Path) -> dict:
    """Run one scenario in its own process (and process group: a timeout stops everything it started)."""
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    proc = subprocess.Popen([sys.executable, "-m", "tests.multinode.scenarios", name, "--json", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario's cluster: its GCS, raylets and workers
        output, _ = proc.communicate()
        pytest.fail(f"scenario {name} ran past {SCENARIO_TIMEOUT_S} s:\n{output[-OUTPUT_TAIL_CHARS:]}")
    assert proc.returncode == 0, f"scenario {name} exited {proc.returncode}:\n{output[-OUTPUT_TAIL_CHARS:]}"
    return json.loads(out.read_text())


def test_ray_train_ddp_spans_both_nodes_and_resumes_when_node_b_worker_is_killed(tmp_path):
    got = run_scenario("train", tmp_path)
    assert got["error"] is None, got
    # one DDP worker per node, and the one killed was node B's
    assert set(got["placement_at_kill"].values()) == BOTH, got["placement_at_kill"]
    killed = got["killed"]
    assert killed is not None and got["placement_at_kill"][str(killed["rank"])] == "node_b", got
    # every epoch ran, at world size 2, and the restarted group resumed from a checkpoint taken before the kill
    assert got["epochs"] == list(range(TRAIN_EPOCHS)) and set(got["world"]) == {2}, got
    assert got["restored_from_epoch"] is not None and 0 <= got["restored_from_epoch"] < killed["during_epoch"], got
    # both worker groups (the killed one and its restart) had one worker on each node
    assert got["worker_nodes"] == {"head": 2, "node_b": 2}, got["worker_actors"]


def test_feature_job_and_catalog_embedding_run_on_both_nodes(tmp_path):
    got = run_scenario("data", tmp_path)
    features = got["features"]
    assert features["version"] == 1 and features["new_events"] == DATA_EVENTS, features
    tasks = got["feature_tasks_per_node"]
    assert set(tasks) == BOTH and min(tasks.values()) > 0, got["feature_task_names"]
    embed = got["embed"]
    assert embed["shape"][0] == EMBED_ITEMS and embed["max_norm_error"] < 1e-4, embed
    # the cluster's embeddings are the catalog the fixture embedded in one process at publish time
    assert embed["max_abs_diff_vs_published"] < 1e-4, embed
    assert got["embed_actor_nodes"] == {"head": 1, "node_b": 1}, got
    assert sum(got["embed_actor_nodes"].values()) == EMBED_ACTORS
    calls = got["embed_calls_per_node"]
    assert set(calls) == BOTH and min(calls.values()) > 0, calls  # both actors embedded batches


# The client is sequential (one request at a time, 0.1 s apart; every third one GET /v1/models), so when
# node B stops at most one request is in flight, and only that one can be lost with node B's replica;
# more would mean requests kept going to a replica that is gone. Measured: 0 (Serve's router moves on).
MAX_FAILED_AT_STOP = 1


def test_serve_spreads_replicas_and_keeps_answering_when_node_b_stops(tmp_path):
    got = run_scenario("serve", tmp_path)
    assert got["replica_nodes_before"] == ["head", "node_b"], got["replicas_before"]
    assert got["proxy_nodes"] == ["head"], got
    before = got["answered_by_node_before_stop"]  # from /v1/models answers, which name their replica
    assert set(before) == BOTH and min(before.values()) > 0, before  # both replicas answered
    assert set(got["answered_by_node_after_stop"]) == {"head"}, got["answered_by_node_after_stop"]
    assert got["failed_before_stop"] == 0, got["failures"]
    assert got["answered_after_stop_in_time"] and got["requests_after_stop"] >= ANSWERED_AFTER_STOP, got
    assert got["failed_during_stop"] + got["failed_after_stop"] <= MAX_FAILED_AT_STOP, got["failures"]
    # node B's replica is gone; the head's answered throughout
    after = Counter((a["node"], a["state"]) for a in got["replicas_after"])
    assert after[("head", "ALIVE")] == 1 and after[("node_b", "ALIVE")] == 0, got["replicas_after"]
