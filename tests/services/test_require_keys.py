"""STREAMREC_REQUIRE_API_KEYS: an empty STREAMREC_API_KEYS is refused where the API starts
(`streamrec serve`, the RayService's app builder, each Serve replica), with a message that says
how to set the keys; other commands load the same settings and are unaffected."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.require_keys import ApiKeysRequired, check_api_keys_required
from streaming.settings import load_settings


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env file
    monkeypatch.delenv("STREAMREC_API_KEYS", raising=False)
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def test_off_by_default_the_api_may_be_open(env):
    settings = load_settings()
    assert settings.require_api_keys is False and settings.api_keys == ()
    check_api_keys_required(settings)  # the quick start stays open


def test_required_and_empty_is_refused_with_the_fix(env):
    env.setenv("STREAMREC_REQUIRE_API_KEYS", "true")
    env.setenv("STREAMREC_API_KEYS", " , ")  # only separators: no key at all
    settings = load_settings()  # loading still works: ingest and the batch jobs share the ConfigMap
    with pytest.raises(ApiKeysRequired) as exc:
        check_api_keys_required(settings)
    message = str(exc.value)
    assert "STREAMREC_REQUIRE_API_KEYS=true" in message and "STREAMREC_API_KEYS is empty" in message
    assert "kubectl -n streamrec patch secret streamrec-api-keys" in message


def test_required_with_keys_starts(env):
    env.setenv("STREAMREC_REQUIRE_API_KEYS", "true")
    env.setenv("STREAMREC_API_KEYS", "k1,k2")
    check_api_keys_required(load_settings())


def test_serve_command_exits_2_before_starting_anything(env):
    env.setenv("STREAMREC_REQUIRE_API_KEYS", "true")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert "STREAMREC_API_KEYS is empty" in result.output


def test_replica_and_app_builder_refuse(env):
    """The RayService's import path fails the deploy; a replica started anyway fails its start."""
    serve_app = pytest.importorskip("services.serve_app")
    env.setenv("STREAMREC_REQUIRE_API_KEYS", "true")
    with pytest.raises(ApiKeysRequired):
        serve_app.app_builder({})
    # the class as written (Serve's ingress wrapper subclasses it with an async __init__)
    api_class = next(c for c in serve_app.Api.func_or_class.__mro__
                     if c.__module__ == serve_app.__name__ and not inspect.iscoroutinefunction(c.__dict__["__init__"]))
    replica = api_class.__new__(api_class)
    with pytest.raises(ApiKeysRequired):  # raised before any Redis or registry is touched
        api_class.__init__(replica)
