"""Publishing events and catalog items to Kafka.

    from streaming.producer import EventProducer
    with EventProducer(settings) as p:
        p.send_item({"item_id": "i1", "title": "Alien", "ts": 0})
        p.send_event({"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click", "ts": 1732350000000})

`streamrec produce DATASET [--rate N]` replays a dataset (the catalog first, then the events
in timestamp order) through `replay()`. Events are keyed by user_id, so one user's events
stay in order on one partition; items are keyed by item_id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from tqdm import tqdm

from streaming import kafka_io
from streaming.events import Event, Item, encode
from streaming.settings import Settings

PACING_SLEEP_MAX_S = 0.05


class EventProducer:
    """Thin, validated publishing API over a kafka-python producer."""

    def __init__(self, settings: Settings, *, validate: bool = True, **producer_overrides: Any):
        self.settings = settings
        self.validate = validate
        self._producer = kafka_io.make_producer(settings, **producer_overrides)

    def send_event(self, event: Event | Mapping[str, Any]):
        """Publish one event (validated against the contract unless `validate=False`); returns the future."""
        if self.validate and not isinstance(event, Event):
            event = Event.model_validate(event)
        user_id = event.user_id if isinstance(event, Event) else event["user_id"]
        return self._producer.send(self.settings.events_topic, key=str(user_id).encode(), value=encode(event))

    def send_item(self, item: Item | Mapping[str, Any]):
        """Publish one catalog record (`deleted: true` removes the item); returns the future."""
        if self.validate and not isinstance(item, Item):
            item = Item.model_validate(item)
        item_id = item.item_id if isinstance(item, Item) else item["item_id"]
        return self._producer.send(self.settings.items_topic, key=str(item_id).encode(), value=encode(item))

    def send_raw(self, topic: str, value: bytes | None, key: bytes | None = None):
        """Publish bytes as they are (tests of the DLQ path, foreign producers)."""
        return self._producer.send(topic, key=key, value=value)

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.close()


@dataclass
class ReplayStats:
    items: int = 0
    events: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class Pacer:
    """Holds a loop to `rate` iterations per second (None: as fast as possible)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.start = time.monotonic()
        self.n = 0

    def wait(self) -> None:
        self.n += 1
        if not self.rate:
            return
        due = self.start + self.n / self.rate
        while (ahead := due - time.monotonic()) > 0:
            time.sleep(min(ahead, PACING_SLEEP_MAX_S))


def replay(
    producer: EventProducer,
    items: Iterable[Mapping[str, Any]] | None,
    events: Iterable[Mapping[str, Any]],
    *,
    rate: float | None = None,
    limit: int | None = None,
    total: int | None = None,
    progress: bool = True,
) -> ReplayStats:
    """Publish the catalog, then up to `limit` events in the order given, at `rate` events/s."""
    stats = ReplayStats()
    t0 = time.monotonic()
    if items is not None:
        for item in tqdm(items, desc="items", unit=" items", disable=not progress, leave=False):
            producer.send_item(item)
            stats.items += 1
        producer.flush()
    pacer = Pacer(rate)
    expected = min(x for x in (limit, total) if x is not None) if (limit or total) else None
    with tqdm(total=expected, desc="events", unit=" ev", disable=not progress, smoothing=0.1) as bar:
        for event in _take(events, limit):
            pacer.wait()
            producer.send_event(event)
            stats.events += 1
            if stats.events % 1000 == 0:
                bar.update(1000)
        bar.update(stats.events % 1000)
        producer.flush()
    stats.seconds = time.monotonic() - t0
    return stats


def _take(it: Iterable, limit: int | None) -> Iterator:
    if limit is None:
        yield from it
        return
    for i, x in enumerate(it):
        if i >= limit:
            return
        yield x
