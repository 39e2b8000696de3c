"""The soak's figures, computed from its raw samples (bench/soak.py collects them, this module judges
and prints them): pure functions, so the analysis is unit tested without running a stack.

* `arrival_offsets` / `split_among`: the open-loop schedule (arrival i at i / rate seconds, dealt
  round-robin to the client workers);
* `role_of`: which part of the stack a process is, from its command line;
* `rss_rows`: each process's RSS at the start and the end of the steady state and its growth; a
  long-lived process growing more than `RSS_GROWTH_FINDING_PCT` is a finding, as is one that exited
  or appeared (a restart) during the steady state;
* `latency_windows` / `latency_summary` / `error_counts`: p99 over time, overall p50/p99, achieved rate,
  non-2xx answers by status and connection errors by kind;
* `render`: the human table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

RSS_GROWTH_FINDING_PCT = 10.0  # growth over the steady state above this is a finding (issue 15)
# RSS at an edge of the steady state = the median of this many samples there: one sample taken in the
# middle of a burst (a request spike, a batch being decoded) would otherwise decide the verdict
RSS_EDGE_SAMPLES = 3
MIB = 1024 * 1024

# Parts of the stack that live for the whole run: one of them exiting or appearing during the steady
# state is a restart, a finding. Pooled Ray workers (training, Ray Data tasks) come and go by design.
LONG_LIVED_ROLES = (
    "up", "ingest (+ feature schedule)", "trainer", "serve (driver)", "ray head (ray start)", "ray gcs_server",
    "ray raylet", "ray dashboard", "ray dashboard agent", "ray runtime-env agent", "ray log monitor", "ray monitor",
    "ray process reaper", "ray client server",
    "serve controller", "serve proxy", "serve replica", "redis", "broker (tansu)",
)
# (substring of the command line, role), first match wins; `ray::<Actor>` titles are handled in role_of
_CMDLINE_ROLES = (
    ("services.cli up", "up"),
    ("services.cli ingest", "ingest (+ feature schedule)"),
    ("services.cli train-loop", "trainer"),
    ("services.cli serve", "serve (driver)"),
    ("dashboard/agent.py", "ray dashboard agent"),
    ("dashboard/dashboard.py", "ray dashboard"),
    ("runtime_env/agent", "ray runtime-env agent"),
    ("log_monitor.py", "ray log monitor"),
    ("ray_process_reaper.py", "ray process reaper"),
    ("ray.util.client.server", "ray client server"),
    ("autoscaler/_private/monitor.py", "ray monitor"),
    ("ray start", "ray head (ray start)"),
    ("tansu", "broker (tansu)"),
    ("redis-server", "redis"),
)
# binaries, by the file name of argv[0] (a Ray worker's own command line names the raylet's socket)
_BINARY_ROLES = {"gcs_server": "ray gcs_server", "raylet": "ray raylet", "redis-server": "redis"}
_RAY_ACTOR_ROLES = {"ServeController": "serve controller", "ProxyActor": "serve proxy",
                    "ServeReplica": "serve replica", "IDLE": "ray worker (idle)",
                    "DashboardAgent": "ray dashboard agent", "RuntimeEnvAgent": "ray runtime-env agent"}


def role_of(cmdline: Sequence[str], name: str = "") -> str:
    """The part of the stack a process is, from its command line (Ray workers retitle themselves
    `ray::<what they run>`): e.g. `serve replica`, `ingest (+ feature schedule)`, `ray worker (MapBatches)`."""
    text = " ".join(cmdline) or name
    if text.startswith("ray::"):  # ray::ServeReplica:app:Api.handle_request, ray::MapBatches(f), ray::IDLE
        head = text[len("ray::"):].split()[0].split(":")[0].split(".")[0].split("(")[0] or "?"
        return _RAY_ACTOR_ROLES.get(head, f"ray worker ({head})")
    if cmdline and cmdline[0].rsplit("/", 1)[-1] in _BINARY_ROLES:
        return _BINARY_ROLES[cmdline[0].rsplit("/", 1)[-1]]
    for needle, role in _CMDLINE_ROLES:
        if needle in text:
            return role
    # another program: say which (its script or -m module), so the table names it
    args = list(cmdline[1:])
    program = next((a.rsplit("/", 1)[-1] for a in args if a.endswith(".py")), None)
    if program is None and "-m" in args[:-1]:
        program = args[args.index("-m") + 1]
    name = name or (cmdline[0].rsplit("/", 1)[-1] if cmdline else "?")
    return f"{name} ({program})" if program else name


# --- the open-loop schedule ------------------------------------------------------------------
def arrival_offsets(rate: float, duration_s: float) -> np.ndarray:
    """Seconds from the start at which each request is due: evenly paced at `rate`/s (open loop: an
    arrival is sent at its time whatever happened to the ones before it)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate ({rate}) and duration_s ({duration_s}) must be positive")
    return np.arange(int(rate * duration_s)) / rate


def split_among(offsets: np.ndarray, workers: int) -> list[np.ndarray]:
    """Deal arrivals round-robin to `workers` clients: each keeps the same rate / workers pace and
    together they send exactly the schedule."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return [offsets[w::workers] for w in range(workers)]


# --- RSS -------------------------------------------------------------------------------------
@dataclass
class ProcessSeries:
    """One process's RSS samples (seconds since the steady state began, bytes) and the roles it had."""

    pid: int
    role: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    cmdline: str = ""  # its start, for a reader to tell what an unnamed process is

    def add(self, t: float, rss: int, role: str) -> None:
        self.samples.append((t, rss))
        self.role = role
        if role not in self.roles:
            self.roles.append(role)


def _edge(values: list[int]) -> float:
    return float(statistics.median(values))


def rss_rows(series: Iterable[ProcessSeries], duration_s: float, sample_s: float,
             threshold_pct: float = RSS_GROWTH_FINDING_PCT) -> list[dict]:
    """One row per process seen in the steady state [0, duration_s]: start / end RSS (MiB; the median
    of the RSS_EDGE_SAMPLES samples at each edge), growth %, and `finding` (a sentence, or None).

    A process counts as present at an edge when it was sampled within 1.5 sampling periods of it;
    one present at only one edge of a long-lived role exited or appeared: a restart, a finding."""
    rows = []
    near = 1.5 * sample_s
    for s in sorted(series, key=lambda s: (s.role, s.pid)):
        if not s.samples:
            continue
        ts = [t for t, _ in s.samples]
        at_start, at_end = ts[0] <= near, ts[-1] >= duration_s - near
        rss = [r for _, r in s.samples]
        start = _edge(rss[:RSS_EDGE_SAMPLES]) if at_start else None
        end = _edge(rss[-RSS_EDGE_SAMPLES:]) if at_end else None
        growth = 100.0 * (end - start) / start if start and end is not None else None
        long_lived = s.role in LONG_LIVED_ROLES
        finding = None
        if growth is not None and growth > threshold_pct:
            finding = (f"{s.role} [pid {s.pid}] RSS grew {growth:.1f}% over the steady state "
                       f"({start / MIB:.1f} -> {end / MIB:.1f} MiB, +{(end - start) / MIB:.1f} MiB; "
                       f"threshold {threshold_pct:g}%)")
        elif long_lived and not at_end:
            finding = f"{s.role} [pid {s.pid}] exited during the steady state (at {ts[-1]:.0f} s)"
        elif long_lived and not at_start:
            finding = f"{s.role} [pid {s.pid}] started during the steady state (at {ts[0]:.0f} s): a restart?"
        rows.append({
            "role": s.role, "pid": s.pid, "roles": list(s.roles), "cmdline": s.cmdline,
            "start_mib": None if start is None else round(start / MIB, 1),
            "end_mib": None if end is None else round(end / MIB, 1),
            "max_mib": round(max(rss) / MIB, 1),
            "growth_pct": None if growth is None else round(growth, 2),
            "first_s": round(ts[0], 1), "last_s": round(ts[-1], 1), "samples": len(rss),
            "long_lived": long_lived, "finding": finding,
        })
    return rows


# --- latency and errors ------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestRecord:
    """One request of the steady state: when it was due (s since the start), its latency from that
    moment (s; queueing in the client counts), its outcome: the HTTP status, or the kind of
    connection error (`timeout`, `ClientConnectorError`, ...), and how late the client sent it (s:
    whether the load generator kept up)."""

    due_s: float
    latency_s: float
    outcome: int | str
    route: str
    lag_s: float = 0.0


def _ms(values: Sequence[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(values, q)), 2) if len(values) else None


def latency_windows(records: Sequence[RequestRecord], window_s: float, duration_s: float) -> list[dict]:
    """p50/p99 and counts per window of `window_s` seconds by due time (the last window may be shorter).
    Latencies of every answered request (any status) count; connection errors have none."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    n = max(1, int(np.ceil(duration_s / window_s - 1e-9)))
    buckets: list[list[RequestRecord]] = [[] for _ in range(n)]
    for r in records:
        buckets[min(n - 1, max(0, int(r.due_s // window_s)))].append(r)
    rows = []
    for i, rs in enumerate(buckets):
        answered = [r.latency_s for r in rs if isinstance(r.outcome, int)]
        rows.append({"window": i, "start_s": round(i * window_s, 1), "end_s": round(min(duration_s, (i + 1) * window_s), 1),
                     "requests": len(rs), "errors": sum(1 for r in rs if not is_ok(r.outcome)),
                     "p50_ms": _ms(answered, 50), "p99_ms": _ms(answered, 99)})
    return rows


def is_ok(outcome: int | str) -> bool:
    return isinstance(outcome, int) and 200 <= outcome < 300


def error_counts(records: Iterable[RequestRecord]) -> dict:
    """Non-2xx answers by status, connection errors by kind, and the 5xx total."""
    by_status: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for r in records:
        if isinstance(r.outcome, int):
            if not is_ok(r.outcome):
                by_status[str(r.outcome)] = by_status.get(str(r.outcome), 0) + 1
        else:
            by_kind[r.outcome] = by_kind.get(r.outcome, 0) + 1
    return {"non_2xx_by_status": dict(sorted(by_status.items())), "connection_errors": dict(sorted(by_kind.items())),
            "status_5xx": sum(v for k, v in by_status.items() if k.startswith("5")),
            "total": sum(by_status.values()) + sum(by_kind.values())}


def latency_summary(records: Sequence[RequestRecord], duration_s: float) -> dict:
    answered = [r.latency_s for r in records if isinstance(r.outcome, int)]
    by_route: dict[str, list[float]] = {}
    for r in records:
        if isinstance(r.outcome, int):
            by_route.setdefault(r.route, []).append(r.latency_s)
    return {"requests": len(records), "achieved_rps": round(len(records) / duration_s, 2) if duration_s else None,
            "ok": sum(1 for r in records if is_ok(r.outcome)), "p50_ms": _ms(answered, 50), "p99_ms": _ms(answered, 99),
            "by_route": {k: {"requests": len(v), "p50_ms": _ms(v, 50), "p99_ms": _ms(v, 99)}
                         for k, v in sorted(by_route.items())}}


# --- the human table ---------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [list(map(str, header))] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def findings(result: dict) -> list[str]:
    """Every FINDING of a result: RSS growth or restarts, 5xx answers, lost or dead-lettered events."""
    out = [row["finding"] for row in result["rss"] if row["finding"]]
    err = result["errors"]
    if err["status_5xx"]:
        out.append(f"{err['status_5xx']} answers were 5xx: {err['non_2xx_by_status']}")
    events = result.get("events", {})
    if events.get("lost"):
        out.append(f"{events['lost']} events sent were never applied by ingest")
    if events.get("dlq"):
        out.append(f"{events['dlq']} events went to the DLQ")
    return out


def render(result: dict) -> str:
    lat, err, ev = result["latency"], result["errors"], result.get("events", {})
    head = (f"soak: {result['duration_s']:g} s of steady state; max rate {result['max_rps']:.1f} req/s -> "
            f"target {result['target_rps']:.1f} req/s, achieved {lat['achieved_rps']} req/s over "
            f"{result['clients']} client workers; {lat['requests']} requests, {lat['ok']} 2xx; "
            f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms (from the due time; the client sent p99 "
            f"{result.get('client_lag_p99_ms')} ms late)")
    lines = [head, "", (f"RSS per process (MiB; start/end = median of the first/last {RSS_EDGE_SAMPLES} samples, "
                        f"every {result['sample_s']:g} s)")]
    lines += _table(("process", "pid", "start", "end", "growth %", "max"),
                    [(r["role"], r["pid"], r["start_mib"], r["end_mib"], r["growth_pct"], r["max_mib"])
                     for r in result["rss"]])
    lines += ["", "p99 over time"]
    lines += _table(("window", "requests", "errors", "p50 ms", "p99 ms"),
                    [(f"{w['start_s']:g}-{w['end_s']:g} s", w["requests"], w["errors"], w["p50_ms"], w["p99_ms"])
                     for w in result["windows"]])
    lines += ["", "requests by route"]
    lines += _table(("route", "requests", "p50 ms", "p99 ms"),
                    [(k, v["requests"], v["p50_ms"], v["p99_ms"]) for k, v in lat["by_route"].items()])
    lines += ["", (f"errors: {err['total']} (non-2xx by status {err['non_2xx_by_status'] or 'none'}; connection "
                   f"errors {err['connection_errors'] or 'none'}; 5xx {err['status_5xx']})")]
    if ev:
        lines.append(f"events: {ev.get('sent')} sent at {ev.get('rate')}/s, {ev.get('applied')} applied, lost "
                     f"{ev.get('lost')}, DLQ {ev.get('dlq')}; feature runs {ev.get('feature_runs')}; adapters published "
                     f"during the steady state: {result.get('adapters_published')}")
    found = findings(result)
    lines += [""] + [f"FINDING: {f}" for f in found] + ([] if found else ["no findings"])
    return "\n".join(lines)


__all__ = ["LONG_LIVED_ROLES", "RSS_EDGE_SAMPLES", "RSS_GROWTH_FINDING_PCT", "ProcessSeries", "RequestRecord",
           "arrival_offsets", "error_counts", "findings", "is_ok", "latency_summary", "latency_windows", "render",
           "role_of", "rss_rows", "split_among"]
