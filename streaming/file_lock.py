"""An exclusive `flock` with a deadline, shared by the stack launcher and the feature job."""

from __future__ import annotations

import fcntl
import time
from typing import IO


def flock_exclusive(target: int | IO, timeout_s: float, poll_s: float) -> bool:
    """Take an exclusive lock on an open file (or descriptor), retrying every `poll_s` seconds
    for up to `timeout_s`; True once held, False when another holder kept it all along.
    (Non-blocking tries in a loop, because a blocking `flock` cannot time out.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(target, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
