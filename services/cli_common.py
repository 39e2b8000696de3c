"""What every `streamrec` command module shares: logging, the settings, the embedded stack, and
turning expected failures into one clear line and an exit status (2: configuration, 1: failure),
so that no command prints a traceback for a mistake a user can fix."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TypeVar

import typer

from streaming.settings import Settings, SettingsError, load_settings

EXIT_CONFIG = 2
EXIT_FAILURE = 1

PRESET_HELP = "default (the benchmarks' size), demo (8 epochs), quick (small, minutes on a CPU)"

T = TypeVar("T")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # kafka-python narrates every connection at INFO.
    logging.getLogger("kafka").setLevel(logging.WARNING)


class CommandFailed(typer.Exit):
    """The exit `fail` returns: its status, and the message it printed (for an outcome record)."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message


def fail(message: str, code: int = EXIT_FAILURE) -> CommandFailed:
    """Print `error: message` (red, stderr); the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return CommandFailed(message, code)


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings (environment + non-None `overrides`); a bad value exits 2 naming its variable."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None


def with_stack(settings: Settings) -> Settings:
    """Fill in Kafka/Redis addresses from the embedded stack where none are configured."""
    from services.stack import StackError, ensure_stack

    try:
        return ensure_stack(settings)
    except StackError as exc:
        raise fail(str(exc)) from None


def guard(fn: Callable[[], T]) -> T:
    """Turn the expected failures of a command into one clear line and a non-zero exit."""
    from streaming.datasets import DatasetError
    from streaming.kafka_io import KafkaUnavailable
    from streaming.offline_log import CorruptLogFile, LogDiskFull
    from streaming.redis_io import RedisRefused, RedisUnavailable

    try:
        return fn()
    except RedisRefused as exc:  # wrong password / ACL: configuration, not an outage
        raise fail(str(exc), EXIT_CONFIG) from None
    except (KafkaUnavailable, RedisUnavailable, DatasetError, FileNotFoundError, CorruptLogFile, LogDiskFull) as exc:
        raise fail(str(exc)) from None


def training_guard(fn: Callable[[], T]) -> T:
    """`guard`, and the expected failures of training (corpus, base model, registry)."""
    from training.corpus import CorpusError
    from training.lm import BaseModelError
    from training.registry import RegistryError

    try:
        return guard(fn)
    except (CorpusError, BaseModelError, RegistryError) as exc:
        raise fail(str(exc)) from None


def preset_or_exit(name: str):
    """The training preset `name`; an unknown one exits 2 listing the known ones."""
    from training.presets import get_preset

    try:
        return get_preset(name)
    except ValueError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None


def schedule_or_exit(text: str):
    """The training schedule of `--every` / `--train-every`; a bad one exits 2 quoting it."""
    from training.continuous_trainer import parse_every

    try:
        return parse_every(text)
    except ValueError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None


__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "PRESET_HELP", "CommandFailed", "fail", "guard", "preset_or_exit",
           "schedule_or_exit", "settings_or_exit", "setup_logging", "training_guard", "with_stack"]
