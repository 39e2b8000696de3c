"""Hard negatives (training/hard_negatives.py, the loss term in training/model.py): the log reader on
constructed Parquet files, the loss term's direction, and the default (off) leaving training untouched.
Unit tests: no Ray, no services, an ID-only model of a few items."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from streaming.events import EVENT_LOG_SCHEMA, IMPRESSION_LOG_SCHEMA
from streaming.offline_log import OfflineLog, file_name
from streaming.settings import load_settings
from training.corpus import Catalog, Corpus, training_windows
from training.hard_negatives import (
    per_user_indices,
    read_shown_not_clicked,
    shown_not_clicked,
    with_hard_negatives,
)
from training.model import ModelConfig, declined_penalty
from training.presets import get_preset
from training.train_step import (
    TrainConfig,
    build_model,
    make_optimizer,
    numpy_batches,
    train_epoch,
)

WINDOW_S = 1.0
TEN = [f"t{i}" for i in range(12)]  # an answer of 12 items: positions 11 and 12 are below the shown ones

# (request_id, user_id, item_ids, ts)
IMPRESSIONS = [
    ("r1", "u1", ["a", "b", "c", "d"], 10_000),  # b clicked through r1, c interacted with (old file)
    ("r2", "u1", ["e", "a"], 20_000),  # newer: e, a come first; a only once
    ("r3", None, ["f", "g"], 15_000),  # anonymous: belongs to u2, who clicked g through it
    ("r4", None, ["x", "y"], 15_000),  # anonymous, never clicked: nobody's
    ("r5", "u3", ["z"], 29_600),  # its window (until 30_600) is still open at now = 30_000
    ("r6", "u4", TEN, 5_000),
    ("r7", "u5", ["h", "i"], 1_000),  # h clicked late (after the window): still not a negative
]
# (user_id, item_id, request_id, ts); None request_id: an event from no answer
CLICKS = [
    ("u1", "b", "r1", 10_500),
    ("u2", "g", "r3", 15_200),
    ("u5", "h", "r7", 25_000),
    ("u9", "q", None, 30_000),  # the latest ts in the logs: now
]
OLD_EVENTS = [("u1", "c", 9_000)]  # written before events had request_id / position
EXPECTED = {"u1": ["e", "a", "d"], "u2": ["f"], "u4": TEN[:10], "u5": ["i"]}


def impressions_table() -> pa.Table:
    cols = list(zip(*IMPRESSIONS))
    n = len(IMPRESSIONS)
    return pa.table({
        "request_id": list(cols[0]), "user_id": list(cols[1]), "scene": ["default"] * n, "version": ["v000001"] * n,
        "variant": ["control"] * n, "experiment": [None] * n, "item_ids": list(cols[2]),
        "scores": [[1.0] * len(x) for x in cols[2]], "fallback": [None] * n, "ts": list(cols[3]),
        "partition": [0] * n, "offset": list(range(n)), "ingest_ts": list(cols[3])}, schema=IMPRESSION_LOG_SCHEMA)


def events_table(rows: list[tuple], first_offset: int) -> pa.Table:
    n = len(rows)
    return pa.table({
        "event_id": [f"e{first_offset + k}" for k in range(n)], "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows], "type": ["click"] * n, "ts": [r[3] for r in rows], "scene": [None] * n,
        "context": [None] * n, "request_id": [r[2] for r in rows], "position": [None] * n, "partition": [0] * n,
        "offset": list(range(first_offset, first_offset + n)), "ingest_ts": [r[3] for r in rows]},
        schema=EVENT_LOG_SCHEMA)


def test_shown_not_clicked_exact_sets():
    events = events_table(CLICKS + [(u, i, None, t) for u, i, t in OLD_EVENTS], 0)
    assert shown_not_clicked(impressions_table(), events, window_ms=1000) == EXPECTED
    # With the clock far ahead every window is closed, u3's impression too; top 2 positions only.
    later = shown_not_clicked(impressions_table(), events, window_ms=1000, now_ms=10**9, top_positions=2)
    assert later["u3"] == ["z"] and later["u4"] == TEN[:2] and later["u1"] == ["e", "a"]  # d was at position 4
    # A scene's adapter takes that scene's impressions only (r2 was shown in "home"); clicks exclude in any scene.
    imp = impressions_table()
    imp = imp.set_column(imp.schema.get_field_index("scene"), "scene",
                         pa.array(["home" if r == "r2" else "default" for r in imp.column("request_id").to_pylist()]))
    assert shown_not_clicked(imp, events, window_ms=1000, scene="home") == {"u1": ["e", "a"]}
    assert shown_not_clicked(imp, events, window_ms=1000, scene="default")["u1"] == ["a", "d"]


def test_read_from_the_log_with_an_old_event_file(tmp_path):
    settings = load_settings(data_dir=tmp_path, attribution_window_s=WINDOW_S)
    log = OfflineLog(settings.log_dir)
    log.write(settings.impressions_topic, 0, impressions_table())
    log.write(settings.events_topic, 0, events_table(CLICKS, 10))
    # An event file of the old contract: no request_id, no position column.
    old_cols = [n for n in EVENT_LOG_SCHEMA.names if n not in ("request_id", "position")]
    old = events_table([(u, i, None, t) for u, i, t in OLD_EVENTS], 0).select(old_cols)
    directory = tmp_path / "log" / settings.events_topic / "date=2026-01-01"
    directory.mkdir(parents=True)
    pq.write_table(old, directory / file_name(settings.events_topic, 1, 0, 0))
    assert read_shown_not_clicked(settings) == EXPECTED
    assert read_shown_not_clicked(load_settings(data_dir=tmp_path / "empty")) == {}


def test_per_user_indices_leave_out_the_users_own_items_and_unknown_items(tmp_path):
    catalog = Catalog(list("abcdefi"), list("abcdefi"), list("abcdefi"), np.ones(7, dtype=bool))
    ix = catalog.index
    # u1's sequence holds d (say, its test target): d is no hard negative for u1.
    corpus = Corpus(catalog, ["u1", "u2", "u7"], [np.array([ix["d"], ix["b"]], dtype=np.int32),
                                                   np.array([ix["a"]], dtype=np.int32), np.array([ix["c"]], dtype=np.int32)],
                    [np.array([1, 2]), np.array([1]), np.array([1])])
    shown = {"u1": ["e", "zz", "a", "d"], "u2": ["f", "e", "c"]}
    got = per_user_indices(corpus, shown, max_per_user=2)
    assert [h.tolist() for h in got] == [[ix["e"], ix["a"]], [ix["f"], ix["e"]], []]
    with pytest.raises(ValueError, match="hard_negative_max=0"):
        per_user_indices(corpus, shown, 0)
    settings = load_settings(data_dir=tmp_path)  # an empty log: every user gets none (and a warning)
    assert [len(h) for h in with_hard_negatives(corpus, settings, 5).hard_negatives] == [0, 0, 0]


def test_windows_carry_each_users_hard_negatives():
    items = [np.arange(6, dtype=np.int32), np.array([2, 3, 4], dtype=np.int32)]
    ts = [np.arange(6, dtype=np.int64), np.arange(3, dtype=np.int64)]
    plain = training_windows(items, ts, 3)
    hard = [np.array([9, 8, 7], dtype=np.int32), np.zeros(0, dtype=np.int32)]
    w = training_windows(items, ts, 3, hard_negatives=hard, hard_negative_max=2)
    assert set(w) == {"inputs", "gaps", "targets", "hard_negatives"}
    for k in plain:
        np.testing.assert_array_equal(plain[k], w[k])
    # user 0 has two windows, user 1 one: rows are index + 1, padded with 0
    assert w["hard_negatives"].tolist() == [[10, 9], [10, 9], [0, 0]]
    none = training_windows(items, ts, 3, hard_negatives=[np.zeros(0, dtype=np.int32)] * 2, hard_negative_max=2)
    assert set(none) == set(plain)  # nobody has any: the windows are exactly the plain ones


# --- the loss ------------------------------------------------------------------------------------

N_ITEMS = 8
DECLINED = 5  # item index the user was shown and did not click (never an input or a target here)
SEEDS = (0, 1)


def tiny_model(seed: int = 0, temperature: float = 0.05):
    cfg = ModelConfig(use_text=False, dim=8, max_len=4, heads=1, blocks=1, dropout=0.0, temperature=temperature)
    return build_model(cfg, [str(i) for i in range(N_ITEMS)], np.ones(N_ITEMS, dtype=bool), seed=seed)


def tiny_windows(hard: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    items = [rng.choice([0, 1, 2, 3, 4], size=7).astype(np.int32) for _ in range(12)]
    ts = [np.arange(7, dtype=np.int64) * 1000 for _ in items]
    negatives = [np.array([DECLINED], dtype=np.int32)] * len(items) if hard else None
    return training_windows(items, ts, 4, hard_negatives=negatives, hard_negative_max=1)


def as_batch(windows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).long() for k, v in windows.items()}


def train_history(windows, cfg: TrainConfig, *, temperature: float = 0.05, sgd_lr: float | None = None,
                  full_batch: bool = False) -> tuple[list[float], torch.nn.Module]:
    model = tiny_model(cfg.seed, temperature)
    opt = torch.optim.SGD(model.parameters(), lr=sgd_lr) if sgd_lr else make_optimizer(model, cfg)
    losses = []
    for epoch in range(cfg.epochs):
        batches = [as_batch(windows)] if full_batch else numpy_batches(windows, cfg.batch_size, seed=epoch)
        train_epoch(model, batches, opt, cfg, on_step=lambda _n, loss: losses.append(loss))
    return losses, model


def declined_log_probability(model, windows) -> torch.Tensor:
    """Mean log-probability of the declined item at every training position of `windows`."""
    table = model.item_table()
    states = model.user_states(torch.from_numpy(windows["inputs"]), torch.from_numpy(windows["gaps"]), table)
    logits = states[torch.from_numpy(windows["targets"]) > 0] @ table.T / model.cfg.temperature
    logits[:, 0] = float("-inf")
    return torch.log_softmax(logits, -1)[:, DECLINED + 1].mean()


def gradient(model, loss_fn) -> torch.Tensor:
    model.zero_grad()
    loss_fn().backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_gradient_pushes_the_declined_item_down(loss, seed):
    """First order, exactly: a gradient step with the term lowers the declined item's log-probability
    more than the same step without it (the directional derivative along -gradient is lower)."""
    model = tiny_model(seed)
    hard = as_batch(tiny_windows(hard=True))
    kw = {"loss": loss, "fresh_items": 0, "sampled_negatives": 4, "mask_seen": False}

    def step_direction(**extra) -> torch.Tensor:
        torch.manual_seed(seed)  # the same uniform negatives for the sampled loss
        return gradient(model, lambda: model.next_item_loss(hard["inputs"], hard["gaps"], hard["targets"], **kw, **extra))

    without, with_term = step_direction(), step_direction(hard_negatives=hard["hard_negatives"])
    towards = gradient(model, lambda: declined_log_probability(model, tiny_windows(hard=False)))
    # d logp / dt along -g is -<towards, g>: with the term it must be lower.
    assert float(-(towards @ with_term)) < float(-(towards @ without)), (loss, seed)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_training_lowers_the_declined_items_probability(loss):
    plain = tiny_windows(hard=False)
    for seed in SEEDS:
        cfg = TrainConfig(epochs=10, loss=loss, sampled_negatives=4, mask_seen=False, seed=seed)
        # temperature 1 and plain SGD on the whole batch: a smooth, deterministic path for a model this small
        _, without = train_history(plain, cfg, temperature=1.0, sgd_lr=0.1, full_batch=True)
        _, with_term = train_history(tiny_windows(hard=True), dataclasses.replace(cfg, hard_negatives=True),
                                     temperature=1.0, sgd_lr=0.1, full_batch=True)
        with torch.no_grad():
            assert declined_log_probability(with_term, plain) < declined_log_probability(without, plain), seed


def test_declined_penalty_is_zero_for_padding_and_grows_with_probability():
    logp = torch.log_softmax(torch.tensor([[0.0, 3.0, 0.0, 1.0]]), -1)
    cols = torch.tensor([[1, 3, 0]])
    valid = torch.tensor([[True, True, False]])
    value = declined_penalty(logp, cols, valid)
    p = logp.exp()[0]
    assert float(value) == pytest.approx(float(-torch.log1p(-p[1]) - torch.log1p(-p[3])), rel=1e-5)
    assert float(declined_penalty(logp, cols, torch.zeros_like(valid))) == 0.0


def test_default_off_leaves_training_bit_identical():
    assert TrainConfig().hard_negatives is False
    assert get_preset("quick").train.hard_negatives is False
    on = get_preset("quick+hard-negatives")
    assert on.train.hard_negatives and on.train.epochs == get_preset("quick").train.epochs
    assert on.name == "quick+hard-negatives"
    with pytest.raises(ValueError, match="unknown preset option 'nope'"):
        get_preset("quick+nope")
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, loss="full")
    reference, _ = train_history(tiny_windows(hard=False), cfg)
    again, _ = train_history(tiny_windows(hard=False), cfg)
    assert again == reference  # same seed, same history: the comparison below is meaningful
    # Off: the windows carry no hard negatives (train_on_split passes None), the history is the same.
    plain_path = training_windows([np.arange(5, dtype=np.int32)], [np.arange(5)], 4, hard_negatives=None,
                                  hard_negative_max=cfg.hard_negative_max)
    assert "hard_negatives" not in plain_path
    # On with weight 0 (full softmax): the extra column changes no number and draws no random number.
    zero, _ = train_history(tiny_windows(hard=True), dataclasses.replace(cfg, hard_negatives=True,
                                                                         hard_negative_weight=0.0))
    assert zero == reference
    with pytest.raises(ValueError, match="hard_negative_weight=-1"):
        TrainConfig(hard_negative_weight=-1.0)
