"""services.supervisor with small real child processes (python -c ...)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.supervisor import Part, Supervisor, pid_alive

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(600)"]


def _until(cond, timeout_s: float = 20.0, sup: Supervisor | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        if sup is not None:
            sup.poll()
        time.sleep(0.05)


def test_a_crashing_part_is_restarted_then_failed_with_its_reason(tmp_path):
    crash = [PY, "-c", "import sys; print('boom: no broker at 127.0.0.1:1', file=sys.stderr); sys.exit(3)"]
    sup = Supervisor([Part("steady", SLEEPER), Part("crashy", crash)], tmp_path, max_restarts=2, backoff_s=0.05)
    sup.start()
    try:
        _until(lambda: sup.parts["crashy"].state == "failed", sup=sup)
        crashy = sup.parts["crashy"]
        assert len(crashy.restarts) == 3  # the first exit and two restarts that exited again
        assert "exit code 3" in crashy.reason and "boom: no broker" in crashy.reason
        assert sup.parts["steady"].state == "ready" and pid_alive(sup.parts["steady"].pid)
        assert [st.part.name for st in sup.failed()] == ["crashy"]
    finally:
        sup.stop()
    assert sup.parts["steady"].state == "stopped" and not pid_alive(sup.parts["steady"].pid)


def test_stop_terminates_gracefully_and_leaves_no_descendant(tmp_path):
    marker = tmp_path / "committed"
    graceful = [PY, "-c", (
        "import signal, sys, time, pathlib\n"
        f"def bye(*_): pathlib.Path({str(marker)!r}).write_text('ok'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "time.sleep(600)\n")]
    # a part that starts a grandchild of its own (as `streamrec serve` starts Ray's processes)
    parent = [PY, "-c", f"import subprocess, time; subprocess.Popen({SLEEPER!r}); time.sleep(600)"]
    sup = Supervisor([Part("consumer", graceful), Part("parent", parent)], tmp_path)
    sup.start()
    _until(lambda: sup.parts["parent"].descendants, sup=sup)
    grandchildren = list(sup.parts["parent"].descendants)
    sup.stop()
    assert marker.read_text() == "ok"  # SIGTERM reached the handler: the part could commit
    for pid in [sup.parts["consumer"].pid, sup.parts["parent"].pid, *grandchildren]:
        assert not pid_alive(pid)


def test_a_one_shot_part_is_done_or_failed_and_ready_probe_is_used(tmp_path):
    flag = tmp_path / "ready"
    sup = Supervisor([Part("ok", [PY, "-c", "pass"], restart=False),
                      Part("bad", [PY, "-c", "raise SystemExit(2)"], restart=False),
                      Part("slow", [PY, "-c", f"import pathlib, time; time.sleep(0.3); "
                                              f"pathlib.Path({str(flag)!r}).touch(); time.sleep(600)"],
                           ready=flag.exists)], Path(tmp_path))
    sup.start()
    try:
        assert sup.parts["slow"].state == "starting"
        _until(lambda: {s.state for s in sup.status()} == {"done", "failed", "ready"}, sup=sup)
        assert sup.parts["ok"].state == "done" and "exit code 2" in sup.parts["bad"].reason
    finally:
        sup.stop()
