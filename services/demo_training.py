"""One training step of `streamrec demo` (the feature job, then a training run), in a child process.

The tour itself never connects to Ray. The head that `up` starts for it admits only clients that
hold this run's token, and Ray reads the token from the environment of the process that
connects -- so the Ray clients of the tour run here, in a process started with the environment of
`up`'s parts (`Up.env`: the settings, the Ray address and the token), instead of the tour writing
them into its own environment. The step prints the feature job's line and its progress bars to
the tour's terminal and hands its outcome back as a JSON file (`TrainStep`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streaming.versioned_store import atomic_write_json, read_json

# The step's own chatter stays out of the narration; a user's own values win (see `step_env`).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
             "RAY_BACKEND_LOG_LEVEL": "error"}


@dataclass(frozen=True)
class TrainStep:
    """What one step did: the feature version it folded in, and the training run's outcome."""

    features_version: int
    new_events: int
    epochs: int
    seconds: float
    run_dir: str
    published: str | None  # the version published, None when the gate kept the live one
    gate_message: str
    metrics: dict[str, float]


def step_env(parts_env: dict[str, str]) -> dict[str, str]:
    """The child's whole environment: the parts' (which already holds this process's own), quieted."""
    return {**QUIET_ENV, **parts_env}


def command(preset: str, incremental: bool, result: Path) -> list[str]:
    return [sys.executable, "-m", "services.demo_training", "--preset", preset, "--result", str(result),
            *(["--incremental"] if incremental else [])]


def read_step(result: Path) -> TrainStep:
    return TrainStep(**read_json(result))


def _quiet() -> None:
    """No execution plans, progress logs or deprecation warnings in the narration (the feature job
    and training show their own progress bars)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_step(settings: Any, preset_name: str, incremental: bool) -> TrainStep:
    from streaming.features import run_features
    from streaming.redis_io import make_redis
    from training.presets import get_preset
    from training.train_run import TrainRequest, run_training

    client = make_redis(settings)
    try:
        res = run_features(settings, redis_client=client, progress=True)
    finally:
        client.close()
    print(f"  features v{res.version}: {res.new_events:,} new events folded in", flush=True)
    preset = get_preset(preset_name)
    tcfg = preset.train_config(incremental)
    req = TrainRequest(incremental=incremental, model_config=preset.model, train_config=tcfg, progress=True)
    t = time.monotonic()
    out = run_training(settings, req)
    return TrainStep(features_version=res.version, new_events=res.new_events, epochs=tcfg.epochs,
                     seconds=time.monotonic() - t, run_dir=str(out.run_dir),
                     published=out.published.version if out.published is not None else None,
                     gate_message=out.gate_message, metrics=dict(out.metrics))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--incremental", action="store_true")
    ap.add_argument("--result", type=Path, required=True, help="write the TrainStep here (JSON)")
    args = ap.parse_args(argv)
    from streaming.settings import load_settings

    _quiet()
    step = run_step(load_settings(), args.preset, args.incremental)
    atomic_write_json(args.result, asdict(step), durable=False)
    return 0


__all__ = ["QUIET_ENV", "TrainStep", "command", "read_step", "run_step", "step_env"]


if __name__ == "__main__":  # pragma: no cover - run by the demo as a child process
    sys.exit(main())
