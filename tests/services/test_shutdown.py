"""services.shutdown (signals set a stop event; work is abandoned, never interrupted) and the
train-loop's use of it: the continuous trainer starts no run once asked to stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

import streaming.features as features
import training.registry as registry
from services.shutdown import run_until_stopped, stop_on_signals
from training.continuous_trainer import ContinuousTrainer, Schedule


def test_signals_set_the_stop_event_and_the_previous_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5) and not isinstance(stop, bool)
        stop.clear()
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the event
        assert stop.wait(5)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_run_until_stopped_returns_the_result_or_raises_the_error_of_the_work():
    stop = threading.Event()
    assert run_until_stopped(lambda: 42, stop) == (False, 42)
    with pytest.raises(ValueError, match="bad"):
        run_until_stopped(lambda: (_ for _ in ()).throw(ValueError("bad")), stop)


def test_work_that_may_be_abandoned_is_left_behind_at_once_and_other_work_is_waited_for():
    stop, release = threading.Event(), threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    assert run_until_stopped(lambda: release.wait(30), stop, abandon=lambda: True) == (True, None)
    assert time.monotonic() - t0 < 5
    release.set()

    stop.clear()
    finished = []
    work_can_stop = threading.Event()

    def work():
        work_can_stop.wait(30)
        finished.append(True)
        return "done"

    threading.Timer(0.2, stop.set).start()
    threading.Timer(0.8, work_can_stop.set).start()
    assert run_until_stopped(work, stop, abandon=lambda: False) == (False, "done") and finished


@pytest.fixture
def due_trainer(monkeypatch, tmp_path):
    """A continuous trainer whose next check would train (fakes: features, registry, the run)."""
    runs = []
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": 5000}})
    monkeypatch.setattr(registry, "Registry", lambda uri: SimpleNamespace(current=lambda scene: None))

    def train(settings, req):
        runs.append(req)
        return SimpleNamespace(published=SimpleNamespace(version="v000001"), gate_message="accepted",
                               metrics={}, run_dir="r")

    trainer = ContinuousTrainer(SimpleNamespace(registry_uri="unused"), schedule=Schedule(events=100), preset="quick",
                                min_events=1000, status_path=tmp_path / "status.json", train=train)
    return trainer, runs


def test_a_stop_request_before_a_due_run_starts_no_run(due_trainer, monkeypatch):
    trainer, runs = due_trainer
    stop = threading.Event()
    # the request arrives while the feature job of the check runs: the check ends without training
    monkeypatch.setattr(features, "run_features", lambda *a, **k: stop.set())
    abandoned, _ = run_until_stopped(lambda: trainer.run(stop, check_interval_s=0.01), stop,
                                     abandon=lambda: trainer.status.state == "training")
    assert not abandoned and runs == [] and trainer.status.state != "training"


def test_without_a_stop_request_the_due_run_happens(due_trainer):
    trainer, runs = due_trainer
    assert trainer.check() == "published" and len(runs) == 1
