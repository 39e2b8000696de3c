"""An error a replica survives is counted every time and logged at most once per interval."""

import logging

import pytest

from services.metrics import ERROR_LOG_INTERVAL_S, ServeMetrics


def test_survived_errors_are_counted_always_and_logged_rate_limited(caplog):
    now = [100.0]
    m = ServeMetrics("r1", clock=lambda: now[0])
    assert m.registry.get_sample_value("streamrec_background_errors_total", {"loop": "catalog"}) == 0.0
    with caplog.at_level(logging.WARNING, logger="services.metrics"):
        for _ in range(5):
            m.survived("catalog", ConnectionError("refused"), "catch-up failed")
        now[0] += ERROR_LOG_INTERVAL_S
        m.survived("catalog", ConnectionError("refused"), "catch-up failed")
        m.survived("recent_items", TimeoutError("slow"), "popularity fallback")
    assert m.registry.get_sample_value("streamrec_background_errors_total", {"loop": "catalog"}) == 6.0
    assert m.registry.get_sample_value("streamrec_request_errors_total", {"what": "recent_items"}) == 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert "ConnectionError: refused" in lines[0] and "(4 more since the last report)" in lines[1]
    assert lines[2].startswith("recent_items: popularity fallback")


def test_an_unknown_error_site_is_refused_by_name():
    with pytest.raises(ValueError, match="'nosuch'"):
        ServeMetrics("r1").survived("nosuch", OSError(), "x")


def test_every_exported_series_names_its_replica():
    from prometheus_client.parser import text_string_to_metric_families

    m = ServeMetrics("replica-7")
    m.requests.labels("GET /v1/recommendations", "200").inc(3)
    m.latency.labels("GET /v1/recommendations").observe(0.01)
    families = list(text_string_to_metric_families(m.exposition().decode()))
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels.get("replica") == "replica-7" for s in samples)
    assert any(s.name == "streamrec_requests_total" and s.value == 3.0 and s.labels["status"] == "200" for s in samples)
    assert any(s.name == "streamrec_request_seconds_bucket" for s in samples)
