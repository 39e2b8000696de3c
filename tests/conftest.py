"""Shared fixtures: the real services start once per test session."""

from __future__ import annotations

import os

import pytest

# Session fixtures defined beside their helpers, imported here so that every module shares one instance.
from tests.fixtures.trained_adapter import first_adapter  # noqa: F401

# Keep Ray quiet and local in tests; never reach out for anything.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime shared by every test that needs Ray (started once: it takes seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory):
    """One private embedded stack (Tansu broker + Redis) shared by the session's integration tests.

    Yields a `services.stack.StackInfo`: use `.kafka_bootstrap` and `.redis_url`. Shared by
    every test, so use unique topic names, consumer groups and Redis key prefixes per test.
    The broker keeps data in memory only; everything is gone when the session ends.
    """
    from services.stack import EmbeddedStack

    with EmbeddedStack(tmp_path_factory.mktemp("embedded-stack")) as info:
        yield info
