"""Training end to end on real local Ray: feature tables -> Ray Train -> evaluation -> registry.

Data: the synthetic generator's planted tastes, written into the offline log the way the consumer
writes it, then folded into feature tables by the real feature job.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.datasets import load_dataset
from streaming.features import run_features
from streaming.job_metrics import metrics_file, read_job_metrics
from streaming.settings import Settings, settings_env
from tests.fixtures.trained_adapter import FIRST_EVENTS
from tests.streaming.test_features import write
from training import train_metrics as tm
from training.adapter import ADAPTER_FILE, EMBEDDINGS_FILE, load_adapter, read_embeddings
from training.corpus import NotEnoughData
from training.lm import resolve_base_model
from training.model import ModelConfig
from training.registry import Registry
from training.train_run import GATE_REFUSED, NOTHING_NEW, OUTCOME_FILE, run_training
from training.train_step import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2
SPEC = "synthetic:n_users=250,n_items=80,n_events=12000,n_topics=4,seed=3,p_follow=0.6"
SMALL_MODEL = dict(dim=32, max_len=20, heads=2, blocks=1, lora_layers=1)
QUICK = TrainConfig(epochs=6, batch_size=64, lr=3e-3, fresh_items=16, refresh_every=3)


def log_rows(ds, start: int, stop: int, offsets: dict[int, int]):
    table = ds.events_table().slice(start, stop - start)
    rows = []
    for r in table.to_pylist():
        p = zlib.crc32(r["user_id"].encode()) % PARTITIONS
        rows.append({**r, "partition": p, "offset": offsets[p], "ingest_ts": 0})
        offsets[p] += 1
    return rows


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset(SPEC, Path("unused"))


def settings_for(tmp: Path) -> Settings:
    return Settings(data_dir=tmp, user_buckets=2, features_interval_s=0)


def ingest(settings: Settings, ds, start: int, stop: int, offsets: dict[int, int], with_items: bool) -> None:
    if with_items:
        items = [{**r, "deleted": False, "partition": 0, "offset": i, "ingest_ts": 0}
                 for i, r in enumerate(ds.items.to_pylist())]
        write(settings, "items", items)
    write(settings, "events", log_rows(ds, start, stop, offsets))
    run_features(settings, progress=False)


def test_train_publish_incremental_and_gate(tmp_path, ray_local, synthetic, first_adapter, monkeypatch):
    # The first run (the first 9,000 events, from scratch) is shared with test_canary.py: it is trained
    # once per session (tests/fixtures/trained_adapter.py) and this test continues on a copy of its data.
    data_dir, offsets = first_adapter.copy_to(tmp_path / "data")
    settings = settings_for(data_dir)
    req = first_adapter.request
    first = first_adapter.outcome
    assert req.model_config == ModelConfig(base_model=resolve_base_model(None), **SMALL_MODEL)
    assert req.train_config == QUICK and not req.incremental
    assert first.published is not None and first.published.version == "v000001", first.gate_message
    report = json.loads((first.run_dir / "evaluation.json").read_text())["results"]
    popular = report["popular"]["test"]["ndcg10"]
    assert first.metrics["test_ndcg10"] > 2 * popular, (first.metrics, popular)  # planted tastes are learned
    for name in ("loss.png", "loss.json", "evaluation.png", "evaluation.md"):
        assert (first.run_dir / name).stat().st_size > 0
    registry = Registry(settings.registry_uri)
    live = registry.current("default")
    files = set(live.manifest["files"])
    assert {ADAPTER_FILE, EMBEDDINGS_FILE} <= files
    assert live.manifest["data_window"]["watermarks"]["events"]  # offsets of the data it saw
    assert live.manifest["base_model_sha256"] and live.manifest["metrics"]["val_ndcg10"] > 0
    ids, warm, emb = read_embeddings(registry.open("default") / EMBEDDINGS_FILE)
    assert len(ids) == 80 and emb.shape == (80, 32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)

    # Incremental: new events arrive; the next run starts from v1 and trains on what is new.
    ingest(settings, synthetic, FIRST_EVENTS, 12000, offsets, with_items=False)
    inc_req = dataclasses.replace(req, incremental=True, train_config=dataclasses.replace(QUICK, epochs=2))
    second = run_training(settings, inc_req)
    assert second.published is not None, second.gate_message
    assert second.published.manifest["parent"] == "v000001" and second.published.manifest["incremental"]
    parent = load_adapter(registry.open("default", "v000001") / ADAPTER_FILE)
    child = load_adapter(registry.open("default", "v000002") / ADAPTER_FILE)
    a, b = parent["heads"]["id_emb.weight"][1:], child["heads"]["id_emb.weight"][1:]
    similarity = torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()
    assert similarity > 0.8, similarity  # it continued from the parent rather than from a fresh init

    # Nothing new since v2: `streamrec train --incremental` (what the nightly RayJob runs) ends normally,
    # exit 0, without training, and says so in one line and its outcome file.
    from typer.testing import CliRunner

    from services.cli import app

    for var, value in settings_env(settings).items():
        monkeypatch.setenv(var, value)
    out = tmp_path / "train-outcome.json"
    result = CliRunner().invoke(app, ["train", "--incremental", "--no-progress", "--outcome-json", str(out)])
    assert result.exit_code == 0, result.output
    assert "outcome: nothing new (no events past v000002's data window; v000002 stays live)" in result.output
    assert json.loads(out.read_text())["outcome"] == NOTHING_NEW
    # ...and leaves its outcome metrics (training/train_metrics.py), with the live adapter's NDCG@10.
    prom = read_job_metrics(metrics_file(settings, tm.train_metrics_name("default")))
    assert prom.value(tm.LAST_OUTCOME, scene="default", outcome="nothing_new") == 1
    assert [prom.value(tm.RUNS, scene="default", outcome=o) for o in tm.TRAIN_OUTCOMES] == [0, 0, 1, 0]
    assert prom.value(tm.LIVE_NDCG, scene="default") == registry.current("default").metrics["val_ndcg10"] > 0
    assert 0 < prom.value(tm.LAST_SUCCESS, scene="default") == prom.value(tm.LAST_RUN, scene="default")
    with pytest.raises(NotEnoughData):
        run_training(settings, inc_req)

    # A run that learns nothing (learning rates 0) must not replace the live adapter.
    dud = dataclasses.replace(req, train_config=dataclasses.replace(QUICK, epochs=1, lr=0.0, lm_lr=0.0))
    third = run_training(settings, dud)
    assert third.published is None and "gate refused" in third.gate_message
    assert third.kind == GATE_REFUSED and "v000002 stays live" in third.detail
    assert json.loads((third.run_dir / OUTCOME_FILE).read_text())["outcome"] == GATE_REFUSED
    assert registry.current("default").version == "v000002"

