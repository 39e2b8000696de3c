"""Unit tests of the model, the training windows and the checkpoint dict (no Ray, no services)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.adapter import checkpoint_dict, load_state
from training.corpus import CorpusError, gap_bucket, history_features, training_windows
from training.lm import resolve_base_model
from training.model import ModelConfig
from training.train_step import TrainConfig, build_model, make_optimizer, numpy_batches, train_epoch

TEXTS = [f"item {i} about {'space rockets' if i % 2 else 'garden flowers'}" for i in range(12)]


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(base_model=resolve_base_model(None), dim=16, max_len=6, heads=2, blocks=1, **kw)


def test_training_windows_are_causal_and_cover_every_target():
    items = [np.arange(10, dtype=np.int32)]
    ts = [np.arange(10, dtype=np.int64) * 1000]
    w = training_windows(items, ts, 4)
    # Windows end at n-1, then go back by max_len: inputs 5..8 (-> 6..9), 1..4 (-> 2..5), 0 (-> 1).
    assert w["inputs"].shape == (3, 4)
    targets = sorted(int(t) - 1 for t in w["targets"].ravel() if t)
    assert targets == list(range(1, 10))  # every item but the first is a target exactly once
    row = w["inputs"][0], w["targets"][0]
    assert list(row[0]) == [6, 7, 8, 9] and list(row[1]) == [7, 8, 9, 10]  # index + 1, shifted by one
    h = training_windows(items, ts, 4, horizon=3)["targets"]
    assert h.shape == (3, 4, 3)
    assert list(h[0, -1]) == [10, 0, 0]  # the last input has one future item left
    with pytest.raises(CorpusError):
        training_windows([np.array([1], dtype=np.int32)], [np.array([0])], 4)


def test_target_masks_drop_targets_but_keep_inputs():
    items = [np.arange(6, dtype=np.int32)]
    ts = [np.arange(6, dtype=np.int64)]
    mask = [np.array([True, True, False, False, True, True])]
    w = training_windows(items, ts, 8, target_masks=mask)
    assert sorted(int(t) - 1 for t in w["targets"].ravel() if t) == [1, 4, 5]
    assert sorted(int(t) - 1 for t in w["inputs"].ravel() if t) == [0, 1, 2, 3, 4]


def test_history_features_left_pad_and_gaps():
    inputs, gaps = history_features([np.array([3, 4], dtype=np.int32)], [np.array([0, 8000])], np.array([9000]), 4)
    assert list(inputs[0]) == [0, 0, 4, 5]
    assert gaps[0, 0] == 0 and gaps[0, 3] == gap_bucket(np.array([8000]))[0]


def test_seen_mask_hides_earlier_items_but_not_the_target():
    model = build_model(small_cfg(use_text=False), TEXTS, np.ones(12, dtype=bool))
    inputs = torch.tensor([[0, 3, 5, 3]])
    targets = torch.tensor([[0, 5, 3, 9]])  # the 2nd target repeats an input
    seen = model._seen_mask(inputs, targets)
    assert seen[0, 1, 3] and not seen[0, 1, 5]  # target 5 at position 1 stays allowed
    assert seen[0, 3, 5] and not seen[0, 3, 9]
    assert not seen[0, 0].any()


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_a_few_steps_lower_the_loss(loss):
    rng = np.random.default_rng(0)
    # Two "tastes": odd items follow odd items, even follow even.
    seqs = [np.array([(2 * rng.integers(0, 6) + u % 2) for _ in range(8)], dtype=np.int32) for u in range(40)]
    ts = [np.arange(8, dtype=np.int64) * 60_000 for _ in seqs]
    w = training_windows(seqs, ts, 6)
    model = build_model(small_cfg(lora_layers=1), TEXTS, np.ones(12, dtype=bool))
    model.refresh_text_cache()
    cfg = TrainConfig(batch_size=16, lr=5e-3, loss=loss, sampled_negatives=8, fresh_items=4)
    opt = make_optimizer(model, cfg)
    log_q = torch.full((12,), float(np.log(1 / 12)))
    first = train_epoch(model, numpy_batches(w, 16, seed=0), opt, cfg, log_q=log_q)["loss"]
    for epoch in range(1, 8):
        last = train_epoch(model, numpy_batches(w, 16, seed=epoch), opt, cfg, log_q=log_q)["loss"]
    assert np.isfinite(first) and last < first
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)  # the LM adapters learn


def test_checkpoint_dict_round_trip_and_carry_over_by_item_id():
    cfg = small_cfg()
    model = build_model(cfg, TEXTS, np.ones(12, dtype=bool), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = [f"i{i}" for i in range(12)]
    ckpt = checkpoint_dict(model, ids, np.ones(12, dtype=bool))
    assert set(ckpt) >= {"format", "model_config", "item_ids", "warm", "lora", "heads"}
    assert ckpt["lora"] and "id_emb.weight" in ckpt["heads"]
    again = build_model(cfg, TEXTS, np.ones(12, dtype=bool), seed=2, parent=ckpt)
    model.eval(), again.eval()
    model.refresh_text_cache(), again.refresh_text_cache()
    assert torch.allclose(model.item_table(), again.item_table(), atol=1e-5)
    # A new catalog in another order with one new item: ID rows follow the ids.
    new_ids = ["new"] + ids[::-1]
    index = {item: i for i, item in enumerate(new_ids)}
    grown = build_model(cfg, ["brand new thing"] + TEXTS[::-1], np.ones(13, dtype=bool), seed=3, parent=ckpt,
                        item_index=index)
    assert torch.allclose(grown.id_emb.weight[index["i4"] + 1], model.id_emb.weight[4 + 1])
    with pytest.raises(ValueError, match="format"):
        load_state(again, {**ckpt, "format": 99})


def test_cold_items_are_placed_by_text_alone():
    cfg = small_cfg()
    warm = np.array([True] * 10 + [False] * 2)
    model = build_model(cfg, TEXTS, warm).eval()
    model.refresh_text_cache()
    table = model.item_table()
    # A cold item's embedding is exactly its text vector; a warm one differs by its ID embedding.
    text_only = model.text_vectors([TEXTS[11]])[0]
    assert torch.allclose(table[12], text_only, atol=1e-5)
    assert not torch.allclose(table[2], model.text_vectors([TEXTS[1]])[0], atol=1e-3)
