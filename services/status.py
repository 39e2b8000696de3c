"""`streamrec status`: one screen that says whether streamrec is healthy, and a probe (its exit status).

It reads what the parts already publish -- nothing is started, nothing is written:

* **stack**: the broker and Redis, configured (`KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL`) or the
  embedded ones recorded in `<data_dir>/stack/stack.json` (never started by `status`), and whether
  each answers;
* **ingest**: `GET /metrics` of every `streamrec ingest` (default `http://127.0.0.1:<STREAMREC_INGEST_METRICS_PORT>`,
  or `--ingest-metrics URL`, repeatable): partitions held, consumer lag per partition, last commit;
* **features**: the feature store's live manifest and `<data_dir>/metrics/features.prom`;
* **registry**: the live adapter of every scene (and `train-<scene>.prom`: gate refusals in a row,
  the last run's outcome);
* **api**: `GET /readyz`, `GET /v1/models` (the versions every replica serves, refused versions) and
  `GET /metrics` (the fallback share) of the API (default `http://127.0.0.1:<STREAMREC_SERVE_PORT>`,
  or `--api URL`).

Every check ends ok, warn or fail, with the reason when it is not ok (`services/status_model.py`).

**Exit status**: 0 when no check fails (warnings included), 1 when one does, 2 on bad usage (an
unknown option or part name, a bad setting).

**Missing vs. unhealthy -- the decisions.** A part that is not there (nothing answers, nothing
published yet) is reported as such, never as a traceback. Whether that fails is `--require`'s
choice: a required part that is missing fails, any other missing part warns. The default requires
`broker,redis,ingest,api`, the always-on processes of a deployment (what `streamrec up` runs);
`features` and `registry` are batch outputs that a fresh deployment does not have yet, so their
absence only warns unless required. A part that is there but unhealthy fails whatever `--require`
says:

* ingest: a partition's lag above `--max-lag` records; no commit for `--max-commit-age-s` while
  records wait (an idle consumer with nothing to commit is fine: no commit is expected then);
* features: `features.prom` says the last success is older than `--max-features-age-s` (without
  that file only the manifest's age is known, which also grows when no event arrives: a warning);
  an unreadable manifest or metrics file;
* registry: unreadable; a live scene on the popular/trending fallback on the answering replica;
* api: more than `--max-fallback-share` of the answers since the replica started came from the
  fallback (judged from `MIN_FALLBACK_REQUESTS` answers on).

Warnings (no effect on the exit status): a replica serving another version than the live one and not
pinned to it (loading, or the live one was refused), versions a replica refused, the gate refusing
`--max-gate-refusals` runs in a row, the last training or feature run failed, the API not ready yet.

Known limits: lag from ingest's fetch metadata under-reports on the embedded broker (see the metric's
HELP text); the API's metrics come from whichever replica the proxy routes `GET /metrics` to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import typer

from services.status_model import (
    API, BROKER, FAIL, FEATURES, INGEST, OK, PARTS, REDIS, REGISTRY, WARN, ApiObs, Check, Endpoint, FeaturesObs,
    RegistryObs, SceneObs, Scrape, Snapshot, fmt_age, worst,
)

# --- thresholds (the defaults of the options) ---------------------------------------------------
MAX_LAG_RECORDS = 10_000
"""A partition further behind than this many records fails (--max-lag)."""
MAX_COMMIT_AGE_S = 300.0
"""No commit for this many seconds while records wait fails (--max-commit-age-s): ingest commits
every STREAMREC_LOG_FLUSH_INTERVAL_S (2 s) under traffic, so minutes mean it is stuck."""
MAX_FEATURES_AGE_S = 1800.0
"""The feature job's last success older than this fails (--max-features-age-s): 30 runs of the
default STREAMREC_FEATURES_INTERVAL_S (60 s)."""
MAX_FALLBACK_SHARE = 0.2
"""More than this share of the answers from the fallback fails (--max-fallback-share)."""
MIN_FALLBACK_REQUESTS = 20
"""Fewer answers than this are too few to judge the fallback share (a warm-up request or two)."""
MAX_GATE_REFUSALS = 3
"""This many gate refusals in a row warns (--max-gate-refusals)."""
DEFAULT_REQUIRE = (BROKER, REDIS, INGEST, API)
"""The parts whose absence fails by default: the always-on processes (see the module docstring)."""

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
RECOMMEND_ROUTES = ("GET /v1/recommendations", "POST /v1/recommendations")  # services/serve_app.py's route labels


@dataclass(frozen=True)
class Thresholds:
    max_lag: int = MAX_LAG_RECORDS
    max_commit_age_s: float = MAX_COMMIT_AGE_S
    max_features_age_s: float = MAX_FEATURES_AGE_S
    max_fallback_share: float = MAX_FALLBACK_SHARE
    min_fallback_requests: int = MIN_FALLBACK_REQUESTS
    max_gate_refusals: int = MAX_GATE_REFUSALS
    require: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_REQUIRE))

    def missing(self, part: str) -> str:
        """The status of `part` when it is not there: FAIL when required, else WARN."""
        return FAIL if part in self.require else WARN


def parse_require(text: str) -> frozenset[str]:
    """`--require broker,redis,ingest`: the parts named (`none` for none); ValueError naming an unknown one."""
    names = {p.strip().lower() for p in text.split(",") if p.strip()}
    if names == {"none"}:
        return frozenset()
    unknown = sorted(names - set(PARTS))
    if unknown:
        raise ValueError(f"--require {text!r}: unknown part(s) {', '.join(unknown)}; choose from "
                         f"{','.join(PARTS)} (or none)")
    return frozenset(names)


# --- verdicts (pure: a Snapshot in, Checks out) ---------------------------------------------------
def check_endpoint(name: str, ep: Endpoint, t: Thresholds) -> Check:
    where = f"{ep.origin} {ep.address}" if ep.address else f"{ep.origin}: not running"
    if ep.reachable:
        return Check(name, OK, f"{where} answers" + (f" ({ep.detail})" if ep.detail else ""))
    if ep.origin == "embedded":
        fix = "`streamrec stack start` (or `streamrec up`) starts the embedded stack"
    else:
        var = "KAFKA_BOOTSTRAP_SERVERS" if name == BROKER else "REDIS_URL"
        fix = f"check that the server runs and that {var} names it"
    return Check(name, t.missing(name), where if not ep.address else f"{where}: no answer",
                 f"{ep.detail}; {fix}" if ep.detail else fix)


def _lag_by_partition(scrapes: list[Scrape]) -> dict[tuple[str, str], float]:
    lag: dict[tuple[str, str], float] = {}
    for s in scrapes:
        for labels, v in s.metrics.select("streamrec_ingest_consumer_lag"):
            key = (labels.get("topic", "?"), labels.get("partition", "?"))
            lag[key] = max(v, lag.get(key, 0.0))  # a partition reported twice (mid-rebalance): the worse
    return lag


def commit_age(scrape: Scrape, now: float) -> float | None:
    """Seconds since the scraped consumer's last commit (since its start before the first)."""
    m = scrape.metrics
    age = m.value("streamrec_ingest_seconds_since_last_commit")
    if age is None:
        ts = m.value("streamrec_ingest_last_commit_timestamp_seconds")
        age = now - ts if ts else None
    return age


def check_ingest(snap: Snapshot, t: Thresholds) -> list[Check]:
    up = [s for s in snap.ingest if s.metrics is not None]
    down = [s for s in snap.ingest if s.metrics is None]
    if not up:
        why = "; ".join(f"{s.url}: {s.error}" for s in down) or "no --ingest-metrics URL"
        return [Check(INGEST, t.missing(INGEST), "not running: no ingest metrics answer",
                      f"{why}; start `streamrec ingest` (or `streamrec up`), or point --ingest-metrics at it")]
    held = sum(s.metrics.value("streamrec_ingest_assigned_partitions") or 0 for s in up)
    consumed = sum(s.metrics.value("streamrec_ingest_records_total") or 0 for s in up)
    dlq = sum(s.metrics.value("streamrec_ingest_dlq_records_total") or 0 for s in up)
    reasons = [f"{s.url} does not answer ({s.error})" for s in down]
    if held == 0:
        reasons.append("holds no partition (more consumers than partitions, or a rebalance in progress)")
    return [Check(INGEST, WARN if reasons else OK,
                  f"{len(up)} consumer(s), {held:.0f} partition(s), {consumed:.0f} records, {dlq:.0f} to the DLQ",
                  "; ".join(reasons)),
            _check_lag(up, snap.broker.origin == "embedded", t), _check_commit(up, snap.now, t)]


def _check_lag(up: list[Scrape], embedded: bool, t: Thresholds) -> Check:
    lag = _lag_by_partition(up)
    if not lag:
        return Check(f"{INGEST}.lag", WARN, "no partition lag reported",
                     "no partition assigned yet (the first poll assigns them)")
    (topic, part), top = max(lag.items(), key=lambda kv: kv[1])
    summary = f"{sum(lag.values()):.0f} records behind over {len(lag)} partition(s), at most {top:.0f} ({topic}[{part}])"
    if embedded:
        summary += " (the embedded broker under-reports lag)"
    bad = top > t.max_lag
    return Check(f"{INGEST}.lag", FAIL if bad else OK, summary,
                 f"{topic}[{part}] is {top:.0f} records behind (limit --max-lag {t.max_lag}): "
                 "add consumers (up to the partition count) or find what slows ingest" if bad else "")


def _check_commit(up: list[Scrape], now: float, t: Thresholds) -> Check:
    status, worst_age, reasons = OK, None, []
    for s in up:
        age = commit_age(s, now)
        if age is None:
            status = worst([status, WARN])
            reasons.append(f"{s.url} exports no commit time")
            continue
        worst_age = age if worst_age is None else max(worst_age, age)
        waiting = sum(v for _, v in s.metrics.select("streamrec_ingest_consumer_lag"))
        if age > t.max_commit_age_s and waiting > 0:
            status = FAIL
            reasons.append(f"no commit for {fmt_age(age)} while {waiting:.0f} records wait (limit "
                           f"--max-commit-age-s {t.max_commit_age_s:g}): ingest is stuck; its log says why")
    never = all(not (s.metrics.value("streamrec_ingest_last_commit_timestamp_seconds") or 0) for s in up)
    summary = ("no commit yet" + (f" ({fmt_age(worst_age)} since start)" if worst_age is not None else "") if never
               else f"last commit {fmt_age(worst_age)} ago")
    if status == OK and worst_age is not None and worst_age > t.max_commit_age_s:
        summary += " (idle: nothing waits)"
    return Check(f"{INGEST}.commit", status, summary, "; ".join(reasons))


def check_features(f: FeaturesObs, now: float, t: Thresholds) -> Check:
    if f.error:
        return Check(FEATURES, FAIL, "unreadable", f.error)
    prom = f.prom
    version = f.manifest_version
    if version is None and prom is not None and (v := prom.value("streamrec_features_version")):
        version = int(v)
    made = f" (made {fmt_age(now - f.manifest_created_at)} ago)" if f.manifest_created_at else ""
    if prom is None and version is None:
        return Check(FEATURES, t.missing(FEATURES), "no feature version yet",
                     "`streamrec features` (or ingest's timer, STREAMREC_FEATURES_INTERVAL_S) makes the first")
    if prom is None:
        age = now - f.manifest_created_at if f.manifest_created_at else None
        stale = age is not None and age > t.max_features_age_s
        return Check(FEATURES, WARN if stale else OK, f"version {version}{made}",
                     f"older than --max-features-age-s {t.max_features_age_s:g}; without {f.prom_path} an idle "
                     "job (no new events) cannot be told from a stopped one" if stale else "")
    last_ok = prom.value("streamrec_features_last_success_timestamp_seconds") or 0
    last_run = prom.value("streamrec_features_last_run_timestamp_seconds") or 0
    run_ok = prom.value("streamrec_features_last_run_ok")
    run = f"last run {'ok' if run_ok != 0 else 'FAILED'} {fmt_age(now - last_run)} ago" if last_run else "never ran"
    summary = f"version {version if version is not None else '-'}{made}, {run}"
    if not last_ok:
        return Check(FEATURES, t.missing(FEATURES), summary, "the feature job never succeeded: see its log "
                     "(`streamrec features` prints the error)")
    age = now - last_ok
    if age > t.max_features_age_s:
        return Check(FEATURES, FAIL, summary, f"last success {fmt_age(age)} ago (limit --max-features-age-s "
                     f"{t.max_features_age_s:g}): is ingest's feature timer or the features CronJob running?")
    if run_ok == 0:
        return Check(FEATURES, WARN, summary, f"the last run failed; the last success was {fmt_age(age)} ago")
    return Check(FEATURES, OK, summary)


def _scene_check(sc: SceneObs, api: ApiObs, now: float, t: Thresholds) -> Check:
    parts: list[str] = []
    found: list[tuple[str, str]] = []  # (status, reason)
    live = sc.live_version
    age = f", {fmt_age(now - sc.created_at)} old" if sc.created_at else ""
    ndcg = f", val NDCG@10 {sc.val_ndcg10:.4f}" if sc.val_ndcg10 is not None else ""
    parts.append(f"live {live}{age}{ndcg}")
    if api.models is not None:
        replicas = api.models.get("replicas") or {}
        serving = {rid: (view.get("scenes") or {}).get(sc.scene) for rid, view in replicas.items()}
        pinned = {rid for rid, view in replicas.items() if (view.get("pins") or {}).get(sc.scene)}
        parts.append("replicas " + (", ".join(f"{rid}={v or '-'}{' (pinned)' if rid in pinned else ''}"
                                              for rid, v in sorted(serving.items())) or "none"))
        behind = sorted(rid for rid, v in serving.items() if v != live and rid not in pinned)
        if serving and not any(serving.values()):
            found.append((WARN, "no replica serves it yet"))
        elif behind:
            found.append((WARN, f"replica(s) {', '.join(behind)} do not serve the live {live} "
                                "(still loading it, or they refused it)"))
        refused = (api.models.get("refused") or {}).get(sc.scene)
        if refused:
            parts.append(f"refused {','.join(refused)}")
            found.append((WARN, f"refused {', '.join(refused)} (a broken version never serves: publish a fixed "
                                f"one or `streamrec registry rollback {sc.scene}`)"))
    state = api.scene_states.get(sc.scene) or {}
    if state.get("state") == "fallback":
        found.append((FAIL, "answers come from the popular/trending fallback: "
                            f"{state.get('reason') or 'no version of it loads'}"))
    if sc.train is not None:
        refusals = sc.train.value("streamrec_train_gate_refusals_in_a_row", scene=sc.scene) or 0
        if refusals:
            parts.append(f"gate refused {refusals:.0f} in a row")
        if refusals >= t.max_gate_refusals:
            found.append((WARN, f"the gate refused the last {refusals:.0f} runs (limit --max-gate-refusals "
                                f"{t.max_gate_refusals}): see evaluation.md in the runs' directories"))
        if sc.train.value("streamrec_train_last_outcome", scene=sc.scene, outcome="failed") == 1:
            found.append((WARN, "the last training run failed: see the trainer's log"))
    return Check(f"scene:{sc.scene}", worst(s for s, _ in found), "; ".join(parts), "; ".join(r for _, r in found))


def check_registry(reg: RegistryObs, api: ApiObs, now: float, t: Thresholds) -> list[Check]:
    if reg.error:
        return [Check(REGISTRY, FAIL, f"{reg.root}: unreadable", reg.error)]
    if not reg.scenes:
        return [Check(REGISTRY, t.missing(REGISTRY), f"{reg.root}: no adapter published",
                      "`streamrec train` (or the trainer of `streamrec up`) publishes the first")]
    return [Check(REGISTRY, OK, f"{len(reg.scenes)} scene(s) in {reg.root}")] + \
        [_scene_check(sc, api, now, t) for sc in reg.scenes]


def fallback_share(api: ApiObs) -> tuple[float, float] | None:
    """(fallback answers, all answers) from the API's metrics, or None when it exports neither."""
    m = api.metrics
    if m is None:
        return None
    if m.has("streamrec_recommendations_total"):
        return (m.value("streamrec_recommendations_total", source="fallback") or 0.0,
                m.value("streamrec_recommendations_total") or 0.0)
    if not m.has("streamrec_requests_total"):
        return None
    # Before streamrec_recommendations_total: fallback answers over the recommendation routes' 200s
    # (a fallback is answered with a 200).
    total = sum(m.value("streamrec_requests_total", route=r, status="200") or 0.0 for r in RECOMMEND_ROUTES)
    return m.value("streamrec_fallbacks_total") or 0.0, total


def check_api(api: ApiObs, t: Thresholds) -> list[Check]:
    if not api.reachable:
        return [Check(API, t.missing(API), f"{api.url}: no answer",
                      f"{api.error}; start `streamrec serve` (or `streamrec up`), or point --api at it")]
    replicas = len((api.models or {}).get("replicas") or {})
    reasons = []
    if api.ready is False:
        loading = [s for s, st in api.scene_states.items() if st.get("state") == "loading"]
        reasons.append("not ready" + (f": loading {', '.join(sorted(loading))}" if loading else ""))
    if api.error:
        reasons.append(api.error)
    summary = f"{api.url} {'ready' if api.ready else 'not ready'}" + (f", {replicas} replica(s)" if api.models else "")
    checks = [Check(API, WARN if reasons else OK, summary, "; ".join(reasons))]
    share = fallback_share(api)
    if share is not None:
        fb, total = share
        if total < t.min_fallback_requests:
            checks.append(Check(f"{API}.fallback", OK, f"{fb:.0f} of {total:.0f} answers from the fallback (too few to judge)"))
        else:
            ratio = fb / total
            bad = ratio > t.max_fallback_share
            checks.append(Check(f"{API}.fallback", FAIL if bad else OK,
                                f"{ratio:.1%} of {total:.0f} answers from the fallback",
                                f"above --max-fallback-share {t.max_fallback_share:g}: Redis down, a scene without a "
                                "loadable adapter, or a model error (streamrec_fallbacks_total{kind} and the scene "
                                "rows say which)" if bad else ""))
    return checks


def evaluate(snap: Snapshot, t: Thresholds) -> list[Check]:
    """Every check of `snap`, in screen order."""
    return [check_endpoint(BROKER, snap.broker, t), check_endpoint(REDIS, snap.redis, t),
            *check_ingest(snap, t), check_features(snap.features, snap.now, t),
            *check_registry(snap.registry, snap.api, snap.now, t), *check_api(snap.api, t)]


@dataclass(frozen=True)
class Report:
    snapshot: Snapshot
    checks: list[Check]
    thresholds: Thresholds

    @property
    def status(self) -> str:
        return worst(c.status for c in self.checks)

    @property
    def exit_code(self) -> int:
        return EXIT_UNHEALTHY if self.status == FAIL else EXIT_HEALTHY


# --- the command ------------------------------------------------------------------------------------
def status(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (checks + what was seen) instead of the table."),
    ingest_metrics: Optional[list[str]] = typer.Option(
        None, "--ingest-metrics", metavar="URL",
        help="GET /metrics of a `streamrec ingest` (repeat for several consumers; default: "
        "http://127.0.0.1:<STREAMREC_INGEST_METRICS_PORT>/metrics)."),
    api_url: Optional[str] = typer.Option(None, "--api", metavar="URL",
                                          help="Base URL of the HTTP API (default: http://127.0.0.1:<STREAMREC_SERVE_PORT>)."),
    require: str = typer.Option(",".join(DEFAULT_REQUIRE), help=f"Parts that fail when missing (others only warn): "
                                f"comma-separated from {','.join(PARTS)}, or none."),
    max_lag: int = typer.Option(MAX_LAG_RECORDS, min=0, help="Fail when a partition is more records behind than this."),
    max_commit_age_s: float = typer.Option(MAX_COMMIT_AGE_S, min=0, help="Fail when ingest has not committed for this "
                                           "many seconds while records wait."),
    max_features_age_s: float = typer.Option(MAX_FEATURES_AGE_S, min=0, help="Fail when the feature job's last "
                                             "success is older than this many seconds."),
    max_fallback_share: float = typer.Option(MAX_FALLBACK_SHARE, min=0, max=1, help="Fail when a larger share of the "
                                             "API's answers came from the fallback."),
    max_gate_refusals: int = typer.Option(MAX_GATE_REFUSALS, min=1, help="Warn when the gate refused this many "
                                          "training runs of a scene in a row."),
    timeout_s: float = typer.Option(2.0, min=0.1, max=60, help="Longest wait for each part to answer."),
) -> None:
    """One screen: the stack, ingest's lag and last commit, the feature version and its age, the live adapter
    per scene and what each replica serves, refused versions, the fallback share. Each check is ok, warn or fail.

    Exit status: 0 healthy (no check fails; warnings allowed), 1 a check fails (usable as a probe), 2 bad usage.

    A missing part fails when --require names it, else warns. Starts nothing: an embedded stack that
    is not running is reported, not started.
    """
    from services.cli_common import fail, settings_or_exit
    from services.status_sources import SourceOptions, gather
    from services.status_view import print_report, report_json

    settings = settings_or_exit()
    try:
        required = parse_require(require)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    thresholds = Thresholds(max_lag=max_lag, max_commit_age_s=max_commit_age_s, max_features_age_s=max_features_age_s,
                            max_fallback_share=max_fallback_share, max_gate_refusals=max_gate_refusals,
                            require=required)
    snap = gather(settings, SourceOptions(ingest_urls=tuple(ingest_metrics or ()), api_url=api_url, timeout_s=timeout_s))
    report = Report(snap, evaluate(snap, thresholds), thresholds)
    if as_json:
        typer.echo(report_json(report))
    else:
        print_report(report)
    raise typer.Exit(report.exit_code)


__all__ = ["DEFAULT_REQUIRE", "EXIT_HEALTHY", "EXIT_UNHEALTHY", "EXIT_USAGE", "MAX_COMMIT_AGE_S",
           "MAX_FALLBACK_SHARE", "MAX_FEATURES_AGE_S", "MAX_GATE_REFUSALS", "MAX_LAG_RECORDS", "MIN_FALLBACK_REQUESTS",
           "RECOMMEND_ROUTES", "Report", "Thresholds", "check_api", "check_endpoint", "check_features", "check_ingest",
           "check_registry", "commit_age", "evaluate", "fallback_share", "parse_require", "status"]
