"""The dataset types (streaming/datasets/base.py): contract columns, dicts, in-memory datasets."""

from __future__ import annotations

import pyarrow as pa
import pytest

from streaming.datasets import DatasetError, InMemoryDataset, SyntheticConfig, load_movielens, synthetic_dataset
from streaming.events import EVENT_COLUMNS, EVENT_LOG_SCHEMA, ITEM_COLUMNS, ITEM_LOG_SCHEMA, Event, Item
from tests.streaming.datasets.files import SMALL, write_ml100k


def test_dicts_validate_against_the_event_contract(tmp_path):
    for ds in (load_movielens(write_ml100k(tmp_path / "a")), synthetic_dataset(SyntheticConfig(n_events=200, scenes=("home",)))):
        events = list(ds.event_dicts())
        assert len(events) == ds.n_events
        for e in events:
            Event.model_validate(e)
        for i in ds.item_dicts():
            Item.model_validate(i)
    assert events[0]["scene"] == "home" and "context" not in events[0]


def test_in_memory_dataset_sorts_stably_and_casts():
    events = pa.table({"event_id": ["a", "b", "c"], "user_id": ["u"] * 3, "item_id": ["i"] * 3,
                       "type": ["click"] * 3, "ts": pa.array([5, 1, 5], pa.int32()),
                       "scene": pa.nulls(3, pa.string()), "context": pa.nulls(3, pa.string())})
    items = pa.table({"item_id": ["i"], "title": ["I"], "text": [None], "attributes": [None], "ts": [0]})
    ds = InMemoryDataset(name="x", items=items, n_events=None, events=events)
    assert ds.n_events == 3 and ds.events.schema == EVENT_COLUMNS and ds.items.schema == ITEM_COLUMNS
    assert ds.events_table().column("event_id").to_pylist() == ["b", "a", "c"]
    assert [b.num_rows for b in ds.iter_event_batches(2)] == [2, 1]


def test_schema_matches_offline_log():
    for mine, log in ((EVENT_COLUMNS, EVENT_LOG_SCHEMA), (ITEM_COLUMNS, ITEM_LOG_SCHEMA)):
        for f in mine:
            assert log.field(f.name).type == f.type


def test_bad_batch_size(tmp_path):
    for ds in (synthetic_dataset(SMALL), load_movielens(write_ml100k(tmp_path / "m"))):
        with pytest.raises(DatasetError, match="batch_size"):
            next(ds.iter_event_batches(0))
