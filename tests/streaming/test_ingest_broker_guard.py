"""`streamrec ingest` alone refuses a broker other than the one Redis's watermarks came from
(streaming.broker_identity), with real embedded brokers and the real Redis; `--fresh` starts over."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from services.stack import EmbeddedStack
from streaming.broker_identity import broker_key, fetch_broker_identity, read_recorded
from streaming.kafka_io import ensure_topics, make_admin
from streaming.producer import EventProducer
from streaming.settings import settings_env
from tests.streaming.helpers import isolated_settings, popularity_total, read_log, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI_TIMEOUT_S = 240


def _ingest(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "ingest", "--until-idle", "2", "--no-progress", "--features-every", "0",
         *args], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def _produce(settings, n: int, tag: str) -> None:
    with EventProducer(settings) as producer:
        for i in range(n):
            producer.send_event({"event_id": f"{tag}{i}", "user_id": f"u{i % 7}", "item_id": f"i{i % 5}",
                                 "type": "click", "ts": 1_000 + i})


def test_ingest_refuses_a_new_broker_over_old_watermarks_and_fresh_starts_over(embedded_stack, tmp_path):
    with EmbeddedStack(tmp_path / "broker-a", redis=False) as a:
        settings_a = isolated_settings(embedded_stack, tmp_path / "data", kafka_bootstrap_servers=a.kafka_bootstrap)
        _produce(settings_a, 40, "a")
        done = _ingest(settings_a)
        assert done.returncode == 0, done.stderr[-3000:]
        id_a, _ = fetch_broker_identity(settings_a, [settings_a.events_topic, settings_a.items_topic,
                                                     settings_a.impressions_topic])
    r = redis.Redis.from_url(settings_a.redis_url)
    assert read_recorded(r, settings_a.redis_prefix) == id_a  # recorded beside the watermarks
    assert id_a.cluster_id and set(id_a.topic_ids) == {settings_a.events_topic, settings_a.items_topic,
                                                       settings_a.impressions_topic}
    assert popularity_total(settings_a) == 40

    # The embedded broker restarted: a fresh cluster whose offsets start at 0 again.
    with EmbeddedStack(tmp_path / "broker-b", redis=False) as b:
        settings_b = settings_a.model_copy(update={"kafka_bootstrap_servers": b.kafka_bootstrap})
        ensure_topics(settings_b)
        _produce(settings_b, 30, "b")
        id_b, _ = fetch_broker_identity(settings_b, [settings_b.events_topic])
        refused = _ingest(settings_b)
        assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
        msg = refused.stderr
        for needed in (id_a.cluster_id, id_b.cluster_id, id_a.topic_ids[settings_a.events_topic],
                       "streamrec ingest --fresh", b.kafka_bootstrap, "skipped as already applied"):
            assert needed in msg, f"{needed!r} missing from:\n{msg}"
        assert popularity_total(settings_b) == 40  # nothing was ingested from the new broker

        fresh = _ingest(settings_b, "--fresh")
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        assert "30 events" in fresh.stdout
        assert popularity_total(settings_b) == 30  # exactly the new broker's events, none skipped
        assert read_log(settings_b).num_rows == 30
        assert list((settings_b.data_dir / "archive").iterdir())  # the old log was moved, not deleted
        assert read_recorded(r, settings_b.redis_prefix).cluster_id == id_b.cluster_id

        # A topic recreated on the same cluster: a new topic id, the same refusal.
        admin = make_admin(settings_b)
        try:
            admin.delete_topics([settings_b.events_topic])
            wait_for(lambda: settings_b.events_topic not in admin.list_topics(), 30, "the topic to be deleted")
        finally:
            admin.close()
        ensure_topics(settings_b)
        recreated = _ingest(settings_b)
        assert recreated.returncode == 2, recreated.stderr[-3000:]
        assert f"topic {settings_b.events_topic!r} id" in recreated.stderr
    assert r.exists(broker_key(settings_b.redis_prefix))
