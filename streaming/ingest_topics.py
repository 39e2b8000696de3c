"""What ingest does with each topic it reads: the decoder, the log schema and row builder, the Redis apply.

    events       parse_event_fields -> Redis (recent items, popularity) + log (EVENT_LOG_SCHEMA)
    items        parse_item         -> Redis (catalog)                  + log (ITEM_LOG_SCHEMA)
    impressions  parse_impression   -> log only (IMPRESSION_LOG_SCHEMA)

Events, the hot path, travel as plain field dicts (`parse_event_fields`, below); items and
impressions as models. For an event most of `parse_event`'s cost is building the frozen model
instance, not parsing or checking (measured here: 2.8-3.4 us per event with the model, 0.7-0.8 us
for the same validation into a dict), so ingest asks a validator of the model's own fields for a
dict (`fields_validator`, derived from `Event.model_fields`: the contract stays in `streaming.events`
alone) and leaves every refusal to `parse_event` itself:

    parse_event_fields(payload, event_types, max_bytes) -> dict of every Event field | BadRecord
    event_fields_log_row(fields, partition, offset, ingest_ms) -> the log row `event_log_row` builds

`tests/streaming/test_ingest_fast_path.py` holds both paths to the same decisions and values on the
fuzzer's hostile payloads and on mostly-valid ones.

Impressions have no online state, but their partitions still pass through the Redis apply with no
records (`OnlineStore.apply_events(topic, partition, [], upto)`, what a batch of only bad records does
on the other topics): the partition's offset watermark advances, so `Ingestor.rewind_lost` and
`Ingestor.resync_after_outage` treat the topic like the others (a Redis that lost its last second
re-reads from its watermark + 1, and the log writer skips what it already holds) instead of seeking
back to offset 0 for want of a watermark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, TypeAdapter
from pydantic_core import SchemaValidator
from typing_extensions import NotRequired, Required, TypedDict

from streaming.events import (
    EVENT_LOG_SCHEMA,
    IMPRESSION_LOG_SCHEMA,
    ITEM_LOG_SCHEMA,
    NON_FINITE_ID_TEXTS,
    BadRecord,
    Event,
    impression_log_row,
    item_log_row,
    log_row_builder,
    parse_event,
)
from streaming.settings import Settings

EVENTS, ITEMS, IMPRESSIONS = "events", "items", "impressions"


# --- events: the decoder of the hot path ---------------------------------------------------------


def fields_validator(model: type[BaseModel]) -> SchemaValidator:
    """A validator of `model`'s fields that returns a plain dict instead of a model instance.

    Building the frozen model instance costs about three quarters of `validate_json` on an event
    (measured: 2.8-3.4 us per event with the model, 0.7-0.8 us with this), and ingest validates
    every record. The fields are the model's own (`model_fields`: each annotation with its
    constraints, via `FieldInfo.rebuild_annotation`), never spelled out again, under the model's
    config (unknown keys dropped, numbers as id text); a field with a default may be absent from
    the dict (`NotRequired`): `parse_event_fields` fills the defaults in. Model-level validators
    would not be carried over, so a model that has any is refused here."""
    if model.__pydantic_decorators__.model_validators:
        raise TypeError(f"{model.__name__} has model validators: a field validator cannot stand in for it")
    shape = {name: (Required if info.is_required() else NotRequired)[info.rebuild_annotation()]
             for name, info in model.model_fields.items()}
    fields = TypedDict(f"{model.__name__}Fields", shape)  # type: ignore[operator]
    fields.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
        **{k: v for k, v in model.model_config.items() if k != "frozen"})  # frozen: a model's instances only
    return TypeAdapter(fields).validator


_EVENT_FIELDS = fields_validator(Event)
# What an absent optional field reads as (every default is immutable: shared safely between dicts).
EVENT_FIELD_DEFAULTS = {n: info.default for n, info in Event.model_fields.items() if not info.is_required()}
_EVENT_FIELD_COUNT = len(Event.model_fields)


def parse_event_fields(payload: bytes | None, event_types: frozenset[str] | set[str],
                       max_bytes: int) -> dict[str, Any] | BadRecord:
    """`parse_event`'s decision as a plain dict of every `Event` field (defaults filled in), or the
    same `BadRecord`: ingest's hot path, ~3x cheaper per good record than building the model.

    Only acceptance takes the fast validator (`fields_validator(Event)`: the model's own fields and
    config). Whatever it refuses, or does not settle (an unknown type, an id that may have been a
    NaN / Infinity token, any exception), is decided by `parse_event` itself, so every refusal is
    `parse_event`'s `BadRecord`, reason and detail alike (`tests/streaming/test_ingest_fast_path.py`
    checks both paths agree on fuzzed payloads). The dict is the caller's to change. Never raises."""
    if payload and len(payload) <= max_bytes:
        try:
            fields = _EVENT_FIELDS.validate_json(payload)
        except Exception:  # noqa: BLE001 (ValidationError, or anything else: parse_event decides and reports it)
            fields = None
        # (the id check inline, not a call: this runs for every event ingest reads)
        if (fields is not None and fields["type"] in event_types and fields["event_id"] not in NON_FINITE_ID_TEXTS
                and fields["user_id"] not in NON_FINITE_ID_TEXTS and fields["item_id"] not in NON_FINITE_ID_TEXTS):
            return fields if len(fields) == _EVENT_FIELD_COUNT else {**EVENT_FIELD_DEFAULTS, **fields}
    parsed = parse_event(payload, event_types, max_bytes)
    return parsed if parsed.__class__ is BadRecord else dict(parsed.__dict__)


# The log row `streaming.events.event_log_row` builds, from the field dict instead of the model.
event_fields_log_row = log_row_builder(Event, EVENT_LOG_SCHEMA, "event_fields_log_row", from_fields=True)


# --- the routes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicRoute:
    """One topic's handling in `streaming.ingest.Ingestor.process` / `_persist`."""

    kind: str  # EVENTS, ITEMS or IMPRESSIONS
    schema: pa.Schema  # its log files' schema
    to_row: Callable  # record (events: its field dict), partition, offset, ingest ms -> a log row (a tuple in `schema`'s order)


def topic_routes(settings: Settings) -> dict[str, TopicRoute]:
    """topic name -> its route, for the three topics ingest subscribes to."""
    return {
        settings.events_topic: TopicRoute(EVENTS, EVENT_LOG_SCHEMA, event_fields_log_row),
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


__all__ = ["EVENTS", "EVENT_FIELD_DEFAULTS", "IMPRESSIONS", "ITEMS", "TopicRoute", "event_fields_log_row",
           "fields_validator", "parse_event_fields", "rows_to_table", "topic_routes", "user_topics"]
