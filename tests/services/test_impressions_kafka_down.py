"""Kafka down under load: every recommendation is still answered, every impression is dropped and
counted, none is retried on the request path (services/impressions.py through services/serve_app.py,
against a replica built in this process whose Kafka is a closed port)."""

from __future__ import annotations

import asyncio

import pytest

from services.api_schema import RecommendResponse
from tests.fixtures.fake_registry import install_fake_loads, install_fake_registry
from tests.fixtures.replica import asgi_request, closed_port, in_process_replica, run_until

N_REQUESTS = 600
CONCURRENCY = 50
# the writer gives up on an unacknowledged record after this (30 s in production): the test waits less
MESSAGE_TIMEOUT_MS = 1_000
DROPS_WAIT_S = 60.0  # how long the test waits for every impression to be counted (a slow, shared machine)


def _counter(rep, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = rep.inst.metrics.exposition()
    text = text.decode() if isinstance(text, bytes) else text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_kafka_down_drops_and_counts_impressions_and_fails_no_request(monkeypatch, tmp_path):
    from services import impressions
    from services.serve_app import api

    monkeypatch.setattr(impressions, "MESSAGE_TIMEOUT_MS", MESSAGE_TIMEOUT_MS)

    install_fake_registry(monkeypatch, {"default": "v000001"})
    loads = install_fake_loads(monkeypatch)
    loads.release.set()
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port()}", "STREAMREC_IMPRESSION_BUFFER_MAX": "200"}
    with in_process_replica(monkeypatch, tmp_path, env=env) as rep:
        rep.until(lambda: rep.inst.versions.ready)
        assert rep.inst.impressions is not None

        async def load():
            sem = asyncio.Semaphore(CONCURRENCY)

            async def one(i):
                async with sem:
                    return await asgi_request(api, "POST", "/v1/recommendations", body={"recent_items": [f"m{i % 7}"],
                                                                                         "k": 3, "user_id": f"u{i}"})
            return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))

        answers = rep.loop.run_until_complete(load())
        assert [status for status, _, _ in answers] == [200] * N_REQUESTS
        ids = {RecommendResponse.model_validate(body).request_id for _, body, _ in answers}
        assert len(ids) == N_REQUESTS  # one id per answer
        # every impression ends dropped (buffer full at once, the rest when they time out unacknowledged)
        run_until(rep.loop, lambda: _counter(rep, "streamrec_impressions_dropped_total") == N_REQUESTS, DROPS_WAIT_S)
        assert _counter(rep, "streamrec_impressions_written_total") == 0
        assert rep.inst.impressions.pending() == 0
        assert rep.call("GET", "/healthz", key=None)[0] == 200
