"""The registry follower with a fake registry, loader and clock: swaps, refusals, retries, pins."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from services.loaded_adapter import AdapterLoadError
from services.metrics import ServeMetrics
from services.registry_follower import RETRY_FIRST_S, RETRY_MAX_S, RegistryFollower
from training.registry import ChecksumMismatch, RegistryError


class FakeRegistry:
    def __init__(self, **current: str) -> None:
        self.versions = dict(current)  # scene -> CURRENT version
        self.broken: dict[str, Exception] = {}  # scene -> what reading its pointer raises
        self.unreachable: Exception | None = None

    def scenes(self) -> list[str]:
        if self.unreachable is not None:
            raise self.unreachable
        return sorted(self.versions)

    def current(self, scene: str):
        if scene in self.broken:
            raise self.broken[scene]
        return SimpleNamespace(version=self.versions[scene])


class FakeLoader:
    """Loads "scene@version"; `failures[(scene, version)]` are raised first, one per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.failures: dict[tuple[str, str], list[BaseException]] = {}

    async def __call__(self, scene: str, version: str):
        self.calls.append((scene, version))
        pending = self.failures.get((scene, version))
        if pending:
            raise pending.pop(0)
        return SimpleNamespace(index=SimpleNamespace(size=40, recall=1.0), loaded_s=0.01)


def _follower(registry: FakeRegistry, now: list[float]) -> tuple[RegistryFollower, FakeLoader, ServeMetrics]:
    loader, metrics = FakeLoader(), ServeMetrics("r1")
    return RegistryFollower(registry, loader, metrics, clock=lambda: now[0]), loader, metrics


def _value(metrics: ServeMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_new_current_version_is_loaded_then_swapped_in_once():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, m = _follower(reg, now)
    asyncio.run(f.poll())
    asyncio.run(f.poll())
    assert f.active == {"default": "v000001"} and loader.calls == [("default", "v000001")]
    reg.versions["default"] = "v000002"
    asyncio.run(f.poll())
    assert f.active == {"default": "v000002"}
    assert _value(m, "streamrec_adapter_reloads_total", scene="default") == 2.0
    assert _value(m, "streamrec_active_adapter", scene="default", version="v000001") == 0.0
    assert _value(m, "streamrec_active_adapter", scene="default", version="v000002") == 1.0
    assert _value(m, "streamrec_index_items", scene="default") == 40.0


def test_a_broken_version_is_refused_for_good_and_the_old_one_keeps_serving():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, m = _follower(reg, now)
    asyncio.run(f.poll())
    reg.versions["default"] = "v000002"
    loader.failures[("default", "v000002")] = [AdapterLoadError("default/v000002: checksum mismatch")]
    for _ in range(3):
        asyncio.run(f.poll())
        now[0] += RETRY_MAX_S
    assert f.active == {"default": "v000001"} and f.refused == {"default": {"v000002"}}
    assert loader.calls.count(("default", "v000002")) == 1
    assert _value(m, "streamrec_adapter_reload_failures_total", scene="default") == 1.0
    assert _value(m, "streamrec_background_errors_total", loop="registry") == 0.0


def test_a_transient_failure_is_retried_with_back_off_not_refused():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, m = _follower(reg, now)
    asyncio.run(f.poll())
    reg.versions["default"] = "v000002"
    loader.failures[("default", "v000002")] = [TimeoutError("registry read timed out"),
                                               RedisConnectionError("redis down")]
    asyncio.run(f.poll())  # attempt 1 fails: next try after RETRY_FIRST_S
    assert f.retries[("default", "v000002")].attempts == 1 and not f.refused
    now[0] += RETRY_FIRST_S / 2
    asyncio.run(f.poll())  # too early: not tried
    assert loader.calls.count(("default", "v000002")) == 1
    now[0] += RETRY_FIRST_S / 2
    asyncio.run(f.poll())  # attempt 2 fails: the wait doubles
    assert loader.calls.count(("default", "v000002")) == 2
    assert f.retries[("default", "v000002")].at == pytest.approx(now[0] + 2 * RETRY_FIRST_S)
    now[0] += 2 * RETRY_FIRST_S
    asyncio.run(f.poll())  # attempt 3 loads
    assert f.active == {"default": "v000002"} and not f.retries and not f.refused
    assert _value(m, "streamrec_background_errors_total", loop="registry") == 2.0
    assert _value(m, "streamrec_adapter_reload_failures_total", scene="default") is None


def test_the_back_off_is_capped():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, _ = _follower(reg, now)
    loader.failures[("default", "v000001")] = [OSError("unreachable")] * 20
    for _ in range(20):
        now[0] = f.retries[("default", "v000001")].at if f.retries else 0.0
        asyncio.run(f.poll())
    assert f.retries[("default", "v000001")].at - now[0] == RETRY_MAX_S and not f.active


def test_pins_win_over_current_and_a_bad_pin_is_named():
    reg, now = FakeRegistry(default="v000003", homepage="v000001"), [0.0]
    f, loader, _ = _follower(reg, now)
    f.set_pins({"default": "v000002"})
    asyncio.run(f.poll())
    assert f.active == {"default": "v000002", "homepage": "v000001"}
    f.set_pins({})
    asyncio.run(f.poll())
    assert f.active["default"] == "v000003"
    with pytest.raises(ValueError, match=r"pins\['default'\]=3"):
        f.set_pins({"default": 3})


def test_one_scene_with_a_bad_pointer_does_not_hold_up_the_others():
    reg, now = FakeRegistry(default="v000001", homepage="v000004"), [0.0]
    reg.broken["default"] = RegistryError("scene 'default': pointer is not valid JSON")
    f, _, m = _follower(reg, now)
    asyncio.run(f.poll())
    assert f.active == {"homepage": "v000004"}
    assert _value(m, "streamrec_background_errors_total", loop="registry") == 1.0


def test_run_survives_an_unreachable_registry_and_keeps_polling():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    reg.unreachable = OSError("s3 unreachable")
    f, _, m = _follower(reg, now)
    f.poll_s = 0.001

    async def scenario():
        task = asyncio.create_task(f.run())
        while (_value(m, "streamrec_background_errors_total", loop="registry") or 0) < 3:
            await asyncio.sleep(0.001)
        reg.unreachable = None
        while not f.active:
            await asyncio.sleep(0.001)
        assert not task.done()
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert f.active == {"default": "v000001"}


def test_an_unexpected_error_is_a_bug_that_ends_the_follower():
    """Neither permanent nor transient: the follower stops and the replica's health check says so."""
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, _ = _follower(reg, now)
    loader.failures[("default", "v000001")] = [ZeroDivisionError("a bug")]
    f.poll_s = 0.001
    with pytest.raises(ZeroDivisionError):
        asyncio.run(asyncio.wait_for(f.run(), 10))


class OpeningRegistry:
    """`open` answers with a directory, or raises what it was given."""

    def __init__(self, result) -> None:
        self.result = result

    def open(self, scene, version, verify=True):
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def test_the_loader_tells_permanent_from_transient_failures(tmp_path):
    """What the follower relies on: a registry refusal (checksum, missing version) or a malformed
    file is AdapterLoadError; I/O trouble stays an OSError, to be retried."""
    from services.loaded_adapter import LoadedAdapter

    mismatch = ChecksumMismatch("item_embeddings.parquet differs", file="item_embeddings.parquet", expected="a",
                                actual="b")
    with pytest.raises(AdapterLoadError, match="differs"):
        LoadedAdapter.load(OpeningRegistry(mismatch), "default", "v000001")
    with pytest.raises(OSError, match="timed out") as caught:
        LoadedAdapter.load(OpeningRegistry(TimeoutError("timed out")), "default", "v000001")
    assert not isinstance(caught.value, AdapterLoadError)
    with pytest.raises(AdapterLoadError, match="is missing"):
        LoadedAdapter.load(OpeningRegistry(tmp_path), "default", "v000001")
    from training.adapter import ADAPTER_FILE, EMBEDDINGS_FILE

    (tmp_path / ADAPTER_FILE).write_bytes(b"not a torch file")
    (tmp_path / EMBEDDINGS_FILE).write_bytes(b"not parquet either")
    with pytest.raises(AdapterLoadError, match="cannot load"):
        LoadedAdapter.load(OpeningRegistry(tmp_path), "default", "v000001")


# --- readiness -----------------------------------------------------------------------------------
class GatedLoader(FakeLoader):
    """A load that takes until `release` is set: what a replica looks like while it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, scene: str, version: str):
        self.calls.append((scene, version))
        await self.release.wait()
        return SimpleNamespace(index=SimpleNamespace(size=40, recall=1.0), loaded_s=0.01)


def test_a_replica_is_not_ready_while_its_adapter_loads_then_is():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    loader, m = GatedLoader(), ServeMetrics("r1")
    f = RegistryFollower(reg, loader, m, clock=lambda: now[0])
    assert not f.ready and f.scene_state("default") is None and not f.listed  # the registry not read yet

    async def scenario():
        poll = asyncio.create_task(f.poll())
        while not loader.calls:
            await asyncio.sleep(0)
        state = f.scene_state("default")
        assert state.state == "loading" and state.version == "v000001"
        assert not f.ready and f.scene_state("kids") is None  # a scene the registry lacks stays unknown
        loader.release.set()
        await poll

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert f.ready and f.scene_states() == {"default": f.scene_state("default")}
    assert f.scene_state("default").state == "loaded" and f.scene_state("default").version == "v000001"
    assert _value(m, "streamrec_replica_ready") == 1.0


def test_a_transient_failure_keeps_a_fresh_replica_loading_with_the_reason():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, m = _follower(reg, now)
    loader.failures[("default", "v000001")] = [TimeoutError("registry read timed out")]
    asyncio.run(f.poll())
    state = f.scene_state("default")
    assert not f.ready and state.state == "loading" and "attempt 1" in state.reason and "timed out" in state.reason
    assert _value(m, "streamrec_replica_ready") == 0.0
    now[0] += RETRY_FIRST_S
    asyncio.run(f.poll())
    assert f.ready and f.scene_state("default").state == "loaded"


def test_a_refused_version_with_nothing_older_loaded_is_a_declared_fallback_and_ready():
    reg, now = FakeRegistry(default="v000001", homepage="v000002"), [0.0]
    f, loader, m = _follower(reg, now)
    loader.failures[("default", "v000001")] = [AdapterLoadError("default/v000001: checksum mismatch")]
    asyncio.run(f.poll())
    state = f.scene_state("default")
    assert f.ready and state.state == "fallback" and state.version == "v000001" and "checksum" in state.reason
    assert f.scene_state("homepage").state == "loaded"
    assert _value(m, "streamrec_scene_fallback", scene="default") == 1.0
    assert _value(m, "streamrec_scene_fallback", scene="homepage") == 0.0
    reg.versions["default"] = "v000003"  # a new publish ends the fallback
    asyncio.run(f.poll())
    assert f.scene_state("default").state == "loaded" and f.scene_state("default").version == "v000003"
    assert _value(m, "streamrec_scene_fallback", scene="default") == 0.0


def test_ready_latches_a_scene_published_later_loads_without_taking_the_replica_out():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, _ = _follower(reg, now)
    asyncio.run(f.poll())
    assert f.ready
    reg.versions["homepage"] = "v000001"
    loader.failures[("homepage", "v000001")] = [OSError("slow storage")]
    asyncio.run(f.poll())
    assert f.ready and f.scene_state("homepage").state == "loading"  # its requests get 503, the rest answer


def test_a_newer_version_loading_or_refused_leaves_the_scene_loaded_on_the_old_one():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    f, loader, _ = _follower(reg, now)
    asyncio.run(f.poll())
    reg.versions["default"] = "v000002"
    loader.failures[("default", "v000002")] = [AdapterLoadError("default/v000002: wrong shapes")]
    asyncio.run(f.poll())
    state = f.scene_state("default")
    assert state.state == "loaded" and state.version == "v000001" and "v000002 was refused" in state.reason


def test_pointer_errors_malformed_is_fallback_unreachable_is_loading():
    reg, now = FakeRegistry(default="v000001", homepage="v000001"), [0.0]
    reg.broken["default"] = RegistryError("scene 'default': pointer is not valid JSON")
    reg.broken["homepage"] = OSError("object store timed out")
    f, _, _ = _follower(reg, now)
    asyncio.run(f.poll())
    assert f.scene_state("default").state == "fallback" and "not valid JSON" in f.scene_state("default").reason
    assert f.scene_state("homepage").state == "loading" and not f.ready
    del reg.broken["homepage"], reg.broken["default"]
    asyncio.run(f.poll())
    assert f.ready and {s: st.state for s, st in f.scene_states().items()} == {"default": "loaded",
                                                                              "homepage": "loaded"}


def test_an_unreadable_registry_keeps_a_fresh_replica_unready_and_says_why():
    reg, now = FakeRegistry(default="v000001"), [0.0]
    reg.unreachable = OSError("s3 unreachable")
    f, _, _ = _follower(reg, now)
    f.poll_s = 0.001

    async def scenario():
        task = asyncio.create_task(f.run())
        while f.read_error is None:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not f.ready and not f.listed and "s3 unreachable" in f.read_error
