"""How `streamrec status` shows a `Report`: a compact rich table for a person, or one JSON object
for a machine (`--json`). Pure: a report in, text out."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.status import fallback_share
from services.status_model import FAIL, OK, WARN, Snapshot

STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red"}
MAX_PARTITION_ROWS = 12  # beyond this many partitions the lag table shows the most lagging ones


def lag_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """Lag per partition over every answering consumer, most lagging first."""
    rows: dict[tuple[str, str], float] = {}
    for s in snap.ingest:
        if s.metrics is None:
            continue
        for labels, v in s.metrics.select("streamrec_ingest_consumer_lag"):
            key = (labels.get("topic", "?"), labels.get("partition", "?"))
            rows[key] = max(v, rows.get(key, 0.0))
    ordered = sorted(rows.items(), key=lambda kv: (-kv[1], kv[0][0], int(kv[0][1]) if kv[0][1].isdigit() else 0))
    return [{"topic": t, "partition": int(p) if p.isdigit() else p, "lag": int(v)} for (t, p), v in ordered]


def _consumer(s) -> dict[str, Any]:
    m = s.metrics
    if m is None:
        return {"url": s.url, "up": False, "error": s.error}
    return {"url": s.url, "up": True,
            "assigned_partitions": m.value("streamrec_ingest_assigned_partitions"),
            "records": m.value("streamrec_ingest_records_total"),
            "dlq_records": m.value("streamrec_ingest_dlq_records_total"),
            "last_commit_timestamp": m.value("streamrec_ingest_last_commit_timestamp_seconds"),
            "seconds_since_last_commit": m.value("streamrec_ingest_seconds_since_last_commit")}


def report_dict(report) -> dict[str, Any]:
    """Everything `--json` prints: the verdict, every check, and what was seen."""
    snap: Snapshot = report.snapshot
    f, api = snap.features, snap.api
    prom = f.prom
    share = None
    if (fs := fallback_share(api)) is not None:
        share = {"fallback": fs[0], "total": fs[1], "share": fs[0] / fs[1] if fs[1] else None}
    return {
        "status": report.status,
        "healthy": report.exit_code == 0,
        "exit_code": report.exit_code,
        "time": snap.now,
        "checks": [asdict(c) for c in report.checks],
        "stack": {"mode": snap.stack, "data_dir": snap.data_dir, "broker": asdict(snap.broker), "redis": asdict(snap.redis)},
        "ingest": {"consumers": [_consumer(s) for s in snap.ingest], "lag": lag_rows(snap)},
        "features": {
            "version": f.manifest_version, "created_at": f.manifest_created_at, "metrics_file": f.prom_path,
            "last_success_timestamp": prom.value("streamrec_features_last_success_timestamp_seconds") if prom else None,
            "last_run_timestamp": prom.value("streamrec_features_last_run_timestamp_seconds") if prom else None,
            "last_run_ok": prom.value("streamrec_features_last_run_ok") if prom else None,
            "error": f.error},
        "registry": {"root": snap.registry.root, "error": snap.registry.error, "scenes": [
            {"scene": sc.scene, "live_version": sc.live_version, "created_at": sc.created_at, "val_ndcg10": sc.val_ndcg10,
             "gate_refusals_in_a_row": sc.train.value("streamrec_train_gate_refusals_in_a_row", scene=sc.scene)
             if sc.train else None}
            for sc in snap.registry.scenes]},
        "api": {"url": api.url, "reachable": api.reachable, "ready": api.ready, "scenes": api.scene_states,
                "replicas": (api.models or {}).get("replicas"), "refused": (api.models or {}).get("refused"),
                "fallback": share, "error": api.error},
        "thresholds": {**{k: v for k, v in asdict(report.thresholds).items() if k != "require"},
                       "require": sorted(report.thresholds.require)},
    }


def report_json(report) -> str:
    return json.dumps(report_dict(report), indent=2, sort_keys=False, default=str)


def checks_table(report) -> Table:
    snap = report.snapshot
    when = dt.datetime.fromtimestamp(snap.now, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    verdict = report.status.upper()
    table = Table(title=Text.assemble("streamrec status: ", (verdict, STYLES[report.status]),
                                      f"  ({snap.stack} stack, data dir {snap.data_dir}, {when})"),
                  title_justify="left", show_lines=False, pad_edge=False, expand=False)
    table.add_column("part", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("seen; why not ok, and what to do")
    for c in report.checks:
        seen = Text(c.summary)
        if c.reason:
            seen.append("\n-> " + c.reason, style=STYLES[c.status] if c.status == FAIL else "yellow")
        table.add_row(c.name, Text(c.status, style=STYLES[c.status]), seen)
    return table


def lag_table(snap: Snapshot) -> tuple[str, Table] | None:
    """(heading, table) of the partitions that lag, most lagging first; None when none does (the
    ingest.lag row says so)."""
    rows = lag_rows(snap)
    lagging = [r for r in rows if r["lag"] > 0]
    if not lagging:
        return None
    shown = lagging[:MAX_PARTITION_ROWS]
    title = f"consumer lag: {len(lagging)} of {len(rows)} partitions behind"
    if len(lagging) > len(shown):
        title += f" (the {len(shown)} most lagging shown)"
    table = Table(pad_edge=False)  # the heading is printed above it: a title would wrap to the narrow table
    for name in ("topic", "partition", "lag"):
        table.add_column(name, justify="right" if name != "topic" else "left")
    for r in shown:
        table.add_row(r["topic"], str(r["partition"]), str(r["lag"]))
    return title, table


def print_report(report, console: Console | None = None) -> None:
    console = console or Console()
    console.print(checks_table(report))
    if (lag := lag_table(report.snapshot)) is not None:
        console.print(lag[0])
        console.print(lag[1])
    console.print(f"exit status {report.exit_code}: " + ("healthy" if report.exit_code == 0 else
                  "unhealthy (" + ", ".join(c.name for c in report.checks if c.status == FAIL) + ")"))


__all__ = ["MAX_PARTITION_ROWS", "STYLES", "checks_table", "lag_rows", "lag_table", "print_report", "report_dict",
           "report_json"]
