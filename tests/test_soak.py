"""The soak (bench/soak.py, its figures in bench/soak_report.py): the analysis as unit tests (RSS growth
findings, p99 per window, errors, the open-loop schedule, the request mix, process roles), and one short
run of the real thing -- `streamrec up` under load with events and training -- marked integration + slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.soak import ROUTE_MIX, Requests
from bench.soak_report import (
    MIB,
    RSS_GROWTH_FINDING_PCT,
    ProcessSeries,
    RequestRecord,
    arrival_offsets,
    error_counts,
    findings,
    latency_summary,
    latency_windows,
    render,
    role_of,
    rss_rows,
    split_among,
)

ROOT = Path(__file__).resolve().parents[1]


def series(pid: int, role: str, values_mib: list[float], every_s: float = 5.0, first_s: float = 0.0) -> ProcessSeries:
    s = ProcessSeries(pid, role)
    for n, v in enumerate(values_mib):
        s.add(first_s + n * every_s, int(v * MIB), role)
    return s


# --- the open-loop schedule ------------------------------------------------------------------
def test_arrivals_are_evenly_paced_and_dealt_round_robin_to_the_clients():
    due = arrival_offsets(10.0, 2.0)
    assert len(due) == 20 and due[0] == 0.0
    assert np.allclose(np.diff(due), 0.1)
    shares = split_among(due, 3)
    assert [len(s) for s in shares] == [7, 7, 6]
    assert np.allclose(np.diff(shares[0]), 0.3)  # each client keeps rate / clients
    assert np.array_equal(np.sort(np.concatenate(shares)), due)  # together: exactly the schedule


def test_a_bad_schedule_is_refused_naming_the_value():
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(0, 10)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        split_among(np.arange(3.0), 0)


def test_the_request_mix_follows_its_shares_and_unknown_users_are_never_known():
    reqs = Requests([f"u{i}" for i in range(10)], [f"i{i}" for i in range(20)], seed=3)
    plan = reqs.plan(20_000)
    total = sum(share for _, share in ROUTE_MIX)
    for route, share in ROUTE_MIX:
        assert abs(plan.count(route) / len(plan) - share / total) < 0.02, route
    method, path, params, _ = reqs.request(7, "rec_unknown")
    assert (method, path) == ("GET", "/v1/recommendations") and params["user_id"] not in reqs.known
    assert reqs.request(7, "rec_known")[2]["user_id"] == "u7"
    assert reqs.request(3, "similar")[1] == "/v1/items/i3/similar"
    assert reqs.request(3, "session")[3]["recent_items"] == ["i3", "i4", "i5"]
    assert reqs.request(3, "query")[3]["query"]


# --- RSS ---------------------------------------------------------------------------------------
def test_rss_growth_above_the_threshold_is_a_finding_below_it_is_not():
    rows = {r["role"]: r for r in rss_rows([
        series(1, "serve replica", [100, 100, 100, 110, 115, 115, 115]),   # +15%
        series(2, "ingest (+ feature schedule)", [200, 201, 200, 205, 209, 209, 209]),  # +4.5%
    ], duration_s=30.0, sample_s=5.0)}
    grown, flat = rows["serve replica"], rows["ingest (+ feature schedule)"]
    assert grown["start_mib"] == 100 and grown["end_mib"] == 115 and grown["growth_pct"] == 15.0
    assert "grew 15.0%" in grown["finding"] and f"threshold {RSS_GROWTH_FINDING_PCT:g}%" in grown["finding"]
    assert flat["growth_pct"] == 4.5 and flat["finding"] is None


def test_an_edge_is_the_median_of_its_samples_so_one_spike_decides_nothing():
    (row,) = rss_rows([series(1, "serve proxy", [100, 180, 100, 100, 100, 100, 100])], duration_s=30.0, sample_s=5.0)
    assert row["start_mib"] == 100 and row["growth_pct"] == 0.0 and row["finding"] is None
    assert row["max_mib"] == 180


def test_a_part_that_exits_or_appears_is_a_restart_but_a_pooled_ray_worker_is_not():
    rows = rss_rows([
        series(1, "ingest (+ feature schedule)", [200, 200, 200], every_s=5.0),            # gone after 10 s
        series(2, "ingest (+ feature schedule)", [200, 200, 200], every_s=5.0, first_s=20.0),  # its successor
        series(3, "ray worker (MapBatches)", [300, 300], every_s=5.0, first_s=10.0),       # came and went
    ], duration_s=30.0, sample_s=5.0)
    by_pid = {r["pid"]: r for r in rows}
    assert "exited during the steady state" in by_pid[1]["finding"] and by_pid[1]["end_mib"] is None
    assert "started during the steady state" in by_pid[2]["finding"] and by_pid[2]["start_mib"] is None
    assert by_pid[3]["finding"] is None and by_pid[3]["growth_pct"] is None


def test_roles_come_from_the_command_line_and_ray_process_titles():
    py = "/venv/bin/python"
    assert role_of([py, "-m", "services.cli", "ingest", "--no-progress"]) == "ingest (+ feature schedule)"
    assert role_of([py, "-m", "services.cli", "train-loop", "--every", "1m"]) == "trainer"
    assert role_of([py, "-m", "services.cli", "up", "--preset", "quick"]) == "up"
    assert role_of([py, "-m", "services.cli", "serve", "--port", "8000"]) == "serve (driver)"
    assert role_of([py, "/venv/bin/ray", "start", "--head", "--block"]) == "ray head (ray start)"
    assert role_of(["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--port=1"]) == "ray gcs_server"
    assert role_of(["ray::ServeReplica:streamrec:Api.handle_request"]) == "serve replica"
    assert role_of(["ray::ServeController.listen_for_change"]) == "serve controller"
    assert role_of(["ray::ProxyActor"]) == "serve proxy"
    assert role_of(["ray::MapBatches(ItemEmbedder)"]) == "ray worker (MapBatches)"
    assert role_of(["ray::IDLE"]) == "ray worker (idle)"
    assert role_of([py, "/x/ray/_private/ray_process_reaper.py"], "python3") == "ray process reaper"
    assert role_of([py, "/x/other.py"], "python3") == "python3 (other.py)"
    assert role_of([py, "-m", "ray.something", "--x"], "python3") == "python3 (ray.something)"
    assert role_of([py, "-m", "ray.util.client.server", "--port=1"], "python3") == "ray client server"
    # a Ray worker starting up names the raylet's socket: it is not the raylet
    assert role_of([py, "/x/default_worker.py", "--raylet-name=/tmp/ray/sockets/raylet"], "python3") == \
        "python3 (default_worker.py)"
    assert role_of(["/x/ray/core/src/ray/raylet/raylet", "--node-ip-address=127.0.0.1"]) == "ray raylet"


# --- latency and errors ------------------------------------------------------------------------
def test_p99_is_computed_per_window_and_connection_errors_count_as_errors_only():
    records = [RequestRecord(due_s=i / 100, latency_s=0.010, outcome=200, route="rec_known") for i in range(100)]
    records += [RequestRecord(due_s=1.5 + i / 100, latency_s=0.100 + i / 1000, outcome=200, route="similar")
                for i in range(50)]
    records += [RequestRecord(due_s=1.9, latency_s=30.0, outcome="timeout", route="similar"),
                RequestRecord(due_s=1.95, latency_s=0.2, outcome=503, route="similar")]
    windows = latency_windows(records, window_s=1.0, duration_s=2.0)
    assert [w["requests"] for w in windows] == [100, 52] and [w["errors"] for w in windows] == [0, 2]
    assert windows[0]["p99_ms"] == pytest.approx(10.0)
    answered = [0.100 + i / 1000 for i in range(50)] + [0.2]  # the timeout has no latency; the 503 has one
    assert windows[1]["p99_ms"] == pytest.approx(1e3 * np.percentile(answered, 99), abs=0.01)
    assert latency_windows(records, window_s=0.75, duration_s=2.0)[-1]["end_s"] == 2.0  # a shorter last window
    summary = latency_summary(records, duration_s=2.0)
    assert summary["requests"] == 152 and summary["ok"] == 150 and summary["achieved_rps"] == 76.0
    assert set(summary["by_route"]) == {"rec_known", "similar"}


def test_errors_are_counted_by_status_and_by_kind():
    records = [RequestRecord(0, 0.01, o, "r") for o in (200, 204, 404, 503, 503, "timeout", "ClientConnectorError")]
    assert error_counts(records) == {"non_2xx_by_status": {"404": 1, "503": 2},
                                     "connection_errors": {"ClientConnectorError": 1, "timeout": 1},
                                     "status_5xx": 2, "total": 5}


def test_the_report_prints_a_finding_line_per_problem():
    records = [RequestRecord(i / 10, 0.02, 200 if i % 50 else 500, "rec_known") for i in range(100)]
    result = {"duration_s": 10.0, "max_rps": 20.0, "target_rps": 10.0, "clients": 2, "sample_s": 5.0,
              "latency": latency_summary(records, 10.0), "windows": latency_windows(records, 5.0, 10.0),
              "errors": error_counts(records),
              "rss": rss_rows([series(1, "redis", [10, 10, 10, 12, 12, 12])], duration_s=25.0, sample_s=5.0),
              "events": {"rate": 5, "sent": 50, "applied": 49, "lost": 1, "dlq": 0, "feature_runs": {"ok": 1}},
              "adapters_published": ["v000002"]}
    text = render(result)
    assert "p99 over time" in text and "0-5 s" in text and "5-10 s" in text
    lines = [line for line in text.splitlines() if line.startswith("FINDING: ")]
    assert len(lines) == 3 == len(findings(result))
    assert any("redis" in line and "grew 20.0%" in line for line in lines)
    assert any("2 answers were 5xx" in line for line in lines)
    assert any("1 events sent were never applied" in line for line in lines)


# --- the real thing, briefly -------------------------------------------------------------------
# every part `up` runs, and the embedded stack: each must have RSS figures at both edges of the steady state
PARTS = ("up", "ingest (+ feature schedule)", "trainer", "serve (driver)", "ray head (ray start)", "ray gcs_server",
         "ray raylet", "serve controller", "serve proxy", "serve replica", "redis", "broker (tansu)")


# The steady state is short (what is checked -- RSS at both edges of it for every part, no 5xx, p99 in every
# window, no lost event -- holds at any length; bench/soak.py's default run is the 10-minute one): 8 RSS
# samples (every 2 s, edges the median of RSS_EDGE_SAMPLES each) and three p99 windows of 5 s.
SHORT_SOAK_S = 15.0
SHORT_SOAK_WINDOWS = 3


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_short_soak_has_figures_for_every_process_and_no_5xx(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration-s", str(SHORT_SOAK_S), "--warmup-events", "1500",
         "--probe-s", "1", "--sample-s", "2", "--window-s", str(SHORT_SOAK_S / SHORT_SOAK_WINDOWS), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    rows = result["rss"]
    for part in PARTS:
        mine = [r for r in rows if r["role"] == part]
        assert mine, f"no RSS figures for {part}: {sorted({r['role'] for r in rows})}"
        assert all(r["start_mib"] and r["end_mib"] and r["growth_pct"] is not None for r in mine), mine
    assert result["errors"]["status_5xx"] == 0, result["errors"]
    assert result["max_rps"] > 0 and result["latency"]["requests"] > 0 and result["latency"]["ok"] > 0
    assert len(result["windows"]) == SHORT_SOAK_WINDOWS and all(w["p99_ms"] is not None for w in result["windows"])
    assert result["events"]["sent"] > 0 and result["events"]["lost"] == 0, result["events"]
    assert result["up_exit"] == 0
    assert "p99 over time" in proc.stdout
