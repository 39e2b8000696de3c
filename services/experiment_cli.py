"""`streamrec experiment ...`: online experiments between adapter versions of a scene.

    streamrec experiment start SCENE --candidate VERSION --percent 10 [--candidate V2 --percent 5]
    streamrec experiment status SCENE [--json]     # per variant: impressions, clicks, CTR, difference, p-value
    streamrec experiment stop SCENE                # everyone back to control (the live version)
    streamrec experiment promote SCENE [--version V]   # make the candidate live and end the experiment
    streamrec experiment review SCENE              # decide a canary once (what the continuous trainer does)

The experiment's state is `registry/<scene>/EXPERIMENT.json` (training/experiments.py): API replicas
follow it within seconds, without a restart. The counts come from the click attribution
(streaming/features/attribution.py, refreshed by the feature job); the statistics from
training/experiment_stats.py (training/experiment_report.py puts them together).
Exit status: 0 on success, 1 for an experiment or registry error (unknown scene or version, the
live version as a candidate, a share out of range, an experiment already running; the message
names the value), 2 for a configuration error. Mounted in `services/cli.py` with
``app.add_typer(experiment_app, name="experiment")``.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional

import typer

from services.cli_common import EXIT_CONFIG, fail, settings_or_exit
from streaming.settings import Settings
from training import experiments
from training.experiment_report import AttributionReader, experiment_report, read_experiment_attribution
from training.experiments import CONTROL
from training.registry import Registry, RegistryError

LOG_SHOWN = 5  # experiment log entries `status` shows when no experiment runs

STATUS_HELP = "\n\n".join([  # one string per paragraph: the help reflows them
    ('Per variant (control, then each candidate): the version(s) that answered, the share of users, '
     'IMPRESSIONS (recommendation answers shown), CLICKED (impressions with at least one click attributed to '
     'them within STREAMREC_ATTRIBUTION_WINDOW_S), CLICKS (all attributed clicks), CTR = CLICKED / IMPRESSIONS '
     "with its 95% Wilson interval, and for a candidate DIFF = its CTR - control's with the 95% interval of "
     'the difference and the P-VALUE of a two-sided two-proportion z-test.'),
    ('How to read it: the p-value and the intervals are fixed-horizon figures -- valid when read once, at a '
     'sample size chosen in advance. Looked at again and again, some experiment will eventually show p < 0.05 '
     "by chance; decide on a size first, or use the canary's line. A candidate whose whole DIFF interval lies "
     'below 0 is worse than control; one whose interval straddles 0 is not shown to differ (not shown to be '
     "equal: look at the interval's width)."),
    ("For a canary (the continuous trainer's experiment, STREAMREC_CANARY_PERCENT) a further line gives the "
     'always-valid interval of the difference (valid at every look: the trainer looks every few seconds) and '
     "the canary rule's current verdict: rollback as soon as that interval is below 0; at "
     "STREAMREC_CANARY_MIN_IMPRESSIONS promote when the canary's CTR is at least (1 - STREAMREC_CANARY_MARGIN) "
     "x control's, else rollback; wait until then. The last line counts the clicks not in the table: late "
     '(after the attribution window), early (before their impression: clock skew), orphan (no impression '
     'has their request id) and unshown (on an item the answer did not show).'),
])


def _registry(settings: Settings) -> Registry:
    try:
        return Registry(settings.registry_uri)
    except RegistryError as exc:  # an unusable root is a configuration error
        raise fail(f"STREAMREC_REGISTRY_ROOT: {exc}", EXIT_CONFIG) from None


def _known_scene(registry: Registry, scene: str) -> None:
    """Exit 1 naming `scene` when it has no published version (or is no valid name)."""
    if registry.pointer(scene) is None:
        known = registry.scenes()
        raise RegistryError(f"unknown scene {scene!r} in {registry.root} (known: {', '.join(known) or 'none'})")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _interval(pair: list | None, signed: bool = False) -> str:
    if pair is None:
        return "-"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"[{fmt.format(pair[0])}, {fmt.format(pair[1])}]"


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def render_status(report: dict[str, Any]) -> list[str]:
    """The `status` table of an experiment report (training/experiment_report.py), as lines."""
    exp = report["experiment"]
    lines = [f"experiment {exp['id']} ({exp['kind']}) on scene {exp['scene']}, started {exp['started_at']}; "
             f"control started as {exp['control']}"]
    header = ("VARIANT", "VERSION", "SHARE", "IMPRESSIONS", "CLICKED", "CLICKS", "CTR", "CTR 95% CI",
              "DIFF", "DIFF 95% CI", "P-VALUE")
    table = [header]
    for r in report["variants"]:
        table.append((r["variant"], ",".join(r["versions"]) or "-", f"{r['percent']:g}%", str(r["impressions"]),
                      str(r["clicked"]), str(r["clicks"]), _pct(r["ctr"]), _interval(r["ctr_ci95"]),
                      "-" if r["diff"] is None else f"{r['diff']:+.4f}", _interval(r["diff_ci95"], signed=True),
                      _p(r["p_value"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    canary = report["canary"]
    if canary is not None:
        # the rule's reason carries the always-valid interval of the difference
        lines.append(f"canary {canary['candidate']}: verdict {canary['verdict']}: {canary['reason']}")
    lines.append(f"clicks not counted above: {report['late_clicks']} late (after the attribution window), "
                 f"{report['early_clicks']} early (before their impression), {report['orphan_clicks']} without an "
                 f"impression, {report['unshown_clicks']} on an item the answer did not show")
    return lines


def make_experiment_app(read: AttributionReader | None = None) -> typer.Typer:
    """The `experiment` command group; `read`: the attribution reader (default
    streaming.features.attribution.read_attribution; tests give a fake)."""
    app = typer.Typer(help="Online experiments between adapter versions of a scene: start, status, stop, promote.",
                      no_args_is_help=True)

    @app.command("start")
    def start(
        scene: str = typer.Argument(..., help="The scene."),
        candidate: List[str] = typer.Option(..., "--candidate", help="A published version that is not live "
                                            "(repeat with --percent for several candidates)."),
        percent: List[float] = typer.Option(..., "--percent", help="Its share of the scene's users, in percent "
                                            "(one per --candidate, in the same order; at most 90 in all)."),
    ) -> None:
        """Split the scene's users between control (the live version) and candidates, sticky by user.
        Replicas follow within seconds; `streamrec experiment status SCENE` shows the counts."""
        settings = settings_or_exit()
        registry = _registry(settings)
        try:
            if len(candidate) != len(percent):
                raise RegistryError(f"{len(candidate)} --candidate and {len(percent)} --percent: give one --percent "
                                    "per --candidate, in the same order")
            twice = sorted({v for v in candidate if candidate.count(v) > 1})
            if twice:
                raise RegistryError(f"--candidate {twice[0]} is given more than once")
            _known_scene(registry, scene)
            exp = experiments.start(registry, scene, dict(zip(candidate, percent)))
        except RegistryError as exc:
            raise fail(str(exc)) from None
        shares = ", ".join(f"{v} {p:g}%" for v, p in exp.candidates.items())
        typer.echo(f"{scene}: experiment {exp.id} started: {shares}; control ({exp.control}, the live version) "
                   f"{100 - sum(exp.candidates.values()):g}%")

    @app.command("status", help=f"Print the scene's experiment, one row per variant.\n\n{STATUS_HELP}")
    def status(
        scene: str = typer.Argument(..., help="The scene."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON (the same figures, unrounded)."),
    ) -> None:
        settings = settings_or_exit()
        registry = _registry(settings)
        try:
            _known_scene(registry, scene)
            state = experiments.read(registry, scene)
            live = registry.current(scene)
        except RegistryError as exc:
            raise fail(str(exc)) from None
        exp = state.active
        if exp is None:
            if as_json:
                typer.echo(json.dumps({"scene": scene, "active": None, "log": state.log[:LOG_SHOWN]}, indent=2))
                return
            typer.echo(f"scene {scene!r} runs no experiment (live: {live.version if live else None})")
            for entry in state.log[:LOG_SHOWN]:
                typer.echo(f"  {entry.get('at')}  {entry.get('action')}  {entry.get('id')}: {entry.get('detail')}")
            return
        try:
            attribution = read_experiment_attribution(settings, exp, read)
        except Exception as exc:  # the log unreadable now: say which part failed, not a traceback
            raise fail(f"cannot read the click attribution of {exp.id!r} ({type(exc).__name__}: {exc})") from None
        report = experiment_report(settings, exp, attribution, live=live.version if live else None)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        for line in render_status(report):
            typer.echo(line)

    @app.command("stop")
    def stop(
        scene: str = typer.Argument(..., help="The scene."),
        reason: str = typer.Option("stopped by hand (streamrec experiment stop)", "--reason",
                                   help="Why, kept in the experiment log."),
    ) -> None:
        """End the scene's experiment: control (the live version) serves everyone again; the candidates
        stay published, not live."""
        settings = settings_or_exit()
        registry = _registry(settings)
        try:
            _known_scene(registry, scene)
            exp = experiments.end(registry, scene, "stop", reason)
        except RegistryError as exc:
            raise fail(str(exc)) from None
        typer.echo(f"{scene}: experiment {exp.id} stopped; {CONTROL} serves everyone")

    @app.command("promote")
    def promote(
        scene: str = typer.Argument(..., help="The scene."),
        version: Optional[str] = typer.Option(None, "--version", help="The candidate to make live (default: "
                                              "the experiment's only candidate)."),
        reason: str = typer.Option("promoted by hand (streamrec experiment promote)", "--reason",
                                   help="Why, kept in the experiment log and the registry pointer's log."),
    ) -> None:
        """Make a candidate the live version (verified first) and end the experiment. `streamrec registry
        rollback SCENE` undoes it."""
        settings = settings_or_exit()
        registry = _registry(settings)
        try:
            _known_scene(registry, scene)
            before = registry.current(scene)
            exp = experiments.promote(registry, scene, version, reason)
            after = registry.current(scene)
        except RegistryError as exc:
            raise fail(str(exc)) from None
        typer.echo(f"{scene}: {before.version if before else None} -> {after.version if after else None} live; "
                   f"experiment {exp.id} ended")

    @app.command("review")
    def review(scene: str = typer.Argument(..., help="The scene.")) -> None:
        """Decide the scene's canary once, as the continuous trainer does at its checks: promote, roll
        back, or wait (for a scheduler where no `streamrec train-loop` runs). Records the decision in the
        experiment log and the canary metrics (canary-<scene>.prom). Exit 0 whatever the verdict."""
        from training.canary import review_canary

        settings = settings_or_exit()
        registry = _registry(settings)
        try:
            _known_scene(registry, scene)
            decision = review_canary(settings, registry, scene, read=read)
        except RegistryError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:  # the log unreadable now: say which part failed, not a traceback
            raise fail(f"cannot review the canary of {scene!r} ({type(exc).__name__}: {exc})") from None
        if decision is None:
            typer.echo(f"scene {scene!r} runs no canary")
            return
        typer.echo(f"{scene}: {decision.action}: {decision.reason}")

    return app


experiment_app = make_experiment_app()

__all__ = ["LOG_SHOWN", "STATUS_HELP", "experiment_app", "make_experiment_app", "render_status"]
