"""The continuous trainer: an incremental training run whenever enough new data has arrived.

    streamrec train-loop --every 10m --preset quick     # what `streamrec up` runs; Ctrl-C stops

Each check (every `CHECK_INTERVAL_S`):

1. the feature job brings the tables up to date with the offline log (idempotent and file-locked,
   so this run and the ingest consumer's periodic one never publish the same data twice);
2. new events = events in the feature tables - events in the live adapter's data window;
3. when the schedule is due: train from scratch if the scene has no adapter yet (once at least
   `min_events` events are in), else incrementally from the live adapter (its data window ->
   the new events + a replay sample); publish through the gate (training/gate.py);
4. whatever the schedule: when the live adapter was trained on a user who asked to be forgotten,
   retrain from scratch within STREAMREC_FORGET_RETRAIN_S (training/forget_retrain.py).

Canaries (training/canary.py, `STREAMREC_CANARY_PERCENT` > 0): before anything else a check reviews
the scene's running canary (at most every `CANARY_REVIEW_S`) -- promote, roll back, or wait -- and
while a canary is undecided (or, with canary publishing on, any experiment runs on the scene) no new
run starts: the state is "canary" (or "waiting"). A forget retrain still runs, and stops the canary.

The schedule (`parse_every`): `10m` (also `90s`, `1h`; a bare number is minutes) trains at most
that often and only when there are new events; `5000events` trains once that many events arrived
since the last attempt. A run ends as `streamrec train`'s do (training/train_run.py): too little
data (`NotEnoughData`) is "waiting", not a failure; a candidate the gate refuses leaves the live
adapter serving, and the next attempt waits for the next period or batch of events (not the next
check: retrying on the same data would refuse again); anything else raised is a failure. The
status goes to a JSON file (`status_path`) for `streamrec up`'s progress line. After
`MAX_CONSECUTIVE_FAILURES` failed runs in a row the loop raises the last error, so the command
exits non-zero and the supervisor reports why instead of failing forever. Every run that starts
leaves its outcome metrics behind (training/train_metrics.py: `<data_dir>/metrics/train-<scene>.prom`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from streaming.versioned_store import atomic_write_json
from training.corpus import NotEnoughData
from training.forget_retrain import pending_tombstones, retrain_due
from training.presets import Preset, get_preset

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0  # how often the loop looks for new data
# How often a running canary is reviewed: its counts are recomputed from the whole log (read_attribution),
# too much work for every check; the always-valid test allows any schedule of looks.
CANARY_REVIEW_S = 30.0
MAX_CONSECUTIVE_FAILURES = 3  # failed runs in a row before the loop gives up (and its command exits 1)
DEFAULT_MIN_EVENTS = 1000  # events in the feature tables before the first adapter is trained

_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|e|ev|events?)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60, "h": 3600, "hr": 3600, "hrs": 3600}


@dataclass(frozen=True)
class Schedule:
    """Train every `seconds` (when there is something new), or every `events` new events."""

    seconds: float | None = None
    events: int | None = None

    def __str__(self) -> str:
        return f"every {self.events:,} events" if self.events else f"every {self.seconds:g} s"


def parse_every(text: str) -> Schedule:
    """'10m' / '90s' / '1h' / '10' (minutes) -> a time schedule; '5000events' / '5000e' -> events."""
    m = _EVERY.match(str(text))
    if not m:
        raise ValueError(f"--train-every {text!r}: expected a number with a unit: 10m, 90s, 1h (time) "
                         "or 5000events (new events); a bare number is minutes")
    value, unit = float(m.group(1)), (m.group(2) or "m").lower()
    if value <= 0:
        raise ValueError(f"--train-every {text!r}: must be > 0")
    if unit.startswith("e"):
        if value != int(value):
            raise ValueError(f"--train-every {text!r}: a count of events must be a whole number")
        return Schedule(events=int(value))
    return Schedule(seconds=value * _SECONDS[unit])


@dataclass
class LoopStatus:
    state: str = "starting"  # starting | waiting | training | published | canary | refused | failed
    detail: str = ""
    live_version: str | None = None
    feature_events: int = 0
    new_events: int = 0
    runs: int = 0
    published: int = 0
    last_outcome: dict[str, Any] | None = None
    updated_at: float = 0.0

    def write(self, path: Path | None) -> None:
        self.updated_at = time.time()
        if path is None:
            return
        # Atomic (a reader never sees half a status); not fsync'd: it is a progress line, rewritten every check.
        atomic_write_json(path, dataclasses.asdict(self), indent=1, durable=False)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class ContinuousTrainer:
    """The loop behind `streamrec train-loop`; `check()` is one step (tests call it directly)."""

    def __init__(self, settings: Any, *, schedule: Schedule, preset: Preset | str = "default", scene: str = "default",
                 workers: int = 1, use_gpu: bool = False, min_events: int = DEFAULT_MIN_EVENTS,
                 status_path: Path | None = None, redis_client: Any = None,
                 train: Callable[..., Any] | None = None, review: Callable[..., Any] | None = None,
                 canary_review_s: float = CANARY_REVIEW_S) -> None:
        self.settings, self.schedule, self.scene = settings, schedule, scene
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.workers, self.use_gpu, self.min_events = workers, use_gpu, min_events
        self.status_path, self.redis = status_path, redis_client
        self._train = train  # None: training.train_run.run_training (injectable for unit tests)
        self._review = review  # None: training.canary.review_canary (injectable for unit tests)
        self.canary_review_s = canary_review_s
        self._canary_wait: tuple[float, tuple[str, str]] | None = None  # (when, state) of the last undecided review
        self.status = LoopStatus()
        self.failures = 0
        self.last_attempt_t = -float("inf")
        self.last_attempt_events: int | None = None  # feature events at the last attempt (gate refusals wait for more)
        self.stop = threading.Event()  # once set, no new training run starts (`run` watches the caller's event)

    # --- one step -------------------------------------------------------------------------------
    def check(self) -> str:
        """Update features, decide, maybe train. Returns the state it ends in."""
        from streaming.features import read_manifest, run_features
        from training.registry import Registry

        try:
            run_features(self.settings, redis_client=self.redis, progress=False)
        except Exception as exc:  # the last published tables are still consistent; train on those
            logger.warning("feature job failed (%s: %s); checking the last published tables", type(exc).__name__, exc)
        manifest = read_manifest(self.settings)
        registry = Registry(self.settings.registry_uri)
        current = registry.current(self.scene)
        st = self.status
        st.live_version = current.version if current else None
        st.feature_events = int(manifest["counts"]["events"]) if manifest else 0
        if current is None:
            st.new_events = st.feature_events
            if st.feature_events < self.min_events:
                return self._set("waiting", f"{st.feature_events:,} of {self.min_events:,} events for the first adapter")
            return self._maybe_train(incremental=False)
        current, blocked = self._review_canary(registry, current)
        pending = pending_tombstones(manifest, current.manifest)
        if pending:  # the live adapter remembers a forgotten user (training/forget_retrain.py)
            due, age_s = retrain_due(self.settings, pending)
            if due:
                return self._maybe_train(incremental=False, forget=pending)
            logger.debug("%d forget tombstones pending for %.0f s", len(pending), age_s)
        if blocked is not None:
            return self._set(*blocked)
        seen = int((current.manifest.get("data_window") or {}).get("events") or 0)
        st.new_events = max(0, st.feature_events - seen)
        if st.new_events == 0:
            return self._set("waiting", f"no new events since {current.version}")
        since = st.feature_events - (self.last_attempt_events if self.last_attempt_events is not None else seen)
        if self.schedule.events is not None:
            if since < self.schedule.events:
                return self._set("waiting", f"{since:,} of {self.schedule.events:,} new events for the next run")
        else:
            wait = self.last_attempt_t + self.schedule.seconds - time.monotonic()
            if wait > 0 or since <= 0:
                return self._set("waiting", f"{st.new_events:,} new events; next run in {max(wait, 0):.0f} s"
                                 if since > 0 else f"no new events since the last run ({current.version} live)")
        return self._maybe_train(incremental=True)

    def _review_canary(self, registry: Any, current: Any) -> tuple[Any, tuple[str, str] | None]:
        """Decide the scene's canary (training/canary.py). Returns the live version after it, and the
        (state, detail) to wait in while an experiment holds the next run back (None: train as due)."""
        from training.canary import blocking_experiment, review_canary

        if self._canary_wait is not None and time.monotonic() - self._canary_wait[0] < self.canary_review_s:
            return current, self._canary_wait[1]
        self._canary_wait = None
        try:
            decision = (self._review or review_canary)(self.settings, registry, self.scene)
            if decision is not None and decision.action == "promote":
                current = registry.current(self.scene)
                self.status.live_version = current.version
            exp = blocking_experiment(self.settings, registry, self.scene)
        except Exception as exc:  # attribution or experiment file unreadable now: undecided, retried later
            logger.warning("could not review scene %r's canary (%s: %s); no new run until it can be",
                           self.scene, type(exc).__name__, exc)
            blocked = ("canary", f"canary review failed: {type(exc).__name__}: {exc}")
            self._canary_wait = (time.monotonic(), blocked)
            return current, blocked
        if exp is None:
            return current, None
        if exp.kind == "canary":
            why = decision.reason if decision is not None else "undecided"
            blocked = ("canary", f"canary {', '.join(exp.candidates)} ({exp.id}): {why}")
            self._canary_wait = (time.monotonic(), blocked)
            return current, blocked
        return current, ("waiting", f"experiment {exp.id} runs on scene {self.scene!r}: the next candidate would "
                                    f"be a canary, which waits for it to end (`streamrec experiment stop {self.scene}`)")

    def _maybe_train(self, incremental: bool, forget: set[str] | None = None) -> str:
        from training.train_metrics import record_train_run
        from training.train_run import CANARY, FAILED, GATE_REFUSED, NOTHING_NEW, PUBLISHED, TrainRequest, run_training

        if self.stop.is_set():  # stopping: a run started now would only be abandoned
            return self.status.state
        st = self.status
        tcfg = self.preset.train_config(incremental)
        epochs = tcfg.epochs
        # A forget retrain is from scratch and is published past the gate: the live adapter
        # remembers a forgotten user and must not stay (training/forget_retrain.py; run_training
        # then retires the versions that remember).
        req = TrainRequest(scene=self.scene, workers=self.workers, use_gpu=self.use_gpu, incremental=incremental,
                           model_config=self.preset.model, train_config=tcfg, progress=False,
                           force=bool(forget), force_reason=f"forget retrain for {len(forget or ())} tombstones")
        what = (f"incremental from {st.live_version}, {st.new_events:,} new events" if incremental
                else f"forget retrain from scratch ({len(forget)} tombstones), {st.feature_events:,} events" if forget
                else f"first adapter, {st.feature_events:,} events")
        self._set("training", f"{what} ({epochs} epochs, preset {self.preset.name})")
        self.last_attempt_t, self.last_attempt_events = time.monotonic(), st.feature_events
        st.runs += 1
        t0, started = time.monotonic(), time.time()
        try:
            outcome = (self._train or run_training)(self.settings, req)
        except NotEnoughData as exc:  # not enough data of the right shape yet: wait, not a failure
            record_train_run(self.settings, self.scene, NOTHING_NEW, started=started)
            return self._set("waiting", str(exc))
        except Exception as exc:
            self.failures += 1
            logger.exception("training run failed (%d in a row)", self.failures)
            record_train_run(self.settings, self.scene, FAILED, started=started)
            self._set("failed", f"{type(exc).__name__}: {exc} ({self.failures} in a row)")
            if self.failures >= MAX_CONSECUTIVE_FAILURES:
                raise
            return "failed"
        self.failures = 0
        published = outcome.published.version if outcome.published is not None else None
        kind = getattr(outcome, "kind", None) or (PUBLISHED if published else GATE_REFUSED)
        record_train_run(self.settings, self.scene, kind, started=started)
        st.last_outcome = {"outcome": kind, "published": published,
                           "gate": outcome.gate_message, "metrics": outcome.metrics,
                           "run_dir": str(outcome.run_dir), "seconds": round(time.monotonic() - t0, 1)}
        if kind == CANARY:  # published, not live (training/canary.py): the next checks decide it
            logger.info("canary %s/%s: %s", self.scene, published, outcome.gate_message)
            return self._set("canary", outcome.gate_message)
        if published:
            st.published += 1
            st.live_version = published

            logger.info("published %s/%s in %.0f s: %s", self.scene, published, time.monotonic() - t0,
                        outcome.gate_message)
            return self._set("published", f"{published} ({outcome.gate_message})")
        logger.warning("not published: %s", outcome.gate_message)
        return self._set("refused", f"{outcome.gate_message}; {st.live_version} stays live")

    def _set(self, state: str, detail: str) -> str:
        self.status.state, self.status.detail = state, detail
        self.status.write(self.status_path)
        return state

    # --- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        logger.info("continuous training of scene %r %s (preset %s); status in %s", self.scene, self.schedule,
                    self.preset.name, self.status_path)
        self.stop = stop
        last_detail = None
        while not stop.is_set():
            self.check()
            if self.status.detail != last_detail:
                logger.info("%s: %s", self.status.state, self.status.detail)
                last_detail = self.status.detail
            stop.wait(check_interval_s)


__all__ = ["CANARY_REVIEW_S", "CHECK_INTERVAL_S", "ContinuousTrainer", "LoopStatus", "Schedule", "parse_every", "read_status"]
