"""The replica's experiment follower (services/experiment_follower.py): candidates load before they
take users, a candidate that cannot load leaves its users on control, a stopped experiment sends
everyone back, and the choice is the experiment's sticky assignment."""

from __future__ import annotations

import asyncio

from services.experiment_follower import ExperimentFollower
from services.loaded_adapter import AdapterLoadError
from services.metrics import ServeMetrics
from tests.training.test_registry import SCENE, caller_manifest, stage
from training import experiments
from training.experiments import CONTROL
from training.registry import Registry


def _registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "registry")
    for tag in ("a", "b", "c"):
        reg.publish(SCENE, stage(tmp_path / f"staged-{tag}", tag), caller_manifest(tag=tag), make_live=(tag == "a"))
    return reg


def test_candidates_take_their_users_once_loaded_and_control_after_a_stop(tmp_path):
    reg = _registry(tmp_path)
    loaded: list[str] = []
    gate = asyncio.Event()

    async def load(scene, version):
        await gate.wait()
        loaded.append(version)
        return object()

    follower = ExperimentFollower(reg, load, ServeMetrics("r1"), lambda: [SCENE])
    users = [f"{i:032x}" for i in range(2000)]

    async def scenario():
        assert follower.choose(SCENE, users[0]) == (CONTROL, None, None)  # no experiment
        exp = experiments.start(reg, SCENE, {"v000002": 50.0})
        poll = asyncio.create_task(follower.poll())
        await asyncio.sleep(0.05)
        # read but not loaded yet: everyone is control, their impressions name the experiment
        assert {follower.choose(SCENE, u) for u in users} == {(CONTROL, None, exp.id)}
        assert follower.views()[SCENE].ready == []
        gate.set()
        await poll
        chosen = [follower.choose(SCENE, u) for u in users]
        assert chosen == [(exp.variant_of(u), None if exp.variant_of(u) == CONTROL else "v000002", exp.id)
                          for u in users]
        assert 0.4 < sum(c[0] == "v000002" for c in chosen) / len(users) < 0.6
        assert follower.views()[SCENE].ready == ["v000002"] and loaded == ["v000002"]
        experiments.end(reg, SCENE, "stop", "test")
        await follower.poll()
        assert {follower.choose(SCENE, u) for u in users} == {(CONTROL, None, None)}
        assert follower.views() == {}

    asyncio.run(scenario())


def test_a_candidate_that_cannot_load_leaves_its_users_on_control(tmp_path):
    reg = _registry(tmp_path)

    async def load(scene, version):
        raise AdapterLoadError(f"{version}: checksum mismatch")

    follower = ExperimentFollower(reg, load, ServeMetrics("r1"), lambda: [SCENE])
    exp = experiments.start(reg, SCENE, {"v000003": 90.0})
    asyncio.run(follower.poll())
    assert {follower.choose(SCENE, f"{i:032x}")[0] for i in range(200)} == {CONTROL}
    assert follower.views()[SCENE].failed == {"v000003": "v000003: checksum mismatch"}
    assert follower.views()[SCENE].id == exp.id
