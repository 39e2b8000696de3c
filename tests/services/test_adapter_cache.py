"""services/adapter_cache.py: one load per id, failures not cached, and the sweep's `retain` (which adapters a
replica drops after a swap or an experiment's end); and the replica's own sweep over its followers' wants."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.adapter_cache import AdapterCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_gets_of_one_id_load_it_once_and_a_failure_is_not_cached():
    calls: list[str] = []
    fail = {"s@v2"}

    async def load(model_id: str):
        calls.append(model_id)
        await asyncio.sleep(0)  # let the other callers arrive while this load runs
        if model_id in fail:
            raise RuntimeError(f"{model_id} cannot serve")
        return {"id": model_id}

    async def run():
        cache = AdapterCache(load)
        got = await asyncio.gather(*(cache.get("s@v1") for _ in range(5)))
        assert all(g is got[0] for g in got) and calls == ["s@v1"]
        for _ in range(2):
            with pytest.raises(RuntimeError, match="s@v2 cannot serve"):
                await cache.get("s@v2")
        assert calls == ["s@v1", "s@v2", "s@v2"] and cache.loaded() == ["s@v1"]
        fail.clear()
        assert (await cache.get("s@v2"))["id"] == "s@v2"  # the next try loads it

    asyncio.run(run())


def test_retain_drops_what_is_not_wanted_once_past_the_grace_period():
    clock = Clock()

    async def load(model_id: str):
        return object()

    async def run():
        cache = AdapterCache(load, grace_s=60.0, clock=clock)
        v1 = await cache.get("home@v1")
        clock.now = 100.0
        await cache.get("home@v2")  # a swap: v2 loaded, not yet active
        assert cache.retain({"home@v1"}) == []  # v2 is within its grace: kept though nobody named it
        clock.now = 120.0
        assert cache.retain({"home@v2"}) == ["home@v1"]  # v2 live now: v1 goes
        assert cache.loaded() == ["home@v2"]
        assert await cache.get("home@v1") is not v1  # wanted again (a rollback): loaded afresh
        clock.now = 500.0
        assert cache.retain([]) == ["home@v1", "home@v2"] and cache.loaded() == []

    asyncio.run(run())


def test_the_replica_sweep_keeps_live_wanted_and_candidate_versions_and_drops_the_rest(monkeypatch, tmp_path,
                                                                                     caplog):
    """The replica's own sweep (`_sweep_adapters`) over its followers' state, on an in-process replica."""
    from types import SimpleNamespace

    from tests.fixtures.fake_registry import FakeAdapter, install_fake_registry
    from tests.fixtures.replica import in_process_replica, replica_class, replica_globals

    install_fake_registry(monkeypatch, {"default": "v000002"})
    monkeypatch.setitem(replica_globals(), "ADAPTER_SWEEP_S", 0.01)

    async def load_model(self, model_id: str):
        return FakeAdapter(*model_id.split("@"))

    monkeypatch.setattr(replica_class(), "_load_model", load_model)
    caplog.set_level(logging.INFO, logger="services.serve_app")
    with in_process_replica(monkeypatch, tmp_path) as rep:
        rep.until(lambda: rep.inst.versions.active.get("default") == "v000002")
        inst = rep.inst
        inst.adapters._grace_s = 0.0  # what this test looks at is which ids are wanted, not the grace
        for model_id in ("default@v000001", "default@v000003", "home@v000009"):
            rep.loop.run_until_complete(inst.get_model(model_id))
        async def no_poll():  # the fake registry has no experiment file: its poll would end the one set here
            return None

        inst.experiments.poll = no_poll
        inst.experiments.experiments["default"] = SimpleNamespace(candidates={"v000003": 10.0})
        inst.experiments.ready |= {("default", "v000003"), ("home", "v000009")}
        rep.until(lambda: inst.adapters.loaded() == ["default@v000002", "default@v000003"])
        assert inst.experiments.ready == {("default", "v000003")}  # a dropped candidate loads again if wanted
        assert "unloaded default@v000001, home@v000009" in caplog.text
        inst.experiments.experiments.clear()  # the experiment ended
        rep.until(lambda: inst.adapters.loaded() == ["default@v000002"])
        rep.until(lambda: inst.metrics.adapters_loaded.collect()[0].samples[0].value == 1)
        assert not inst.stopped_followers()
