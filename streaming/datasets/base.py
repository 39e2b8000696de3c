"""What a dataset is: an item catalog plus a stream of interaction events, both as Arrow data
whose columns are the event contract's (`streaming.events.EVENT_COLUMNS` / `ITEM_COLUMNS`), so a
producer can publish them as they are and training can read them without a broker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.events import EVENT_COLUMNS, EVENT_JSON_COLUMNS, ITEM_COLUMNS, ITEM_JSON_COLUMNS

DEFAULT_BATCH_SIZE = 10_000
CATALOG_TS_MS = 0  # item `ts` of loaded catalogs: known before any event, so a replay can publish items first


class DatasetError(ValueError):
    """A dataset cannot be found, fetched, parsed or configured; the message says where and why."""


@dataclass
class Dataset:
    """An item catalog plus a time-ordered event stream.

    `iter_event_batches` yields `EVENT_COLUMNS` batches of at most `batch_size` rows, ordered
    by `ts` ascending; events with equal `ts` keep their source order. Every call starts
    from the beginning and yields the same events.
    """

    name: str
    items: pa.Table  # ITEM_COLUMNS
    n_events: int | None  # None when unknown before streaming

    def iter_event_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def events_table(self) -> pa.Table:
        """All events in one table (materialises the stream: for small datasets and tests)."""
        return pa.Table.from_batches(list(self.iter_event_batches()), schema=EVENT_COLUMNS)

    def event_dicts(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict[str, Any]]:
        """Events as dicts valid as `streaming.events.Event` (None fields dropped, context parsed)."""
        for batch in self.iter_event_batches(batch_size):
            for row in batch.to_pylist():
                yield _json_row(row, EVENT_JSON_COLUMNS)

    def item_dicts(self) -> Iterator[dict[str, Any]]:
        """Items as dicts valid as `streaming.events.Item` (None fields dropped, attributes parsed)."""
        for row in self.items.to_pylist():
            yield _json_row(row, ITEM_JSON_COLUMNS)


def _json_row(row: dict[str, Any], json_columns: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if v is not None}
    for column in json_columns:
        if column in out:
            out[column] = json.loads(out[column])
    return out


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size that is not a positive integer."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass
class InMemoryDataset(Dataset):
    """A dataset whose events are one Arrow table; sorted by `ts` here (stable) unless already."""

    events: pa.Table

    def __post_init__(self) -> None:
        self.events = self.events.select(EVENT_COLUMNS.names).cast(EVENT_COLUMNS).combine_chunks()
        ts = self.events.column("ts").to_numpy()
        if len(ts) > 1 and not np.all(ts[1:] >= ts[:-1]):
            self.events = sorted_by_ts(self.events)
        self.items = self.items.select(ITEM_COLUMNS.names).cast(ITEM_COLUMNS).combine_chunks()
        self.n_events = self.events.num_rows

    def iter_event_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        check_batch_size(batch_size)
        for offset in range(0, self.events.num_rows, batch_size):
            yield one_batch(self.events.slice(offset, batch_size))

    def events_table(self) -> pa.Table:
        return self.events


def one_batch(table: pa.Table) -> pa.RecordBatch:
    """A non-empty table as a single record batch."""
    return table.combine_chunks().to_batches()[0]


def sorted_by_ts(table: pa.Table) -> pa.Table:
    """Stable sort by ts: equal timestamps keep the source order."""
    order = np.argsort(table.column("ts").to_numpy(), kind="stable")
    return table.take(pa.array(order))


def numbered_ids(prefix: str, n: int, start: int = 0) -> pa.Array:
    """prefix0, prefix1, ... as an Arrow string array (vectorised)."""
    numbers = pc.cast(pa.array(np.arange(start, start + n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), numbers, "")
