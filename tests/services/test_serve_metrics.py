"""The serving metrics of issue 14: answers by scene and source (the fallback share) and the validation
NDCG@10 of the version a replica serves -- on ServeMetrics alone, then on a replica built in this
process (tests/fixtures/replica.py) whose registry and adapter loads are fakes (tests/fixtures/fake_registry.py)
and whose Redis is unreachable (so an answer that needs Redis takes the popularity fallback)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.api_schema import RecommendResponse
from services.metrics import SOURCE_FALLBACK, SOURCE_MODEL, ServeMetrics
from tests.fixtures.fake_registry import install_fake_loads, install_fake_registry
from tests.fixtures.replica import in_process_replica

ANSWERS = "streamrec_recommendations_total"
NDCG = "streamrec_active_adapter_ndcg_at_10"


def test_answers_are_counted_by_scene_and_source():
    m = ServeMetrics("r1")
    m.serving("default", "v000001", None, 0.3)
    assert m.registry.get_sample_value(ANSWERS, {"scene": "default", "source": SOURCE_FALLBACK}) == 0  # from the start
    for _ in range(3):
        m.answered("default", SOURCE_MODEL)
    m.answered("default", SOURCE_FALLBACK)
    m.answered("homepage", SOURCE_FALLBACK)
    assert m.registry.get_sample_value(ANSWERS, {"scene": "default", "source": SOURCE_MODEL}) == 3
    assert m.registry.get_sample_value(ANSWERS, {"scene": "default", "source": SOURCE_FALLBACK}) == 1
    assert m.registry.get_sample_value(ANSWERS, {"scene": "homepage", "source": SOURCE_FALLBACK}) == 1
    with pytest.raises(ValueError, match="'cache'"):
        m.answered("default", "cache")


def test_the_served_versions_ndcg_replaces_the_previous_ones():
    m = ServeMetrics("r1")
    m.serving("default", "v000001", None, 0.3)
    m.serving("homepage", "v000004", None, 0.2)
    m.serving("default", "v000002", "v000001", 0.35)
    assert m.registry.get_sample_value(NDCG, {"scene": "default", "version": "v000001"}) is None
    assert m.registry.get_sample_value(NDCG, {"scene": "default", "version": "v000002"}) == 0.35
    assert m.registry.get_sample_value(NDCG, {"scene": "homepage", "version": "v000004"}) == 0.2
    m.serving("default", "v000003", "v000002", None)  # its manifest has no NDCG: no series rather than a made-up one
    series = [s.labels for family in m.registry.collect() if family.name == NDCG for s in family.samples]
    assert series == [{"scene": "homepage", "version": "v000004"}]


@pytest.fixture()
def world(monkeypatch):
    """The registry the replica reads (`live`: scene -> CURRENT; `ndcg`: version -> its manifest's
    val_ndcg10) and adapter loads that always succeed."""
    state = SimpleNamespace(live={"default": "v000001"}, ndcg={"v000001": 0.3, "v000002": 0.35})
    install_fake_registry(monkeypatch, state.live, state.ndcg)
    install_fake_loads(monkeypatch).release.set()
    return state


def test_a_replica_counts_model_and_fallback_answers_and_exports_the_served_ndcg(monkeypatch, tmp_path, world):
    with in_process_replica(monkeypatch, tmp_path) as rep:
        value = rep.inst.metrics.registry.get_sample_value
        assert value(NDCG, {"scene": "default", "version": "v000001"}) == 0.3
        status, body, _ = rep.call("POST", "/v1/recommendations", body={"recent_items": ["m1"], "k": 2})
        assert status == 200 and RecommendResponse.model_validate(body).fallback is None
        status, body, _ = rep.call("GET", "/v1/recommendations", "user_id=u1")  # Redis down: popular items
        assert status == 200 and RecommendResponse.model_validate(body).fallback == "popular"
        rep.call("GET", "/v1/recommendations", "user_id=u2")
        assert value(ANSWERS, {"scene": "default", "source": "model"}) == 1
        assert value(ANSWERS, {"scene": "default", "source": "fallback"}) == 2
        rep.call("GET", "/v1/recommendations", "user_id=u1&scene=kids")  # a 404 is no answer
        assert value(ANSWERS, {"scene": "kids", "source": "fallback"}) is None

        world.live["default"] = "v000002"  # a publish: the follower swaps it in
        rep.until(lambda: rep.inst.versions.active.get("default") == "v000002")
        assert value(NDCG, {"scene": "default", "version": "v000002"}) == 0.35
        assert value(NDCG, {"scene": "default", "version": "v000001"}) is None
