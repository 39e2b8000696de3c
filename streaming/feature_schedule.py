"""The feature job on a timer, beside ingestion: `streamrec ingest` runs it after a commit once
`features_interval_s` has passed since the last start, so the feature tables follow the stream
without a scheduler of their own.

It runs on a background thread, one run at a time: the consumer keeps consuming (and committing)
while the job reads the log files already written. A failed run is logged and counted; the
stream goes on, and the next period retries from the same watermark (the job is idempotent).
Each run's outcome goes to `on_outcome(ok)` (ingest counts it in `streamrec_features_runs_total` and
`streamrec_features_last_success_timestamp_seconds`, `streaming.ingest_metrics`); a run that found
another one holding the feature lock did not run, and is neither a success nor a failure.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class PeriodicFeatures:
    """Runs the incremental feature job in the background every `interval_s` (0: never), one run at a time.

    `maybe_run` is the ingestor's `on_commit` hook; `join` waits for a run in progress. `run` is
    the job (default `streaming.features.run_features`), a parameter for tests; `on_outcome(ok)` is
    told how each run ended.
    """

    def __init__(self, settings: Any, redis_client: Any, interval_s: float,
                 run: Callable[..., Any] | None = None, on_outcome: Callable[[bool], None] | None = None) -> None:
        self.settings, self.redis, self.interval_s = settings, redis_client, interval_s
        self.run = run
        self.on_outcome = on_outcome
        self.last = -float("inf")  # the first commit starts the first run
        self.thread: threading.Thread | None = None
        self.failures = 0

    def maybe_run(self, _ingestor: Any = None) -> None:
        if self.interval_s <= 0 or (self.thread and self.thread.is_alive()):
            return
        if time.monotonic() - self.last < self.interval_s:
            return
        self.last = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="features", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from streaming.ray_runtime import run_as_batch_work

        run_as_batch_work()  # this thread only (Linux nice is per thread): ingest's loop keeps its priority
        run = self.run
        if run is None:
            from streaming.features import run_features as run
        try:
            result = run(self.settings, redis_client=self.redis)
            if not result.noop:
                log.info("features v%d: %d new events from %d files", result.version, result.new_events,
                         result.new_files)
        except Exception as exc:  # the stream goes on; the next period retries from the same watermark
            from streaming.features.store import FeaturesBusyError  # here: only a failure needs the package

            if isinstance(exc, FeaturesBusyError):
                log.info("feature job skipped: %s (that run records its own outcome)", exc)
                return
            self.failures += 1
            log.exception("feature job failed (attempt %d); ingestion continues", self.failures)
            self._tell(False)
            return
        self._tell(True)

    def _tell(self, ok: bool) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(ok)
            except Exception:  # metrics must never stop the schedule
                log.exception("recording the feature run's outcome failed")

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


__all__ = ["PeriodicFeatures"]
