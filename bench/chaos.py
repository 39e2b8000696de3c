"""The chaos suite (issue 15): each scenario breaks one part of the real embedded stack while traffic
flows, then counts what the fault cost.

    python bench/chaos.py --json bench/results/chaos.json [--scenario NAME ...] [--small]

Prints one row per scenario: requests sent, failed, events produced, lost, duplicated, recovery
seconds, and whether every property the scenario checks held (`ok`, else the problems below the
table). The JSON is {"scenarios": [{"name", "requests", "failed", "events", "lost", "duplicated",
"recovery_s", "problems", "notes"}, ...]}. Exit status 1 when any scenario found a problem.
The scenarios live in bench/chaos_scenarios/ (one module each, what they check in its docstring);
tests/test_chaos.py runs each at a small scale. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from bench.chaos_scenarios import SCENARIOS, ScenarioResult  # noqa: E402
from bench.chaos_scenarios.common import progress  # noqa: E402
from services.stack import EmbeddedStack  # noqa: E402

COLUMNS = ("scenario", "requests", "failed", "events", "lost", "duplicated", "recovery_s", "ok")
# --small: the scale tests/test_chaos.py uses, per scenario
SMALL = {"ingest-sigkill": {"kills": 5, "rate": 400.0}, "broker-restart": {"events": 300},
         "trainer-sigkill-in-publish": {"rounds": 1}, "feature-job-sigkill": {"events": 2000},
         "corrupt-parquet": {"events": 1200}, "train-worker-sigkill": {"epochs": 4},
         "disk-full": {"events": 5000},
         "redis-sigkill-serving": {"rate": 40.0, "clients": 4, "steady_s": 5.0, "outage_s": 10.0},
         "serve-replica-sigkill": {"rate": 40.0, "clients": 4, "steady_s": 10.0, "after_s": 10.0}}


def table(results: list[ScenarioResult]) -> str:
    rows = [COLUMNS] + [(r.name, r.requests, r.failed, r.events, r.lost, r.duplicated, f"{r.recovery_s:.1f}",
                         "ok" if not r.problems else f"{len(r.problems)} problem(s)") for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        lines += [f"{r.name}: {p}" for p in r.problems] + [f"{r.name}: note: {n}" for n in r.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="scenarios, in the order they run:\n  " + "\n  ".join(SCENARIOS))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only this one (repeatable)")
    parser.add_argument("--small", action="store_true", help="the tests' scale: quicker, same checks")
    parser.add_argument("--workdir", type=Path, help="keep the scenarios' data and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    names = [n for n in SCENARIOS if n in (args.scenario or SCENARIOS)]

    results = []
    with tempfile.TemporaryDirectory(prefix="streamrec-chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        with EmbeddedStack(workdir / "stack") as stack:
            for name in names:
                scenario_dir = workdir / name
                scenario_dir.mkdir(parents=True, exist_ok=True)
                progress(f"{name}: starting")
                t0 = time.monotonic()
                try:
                    result = SCENARIOS[name](stack.kafka_bootstrap, stack.redis_url, scenario_dir,
                                             **(SMALL.get(name, {}) if args.small else {}))
                except Exception as exc:  # a scenario that could not finish is a row with its reason
                    traceback.print_exc()
                    result = ScenarioResult(name, problems=[f"did not finish: {type(exc).__name__}: {exc}"])
                progress(f"{name}: done in {time.monotonic() - t0:.0f} s, "
                         f"{'ok' if not result.problems else result.problems}")
                results.append(result)
    print(table(results))
    print(f"(machine: {os.cpu_count()} cores; python {sys.version.split()[0]})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"scenarios": [r.as_json() for r in results]}, indent=2) + "\n")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
