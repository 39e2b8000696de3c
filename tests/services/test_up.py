"""`streamrec up`'s guard against a restarted (empty) embedded broker over old offsets, and --fresh.

The whole loop under `up` is tests/services/test_up_e2e.py; this is the refusal path, with the
real embedded Redis (a broker is started by `up` itself)."""

from __future__ import annotations

import pytest
import redis

from services.processes import free_port
from services.stack import stack_status, start_stack, stop_stack
from services.up import Up, UpError, UpOptions, archive_state
from streaming.settings import load_settings

pytestmark = pytest.mark.integration


def test_a_new_broker_over_old_offsets_is_refused_and_fresh_archives_instead_of_deleting(tmp_path):
    data = tmp_path / "data"
    start_stack(data, kafka=False, redis=True)  # Redis (with its AOF) outlived the broker of an earlier run
    try:
        url = stack_status(data).redis_url
        r = redis.Redis.from_url(url)
        r.set("sr:wm:events:0", 41)
        r.set("other:key", 1)
        (data / "log" / "events").mkdir(parents=True)
        (data / "log" / "events" / "events+0+0+41.parquet").write_bytes(b"old")
        (data / "log" / "forget").mkdir()
        (data / "log" / "forget" / "t1.json").write_text("{}")  # a forget tombstone
        settings = load_settings(data_dir=data, kafka_bootstrap_servers=None, redis_url=None)
        lines: list[str] = []
        up = Up(settings, UpOptions(port=free_port()), echo=lines.append)
        with pytest.raises(UpError, match="--fresh") as err:
            up.start()
        assert "reuse its offsets" in str(err.value) and str(data) in str(err.value)
        up.stop()
        assert any("left running" in line for line in lines)  # Redis was there before: not ours to stop

        dest = archive_state(settings.model_copy(update={"redis_url": url}))
        assert (dest / "log" / "events" / "events+0+0+41.parquet").read_bytes() == b"old"
        assert sorted(p.name for p in (data / "log").iterdir()) == ["forget"]  # forgotten users stay forgotten
        assert (data / "log" / "forget" / "t1.json").exists() and (dest / "log" / "forget" / "t1.json").exists()
        assert r.get("sr:wm:events:0") is None and r.get("other:key") == b"1"  # only the prefix's keys go
    finally:
        stop_stack(data)


def test_port_in_use_is_named(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        up = Up(load_settings(data_dir=tmp_path), UpOptions(port=port), echo=lambda _: None)
        with pytest.raises(UpError, match=f"port {port} is in use"):
            up.start()
        up.stop()
    assert stack_status(tmp_path) is None  # refused before anything was started
