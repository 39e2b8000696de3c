"""The `streamrec` command line: help, configuration errors, and the README's ingestion commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from typer.testing import CliRunner

from services.cli import app
from streaming.settings import settings_env
from tests.streaming.helpers import isolated_settings, popularity_total, read_log

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("produce", "ingest", "features", "dlq", "config", "stack", "data"):
        assert command in result.output


@pytest.mark.parametrize(
    "env, named",
    [
        ({"STREAMREC_TOPIC_PARTITIONS": "0"}, "STREAMREC_TOPIC_PARTITIONS='0'"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "localhost"}, "KAFKA_BOOTSTRAP_SERVERS='localhost'"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL='http://x'"),
        ({"STREAMREC_LOG_FLUSH_INTERVAL_S": "-1"}, "STREAMREC_LOG_FLUSH_INTERVAL_S='-1'"),
        ({"STREAMREC_EVENTS_TOPIC": "bad topic"}, "STREAMREC_EVENTS_TOPIC='bad topic'"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(env, named, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 2
    assert named in result.output


def test_config_prints_every_variable(monkeypatch):
    from streaming.settings import env_var_names

    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    for var in env_var_names().values():
        assert var in result.output


def test_unknown_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["data", "fetch", "ml-20m"])
    assert result.exit_code == 2
    assert "ml-20m" in result.output


def _streamrec(settings, *args, timeout=240):
    env = {**os.environ, **settings_env(settings)}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"streamrec {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_readme_ingestion_commands_end_to_end(embedded_stack, tmp_path):
    """produce -> ingest (drains, exits) -> features -> dlq, each as the README runs it."""
    settings = isolated_settings(embedded_stack, tmp_path)
    out = _streamrec(settings, "produce", "synthetic:n_users=50,n_items=40,n_events=3000,seed=2", "--rate", "20000")
    assert "3000 events" in out
    out = _streamrec(settings, "ingest", "--until-idle", "2", "--no-progress")
    assert "3000 events" in out and "40 items" in out
    assert popularity_total(settings) == 3000
    assert read_log(settings).num_rows == 3000

    out = _streamrec(settings, "features", "--no-progress")
    assert "3000 new events" in out
    assert "nothing new" in _streamrec(settings, "features", "--no-progress")
    r = redis.Redis.from_url(settings.redis_url)
    assert r.zcard(f"{settings.redis_prefix}feat:popular") > 0

    # A malformed record is reported by `streamrec dlq` with its reason.
    from streaming.producer import EventProducer

    with EventProducer(settings) as producer:
        producer.send_raw(settings.events_topic, b"{oops")
    _streamrec(settings, "ingest", "--until-idle", "2", "--no-progress")
    assert "not_json" in _streamrec(settings, "dlq", "--timeout", "2")


def assert_help_lists(args: list[str], names: tuple[str, ...]) -> None:
    """`streamrec <args> --help` exits 0 and mentions every one of `names`."""
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    missing = [n for n in names if n not in result.output]
    assert not missing, f"streamrec {' '.join(args)} --help lacks {missing}"


def test_up_demo_and_train_loop_have_help_and_refuse_bad_options(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))  # a refused `train` records a failed run there
    assert_help_lists([], ("up", "demo", "train-loop"))
    assert_help_lists(["up"], ("--train-every", "--preset", "--port", "--fresh", "--keep-stack", "--no-train"))
    assert "--quick" in runner.invoke(app, ["demo", "--help"]).output
    bad_every = runner.invoke(app, ["up", "--train-every", "soon"])
    assert bad_every.exit_code == 2 and "'soon'" in bad_every.output
    bad_preset = runner.invoke(app, ["train-loop", "--preset", "huge"])
    assert bad_preset.exit_code == 2 and "'huge'" in bad_preset.output and "quick" in bad_preset.output
    bad_train = runner.invoke(app, ["train", "--preset", "huge"])
    assert bad_train.exit_code == 2 and "'huge'" in bad_train.output
