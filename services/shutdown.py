"""Stopping a long-running command on SIGINT / SIGTERM with a stop event, never an exception.

A signal handler that raises (KeyboardInterrupt) lands in whatever code runs at that instant --
half-way through a status write, a commit, a publish. Here the handlers only set a
`threading.Event`; the work checks it at points where stopping is safe (between records, between
training checks, in its waits). Work that cannot stop part-way, such as a training run inside
Ray Train, runs on a worker thread that the command abandons when asked to stop
(`run_until_stopped`): the process then exits and takes the run with it, which is as safe as a
crash at that point -- publishing is atomic -- and nothing was interrupted mid-statement.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, TypeVar

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JOIN_POLL_S = 0.2
"""How often a command waiting on its worker thread looks at the stop event."""

T = TypeVar("T")


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """While the block runs, SIGINT and SIGTERM set `stop` (a new event when None), which the block
    receives; the handlers that were there before come back afterwards. Main thread only."""
    stop = stop if stop is not None else threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            # None: a handler not installed from Python; the default is the best we can restore
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def run_until_stopped(work: Callable[[], T], stop: threading.Event,
                      abandon: Callable[[], bool] = lambda: True) -> tuple[bool, T | None]:
    """Run `work()` on a daemon thread until it returns, or until `stop` is set while `abandon()`
    says the work in progress may be left behind. Returns (abandoned, what `work` returned);
    re-raises here what `work` raised. The work should watch `stop` itself and return soon
    after it is set; `abandon` is for the stretches where it cannot (a training run)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the waiting thread, which raises it
            error.append(exc)

    worker = threading.Thread(target=body, name="work", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(JOIN_POLL_S)
        if worker.is_alive() and stop.is_set() and abandon():
            return True, None
    if error:
        raise error[0]
    return False, result[0] if result else None


__all__ = ["JOIN_POLL_S", "STOP_SIGNALS", "run_until_stopped", "stop_on_signals"]
