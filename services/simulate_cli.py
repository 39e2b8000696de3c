"""`streamrec simulate`: the command around services/simulate.py (options, exit statuses, the report).

Exit 0 when the run finished (whatever the CTR); 1 when the API is unreachable (the message names the
URL) or no request got an answer; 2 for a bad option or dataset spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from services.cli_common import (
    EXIT_CONFIG,
    fail,
    guard,
    settings_or_exit,
    setup_logging,
    with_stack,
)
from services.simulate import (
    DEFAULT_BUCKET,
    DEFAULT_CONCURRENCY,
    DEFAULT_K,
    DEFAULT_REQUESTS,
    SimConfig,
    SimReport,
    SimulateError,
    check_api,
    run_simulation,
)

DEFAULT_DATASET = "synthetic"


def render(report: SimReport) -> str:
    """The report as text: totals, CTR over time, per version, per position."""
    lines = [f"{report.impressions:,} impressions ({report.requests:,} requests, "
             f"{sum(report.errors.values()):,} without an answer), {report.clicked:,} clicked, "
             f"{report.clicks:,} clicks: CTR {report.ctr:.4f} in {report.seconds:.1f} s",
             "CTR over time (answers: CTR of the bucket):"]
    lines += [f"  {b['answers']:>7,}: {b['ctr']:.4f}" for b in report.ctr_over_time]
    lines.append("by answering version: " + ", ".join(
        f"{label} {v['ctr']:.4f} ({v['impressions']:,})" for label, v in sorted(report.by_version.items())))
    lines.append("click rate by position: " + ", ".join(f"{p['position']}: {p['rate']:.3f}" for p in report.by_position))
    if report.errors:
        lines.append("errors: " + ", ".join(f"{k} x{n}" for k, n in sorted(report.errors.items())))
    if report.no_request_id:
        lines.append(f"{report.no_request_id:,} answers carried no request_id: their clicks cannot be attributed")
    if report.events_failed:
        lines.append(f"{report.events_failed:,} of {report.events_sent:,} click events failed to send")
    return "\n".join(lines)


def simulate(
    dataset: str = typer.Option(DEFAULT_DATASET, "--dataset", help="The synthetic dataset the stack was fed "
                                "(`synthetic[:k=v,...]`, the spec given to `produce`/`up`): its truth gives the users' tastes."),
    users: int | None = typer.Option(None, "--users", help="Simulate the first N users of the dataset (default: all)."),
    requests_n: int | None = typer.Option(DEFAULT_REQUESTS, "--requests", help="Requests to make (0: until --duration)."),
    duration: float | None = typer.Option(None, "--duration", help="Stop after this many seconds (with --requests: "
                                             "whichever comes first)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the users' plan and every click draw."),
    api_url: str | None = typer.Option(None, "--api-url", help="The API (default http://127.0.0.1:STREAMREC_SERVE_PORT)."),
    scene: str = typer.Option("default", "--scene", help="Scene asked for."),
    k: int = typer.Option(DEFAULT_K, "--k", help="Items per answer."),
    concurrency: int = typer.Option(DEFAULT_CONCURRENCY, "--concurrency", help="Requests in flight."),
    rate: float | None = typer.Option(None, "--rate", help="Requests/s (default: as fast as answered; with API keys "
                                         "set, under STREAMREC_RATE_LIMIT_RPS)."),
    bucket: int = typer.Option(DEFAULT_BUCKET, "--bucket", help="Answers per point of the CTR-over-time series."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON here (`-`: stdout)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Simulated users of a synthetic dataset request recommendations from the running API, click by
    their true tastes with a position bias, and send their clicks (with request_id and position) to
    Kafka; prints the CTR over time (services/simulate.py defines the click model and the CTR)."""
    setup_logging()
    from streaming.datasets import DatasetError
    from streaming.datasets.spec import parse_synthetic_spec
    from streaming.datasets.synthetic import synthetic_dataset

    try:
        ds = synthetic_dataset(parse_synthetic_spec(dataset))
    except DatasetError as exc:
        raise fail(f"--dataset {dataset!r}: {exc} (the simulator needs a synthetic dataset's truth)", EXIT_CONFIG) from None
    settings = settings_or_exit()
    url = api_url or f"http://127.0.0.1:{settings.serve_port}"
    cfg = SimConfig(users=users, requests=requests_n or None, seed=seed, scene=scene, k=k, concurrency=concurrency,
                    duration_s=duration, bucket=bucket, rate=rate)
    try:
        cfg.check(ds.config.n_users)
    except SimulateError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    try:
        check_api(url, scene)  # before the stack: an unreachable API is the likely mistake
    except SimulateError as exc:
        raise fail(str(exc)) from None
    settings = with_stack(settings)
    report = guard(lambda: run_simulation(settings, ds, cfg, url, progress=progress, check=False))
    typer.echo(render(report), err=json_out is not None and str(json_out) == "-")
    if json_out is not None:
        text = json.dumps(report.to_json(), indent=1)
        if str(json_out) == "-":
            typer.echo(text)
        else:
            json_out.write_text(text + "\n")
    if report.impressions == 0:
        raise fail(f"no request to {url} got an answer: {report.errors}")


__all__ = ["DEFAULT_DATASET", "render", "simulate"]
