"""What ingest does with each topic it reads: the decoder, the log schema and row builder, the Redis apply.

    events       parse_event      -> Redis (recent items, popularity) + log (EVENT_LOG_SCHEMA)
    items        parse_item       -> Redis (catalog)                  + log (ITEM_LOG_SCHEMA)
    impressions  parse_impression -> log only (IMPRESSION_LOG_SCHEMA)

Impressions have no online state, but their partitions still pass through the Redis apply with no
records (`OnlineStore.apply_events(topic, partition, [], upto)`, what a batch of only bad records does
on the other topics): the partition's offset watermark advances, so `Ingestor.rewind_lost` and
`Ingestor.resync_after_outage` treat the topic like the others (a Redis that lost its last second
re-reads from its watermark + 1, and the log writer skips what it already holds) instead of seeking
back to offset 0 for want of a watermark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from streaming.events import (
    EVENT_LOG_SCHEMA,
    IMPRESSION_LOG_SCHEMA,
    ITEM_LOG_SCHEMA,
    event_log_row,
    impression_log_row,
    item_log_row,
)
from streaming.settings import Settings

EVENTS, ITEMS, IMPRESSIONS = "events", "items", "impressions"


@dataclass(frozen=True)
class TopicRoute:
    """One topic's handling in `streaming.ingest.Ingestor.process` / `_persist`."""

    kind: str  # EVENTS, ITEMS or IMPRESSIONS
    schema: pa.Schema  # its log files' schema
    to_row: Callable  # record, partition, offset, ingest ms -> a log row (a tuple in `schema`'s order)


def topic_routes(settings: Settings) -> dict[str, TopicRoute]:
    """topic name -> its route, for the three topics ingest subscribes to."""
    return {
        settings.events_topic: TopicRoute(EVENTS, EVENT_LOG_SCHEMA, event_log_row),
        settings.items_topic: TopicRoute(ITEMS, ITEM_LOG_SCHEMA, item_log_row),
        settings.impressions_topic: TopicRoute(IMPRESSIONS, IMPRESSION_LOG_SCHEMA, impression_log_row),
    }


def user_topics(settings: Settings) -> tuple[str, ...]:
    """The logged topics whose rows name a user (pseudonym, column `user_id`): what forget purges."""
    return (settings.events_topic, settings.impressions_topic)


# Log rows are tuples in the column order of the route's schema, built by `streaming.events`' row
# builders (the hot loop builds hundreds of thousands per second; a dict per row cost more than the
# Parquet write).
def rows_to_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = zip(*rows)
    return pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, schema)], schema=schema)


__all__ = ["EVENTS", "IMPRESSIONS", "ITEMS", "TopicRoute", "rows_to_table", "topic_routes", "user_topics"]
