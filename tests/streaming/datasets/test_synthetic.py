"""The synthetic generator (streaming/datasets/synthetic.py): determinism, planted structure, memory."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest

from streaming.datasets import DatasetError, SyntheticConfig, synthetic_dataset, synthetic_options_help
from streaming.datasets.synthetic import SYNTHETIC_EVENT_TYPES, TEXT_WORDS, TITLE_WORDS, resolve_items, topic_words
from streaming.events import EVENT_COLUMNS, ITEM_COLUMNS
from tests.streaming.datasets.files import SMALL


def test_synthetic_is_deterministic_and_batch_size_independent():
    a = synthetic_dataset(SMALL)
    t1 = a.events_table()
    assert t1.equals(a.events_table())  # same dataset, second pass
    assert t1.equals(synthetic_dataset(SMALL).events_table())  # fresh object, same seed
    assert t1.equals(pa.Table.from_batches(list(a.iter_event_batches(777))))
    assert a.items.equals(synthetic_dataset(SMALL).items)
    other = synthetic_dataset(SyntheticConfig(**{**SMALL.__dict__, "seed": 4})).events_table()
    assert not t1.column("item_id").equals(other.column("item_id"))
    # A shorter stream is a prefix of a longer one (ids included).
    short = synthetic_dataset(SyntheticConfig(**{**SMALL.__dict__, "n_events": 5_000})).events_table()
    assert short.equals(t1.slice(0, 5_000))


def test_synthetic_shape_and_schema():
    ds = synthetic_dataset(SyntheticConfig(**{**SMALL.__dict__, "scenes": ("home", "search")}))
    assert ds.name == "synthetic" and ds.n_events == SMALL.n_events
    assert ds.items.schema == ITEM_COLUMNS and ds.items.num_rows == SMALL.n_items
    t = ds.events_table()
    assert t.schema == EVENT_COLUMNS and t.num_rows == SMALL.n_events
    ts = t.column("ts").to_numpy()
    assert ts[0] == SMALL.start_ts_ms and np.all(np.diff(ts) > 0)
    assert abs(np.diff(ts).mean() - SMALL.mean_gap_ms) < 0.05 * SMALL.mean_gap_ms
    assert len(set(t.column("event_id").to_pylist())) == t.num_rows
    assert set(t.column("user_id").to_pylist()) <= {f"u{i}" for i in range(SMALL.n_users)}
    assert set(t.column("item_id").to_pylist()) <= set(ds.items.column("item_id").to_pylist())
    types = Counter(t.column("type").to_pylist())
    assert set(types) <= set(SYNTHETIC_EVENT_TYPES) and types["click"] > 0.7 * t.num_rows
    assert set(t.column("scene").to_pylist()) == {"home", "search"}
    assert t.column("context").null_count == t.num_rows
    # Activity is skewed: the busiest 10% of users make well over 10% of events.
    per_user = sorted(Counter(t.column("user_id").to_pylist()).values(), reverse=True)
    assert sum(per_user[: SMALL.n_users // 10]) > 0.25 * t.num_rows


def test_synthetic_items_reveal_topic():
    ds = synthetic_dataset(SyntheticConfig(n_items=40, n_topics=16, n_events=10))
    truth = ds.truth
    assert truth.topic_names[:2] == ("space", "cooking") and truth.topic_names[14] == "space-2"
    words = topic_words(16)
    for i, row in enumerate(ds.items.to_pylist()):
        t = truth.item_topic[i]
        assert json.loads(row["attributes"]) == {"topic": truth.topic_names[t]}
        text_words = {w.strip(".,:").lower() for w in row["text"].split()}
        assert len(text_words & set(words[t])) >= TITLE_WORDS + TEXT_WORDS
        others = set().union(*(set(w) for j, w in enumerate(words) if j != t))
        assert not text_words & others


def test_synthetic_truth():
    ds = synthetic_dataset(SMALL)
    tr = ds.truth
    assert tr.item_topic.shape == (SMALL.n_items,) and set(tr.item_topic) == set(range(SMALL.n_topics))
    assert tr.user_tastes.shape == (SMALL.n_users, SMALL.n_topics)
    assert np.allclose(tr.user_tastes.sum(1), 1) and np.isclose(tr.user_activity.sum(), 1)
    top2 = np.sort(tr.user_tastes, axis=1)[:, -2:].sum(1)
    assert top2.min() > 0.9  # tastes sit on one or two topics
    assert tr.successors.shape == (SMALL.n_items, SMALL.n_successors)
    assert np.all(tr.item_topic[tr.successors] == tr.item_topic[:, None])
    assert np.all(tr.successors != np.arange(SMALL.n_items)[:, None])


def _sequences(table: pa.Table) -> tuple[list[int], list[int], list[int]]:
    users = [int(u[1:]) for u in table.column("user_id").to_pylist()]
    items = [int(i[1:]) for i in table.column("item_id").to_pylist()]
    prev_of: dict[int, int] = {}
    prevs = []
    for u, i in zip(users, items):
        prevs.append(prev_of.get(u, -1))
        prev_of[u] = i
    return users, items, prevs


def test_synthetic_planted_structure_is_learnable():
    ds = synthetic_dataset(SMALL)
    topic = ds.truth.item_topic
    users, items, prevs = _sequences(ds.events_table())
    pairs = [(p, i) for p, i in zip(prevs, items) if p >= 0]
    same_topic = np.mean([topic[p] == topic[i] for p, i in pairs])
    share = np.bincount(topic[items], minlength=SMALL.n_topics) / len(items)
    assert same_topic > 3 * float((share**2).sum())  # popularity alone gives sum(share^2)

    # Hold-out: learn on the first 80% of the stream, predict the next item on the rest.
    cut = int(0.8 * len(items))
    follows: dict[int, Counter] = defaultdict(Counter)
    for p, i in zip(prevs[:cut], items[:cut]):
        if p >= 0:
            follows[p][i] += 1
    popular = [i for i, _ in Counter(items[:cut]).most_common(10)]
    hits_pop = hits_succ = n = 0
    for p, i in zip(prevs[cut:], items[cut:]):
        if p < 0:
            continue
        n += 1
        guess = [j for j, _ in follows[p].most_common(10)]
        guess += [j for j in popular if j not in guess][: 10 - len(guess)]
        hits_succ += i in guess
        hits_pop += i in popular
    hr_succ, hr_pop = hits_succ / n, hits_pop / n
    assert hr_succ > 0.5 and hr_succ > 2 * hr_pop, (hr_succ, hr_pop)


def test_synthetic_streams_a_million_events_in_bounded_memory():
    ds = synthetic_dataset(SyntheticConfig(n_events=1_000_000, seed=7))
    batch_size = 50_000
    base = pa.total_allocated_bytes()
    peak = 0
    n = 0
    last_ts = -1
    for batch in ds.iter_event_batches(batch_size):
        assert 0 < batch.num_rows <= batch_size
        ts = batch.column("ts").to_numpy()
        assert ts[0] > last_ts
        last_ts = int(ts[-1])
        n += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
        del batch
    assert n == 1_000_000
    assert peak < 24 * 2**20  # a batch and a chunk or two (~8 MB), never the whole stream (~60 MB)


def test_resolve_items_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n_users, n_items, n = int(rng.integers(1, 20)), int(rng.integers(2, 30)), int(rng.integers(0, 200))
        successors = rng.integers(0, n_items, (n_items, 3))
        users, fresh, succ_j = rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, 3, n)
        follow = rng.random(n) < rng.random()
        last = np.where(rng.random(n_users) < 0.5, rng.integers(0, n_items, n_users), -1)
        expected_last = last.copy()
        expected = []
        for k in range(n):
            u = users[k]
            item = successors[expected_last[u], succ_j[k]] if follow[k] and expected_last[u] >= 0 else fresh[k]
            expected.append(item)
            expected_last[u] = item
        assert resolve_items(users, fresh, follow, succ_j, successors, last).tolist() == expected
        assert last.tolist() == expected_last.tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_users": 0}, "n_users=0"),
        ({"n_items": 3, "n_topics": 5}, "n_items=3: must be at least n_topics=5"),
        ({"p_follow": 1.5}, "p_follow=1.5"),
        ({"mean_gap_ms": 0.5}, "mean_gap_ms"),
        ({"scenes": ()}, "scenes"),
        ({"n_events": 10**15}, "year 2200"),
    ],
)
def test_synthetic_config_validation(kwargs, match):
    with pytest.raises(DatasetError, match=match):
        SyntheticConfig(**kwargs)


def test_synthetic_options_help_lists_every_field():
    text = synthetic_options_help()
    for f in dataclasses.fields(SyntheticConfig):
        assert f.name in text
