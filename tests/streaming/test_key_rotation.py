"""Rotating the pseudonym key (streaming/key_rotation.py): a migration every store follows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from streaming.key_rotation import rotate_key, state_path
from streaming.offline_log import OfflineLog
from streaming.pseudonym import Pseudonymizer, PseudonymKeyError, key_file_path
from streaming.settings import load_settings
from tests.streaming.test_forget import _rows


def _log_users(settings) -> list[str]:
    log = OfflineLog(settings.log_dir)
    return [u for f in log.list_files(settings.events_topic) for u in pq.read_table(f.path).column("user_id").to_pylist()]


def _seed(settings, users: list[str]) -> Pseudonymizer:
    p = Pseudonymizer.from_settings(settings)
    log = OfflineLog(settings.log_dir)
    half = len(users) // 2  # two files, two partitions
    log.write(settings.events_topic, 0, _rows([p(u) for u in users[:half]], [1] * half, start=0))
    log.write(settings.events_topic, 1, _rows([p(u) for u in users[half:]], [3] * (len(users) - half), start=0))
    return p


def test_rotation_migrates_the_log_so_the_new_chain_finds_every_user(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    old = _seed(settings, ["alice", "bob", "alice", "carol"])
    rebuilt = []
    result = rotate_key(settings, keys_out=None, rebuild_online=lambda: rebuilt.append("redis") or 3,
                        rebuild_features=lambda: rebuilt.append("features"))
    new = Pseudonymizer.from_settings(settings, create=False)
    assert new.generation == result.generation == 2 and new.keys[0] == old.keys[0]
    assert sorted(_log_users(settings)) == sorted(new(u) for u in ["alice", "bob", "alice", "carol"])
    assert not set(_log_users(settings)) & {old(u) for u in ("alice", "bob", "carol")}
    assert rebuilt == ["redis", "features"] and result.files_rewritten == 2
    assert not state_path(settings).exists()


def test_a_rotation_that_died_midway_is_finished_by_running_it_again(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    _seed(settings, ["alice", "bob", "carol"])

    def redis_down():
        raise ConnectionError("Redis went away")

    with pytest.raises(ConnectionError):
        rotate_key(settings, keys_out=None, rebuild_online=redis_down, rebuild_features=lambda: None)
    state = json.loads(state_path(settings).read_text())
    assert len(state["done"]) == 2  # the log was migrated and the key written; the rebuilds are left
    once = sorted(_log_users(settings))
    result = rotate_key(settings, keys_out=None, rebuild_online=lambda: 3, rebuild_features=lambda: None)
    assert sorted(_log_users(settings)) == once  # not hashed twice
    assert result.generation == 2 and result.files_rewritten == 0
    assert Pseudonymizer.from_settings(settings).generation == 2


def test_keys_from_the_secret_need_keys_out_and_are_not_written_back(tmp_path):
    key = Pseudonymizer.from_settings(load_settings(data_dir=tmp_path / "k")).keys[0]
    settings = load_settings(data_dir=tmp_path, pseudonym_keys=SecretStr(key.hex()))
    _seed(settings, ["alice", "bob"])
    with pytest.raises(PseudonymKeyError, match="--keys-out"):
        rotate_key(settings, keys_out=None, rebuild_online=lambda: 0, rebuild_features=lambda: None)
    out = tmp_path / "new-keys"
    rotate_key(settings, keys_out=out, rebuild_online=lambda: 0, rebuild_features=lambda: None)
    chain = Pseudonymizer.from_settings(load_settings(data_dir=tmp_path, pseudonym_key_file=out), create=False)
    assert chain.keys[0] == key and chain.generation == 2
    assert set(_log_users(settings)) == {chain("alice"), chain("bob")}
    assert not key_file_path(settings).exists()


@pytest.mark.integration
def test_rotate_key_command_keeps_every_user_servable(embedded_stack, ray_local, tmp_path, monkeypatch):
    """Through the CLI on the real stack: after the rotation, Redis answers the new pseudonyms."""
    from typer.testing import CliRunner

    from services.cli import app
    from streaming.features import load_feature_tables, run_features
    from streaming.ingest import Ingestor
    from streaming.online_store import OnlineStore
    from streaming.producer import EventProducer
    from streaming.redis_io import make_redis
    from streaming.settings import settings_env
    from tests.streaming.helpers import isolated_settings

    settings = isolated_settings(embedded_stack, tmp_path)
    with EventProducer(settings) as producer:
        for i in range(30):
            producer.send_event({"event_id": f"e{i}", "user_id": f"user-{i % 3}", "item_id": f"i{i % 5}",
                                 "type": "click", "ts": 1_700_000_000_000 + i})
        producer.flush(30)
    Ingestor(settings).run(until_idle_s=2.0)
    run_features(settings, progress=False)
    store = OnlineStore(make_redis(settings), settings.redis_prefix)
    old = Pseudonymizer.from_settings(settings)
    before = {u: store.recent_items(old(u)) for u in ("user-0", "user-1", "user-2")}
    assert all(before.values())

    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    refused = CliRunner().invoke(app, ["privacy", "rotate-key"])
    assert refused.exit_code == 2 and "--yes" in refused.output
    result = CliRunner().invoke(app, ["privacy", "rotate-key", "--yes"])
    assert result.exit_code == 0, result.output
    assert "rotated to key generation 2" in result.output

    new = Pseudonymizer.from_settings(settings, create=False)
    assert {u: store.recent_items(new(u)) for u in before} == before  # same histories, new names
    assert all(store.recent_items(old(u)) == [] for u in before)
    seq_users = set(load_feature_tables(settings).sequences.column("user_id").to_pylist())
    assert seq_users == {new(u) for u in before}
    looked_up = CliRunner().invoke(app, ["privacy", "pseudonym", "user-1"])
    assert looked_up.exit_code == 0 and looked_up.output.strip() == new("user-1")
