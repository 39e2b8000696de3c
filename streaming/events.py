"""The event contract: what producers put on the `events` and `items` topics.

`events` (key = user_id)::

    {"event_id": "e-1", "user_id": "u7", "item_id": "i42", "type": "click",
     "ts": 1732350000000, "scene": "home", "context": {"device": "ios"}}

`items` (key = item_id)::

    {"item_id": "i42", "title": "Alien", "text": "A space horror classic",
     "attributes": {"genre": "sci-fi"}, "ts": 1732350000000, "deleted": false}

Ids may be JSON strings or numbers (stored as text); `ts` is epoch milliseconds.
Unknown fields are accepted and dropped (kept out of features). Anything else wrong
-- not UTF-8, not JSON, not an object, a missing or ill-typed field, an unknown event
type, a payload over the size limit -- is a `BadRecord` with a reason code and a
detail, bound for the DLQ.

This module is the one home of the contract. Everything else that spells out its fields is
derived here from the two pydantic models: the Arrow columns datasets yield (`EVENT_COLUMNS`,
`ITEM_COLUMNS`), the offline log's schemas (`EVENT_LOG_SCHEMA`, `ITEM_LOG_SCHEMA`: the contract
plus where the consumer read the record), the ingest row builders, the columns the feature
job reads and the fields the online store's Lua script receives. A field added to a model
reaches all of them; `tests/streaming/test_contract.py` fails when a copy appears elsewhere.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

# Inclusive bounds on `ts` (epoch ms): 1970-01-01 .. 2200-01-01. Seconds instead of
# milliseconds (a common producer bug) still pass for recent dates, so the producer library
# always writes milliseconds.
TS_MIN_MS = 0
TS_MAX_MS = 7_258_118_400_000
ID_MAX_LEN = 256
TITLE_MAX_LEN = 1024
TEXT_MAX_LEN = 16_384


# A JSON string or number, stored as text; blank or over-long ids are refused. (Numbers are
# turned into text by pydantic-core itself: a Python validator here cost half the parse time.)
Id = Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN, pattern=r"\S")]


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)


class Event(_Record):
    """One user interaction on the `events` topic."""

    event_id: Id = Field(description="Unique id of the event; producers retrying a send reuse it.")
    user_id: Id
    item_id: Id
    type: StrictStr = Field(description="Interaction type, one of the configured event types.")
    ts: StrictInt = Field(ge=TS_MIN_MS, le=TS_MAX_MS, description="Event time, epoch milliseconds.")
    scene: StrictStr | None = Field(default=None, max_length=64, description="Scenario (page, app surface).")
    context: dict[str, Any] | None = None


class Item(_Record):
    """One catalog record on the `items` topic; `deleted: true` removes the item."""

    item_id: Id
    title: StrictStr = Field(max_length=TITLE_MAX_LEN)
    text: StrictStr | None = Field(default=None, max_length=TEXT_MAX_LEN)
    attributes: dict[str, Any] | None = None
    ts: StrictInt = Field(ge=TS_MIN_MS, le=TS_MAX_MS)
    deleted: bool = False


# --- the contract as Arrow columns --------------------------------------------------------

# Arrow type of a field's plain Python type. Dicts travel as JSON text: their keys are free-form,
# and a Parquet struct column would fix one set of keys for every record.
ARROW_TYPES: dict[type, pa.DataType] = {str: pa.string(), int: pa.int64(), bool: pa.bool_(), dict: pa.string()}
# `deleted` is a log column, not a dataset column: a dataset's catalog lists the items that
# exist, and deletions only happen on the `items` topic.
ITEM_LOG_ONLY_FIELDS = ("deleted",)
# Where the consumer read the record; every log row ends with these.
PROVENANCE_COLUMNS = pa.schema(
    [
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("ingest_ts", pa.int64()),  # epoch ms when the consumer read it
    ]
)
# Log columns no feature reads: `context` is free-form, `ingest_ts` is bookkeeping.
NON_FEATURE_COLUMNS = ("context", "ingest_ts")


def plain_type(annotation: Any) -> type:
    """The Python type under a field annotation: `str` for `Annotated[str, ...]` and `str | None`,
    `dict` for `dict[str, Any] | None`."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"no single type under {annotation!r}")
            annotation = args[0]
        else:
            return origin or annotation


def arrow_fields(model: type[BaseModel]) -> list[pa.Field]:
    """The model's fields as Arrow fields, in declaration order (all nullable, as Parquet reads them)."""
    out = []
    for name, info in model.model_fields.items():
        kind = plain_type(info.annotation)
        if kind not in ARROW_TYPES:
            raise TypeError(f"{model.__name__}.{name}: no Arrow column type for {info.annotation!r}")
        out.append(pa.field(name, ARROW_TYPES[kind]))
    return out


def json_columns(model: type[BaseModel]) -> tuple[str, ...]:
    """The model's dict fields, which are JSON text in Arrow columns."""
    return tuple(n for n, info in model.model_fields.items() if plain_type(info.annotation) is dict)


def json_text(value: dict | None) -> str | None:
    """A dict field as its column value: compact JSON text (None stays None)."""
    return json.dumps(value, separators=(",", ":")) if value is not None else None


# The contract's tables: what a dataset yields, and how every log row starts.
EVENT_COLUMNS = pa.schema(arrow_fields(Event))
ITEM_COLUMNS = pa.schema([f for f in arrow_fields(Item) if f.name not in ITEM_LOG_ONLY_FIELDS])
EVENT_JSON_COLUMNS = json_columns(Event)
ITEM_JSON_COLUMNS = json_columns(Item)
# The offline log's files: the whole record, then its provenance.
EVENT_LOG_SCHEMA = pa.schema([*arrow_fields(Event), *PROVENANCE_COLUMNS])
ITEM_LOG_SCHEMA = pa.schema([*arrow_fields(Item), *PROVENANCE_COLUMNS])
# The log columns the feature job reads (streaming.features).
EVENT_FEATURE_COLUMNS = tuple(n for n in EVENT_LOG_SCHEMA.names if n not in NON_FEATURE_COLUMNS)
# An event's fields the online store applies, in the order its Lua script receives them after
# the record's offset (streaming.online_store builds the payload and the script's indices from it).
ONLINE_EVENT_FIELDS = ("user_id", "item_id", "ts")


def log_row_builder(model: type[BaseModel], schema: pa.Schema, name: str) -> Callable[..., tuple]:
    """A function `name(record, <provenance...>)` returning one log row: a tuple in `schema`'s
    column order, dict fields as JSON text. The ingest hot loop builds hundreds of thousands of
    rows a second, so the function is generated as the plain tuple expression one would write
    by hand (a loop over the columns per row cost twice as much)."""
    fields, as_json = model.model_fields, set(json_columns(model))
    params = [n for n in schema.names if n not in fields]
    values = [f"json_text(record.{n})" if n in as_json else f"record.{n}" if n in fields else n for n in schema.names]
    source = f"def {name}(record, {', '.join(params)}):\n    return ({', '.join(values)},)\n"
    namespace: dict[str, Any] = {"json_text": json_text}
    exec(compile(source, f"<streaming.events.{name}>", "exec"), namespace)  # noqa: S102 (our own source)
    builder = namespace[name]
    builder.__module__ = __name__
    builder.__doc__ = f"One `{model.__name__}` as a row of the log schema: ({', '.join(schema.names)})."
    builder.source = source
    return builder


event_log_row = log_row_builder(Event, EVENT_LOG_SCHEMA, "event_log_row")
item_log_row = log_row_builder(Item, ITEM_LOG_SCHEMA, "item_log_row")


@dataclass(frozen=True)
class BadRecord:
    """Why a record was refused. `reason` is a stable code; `detail` is for humans."""

    reason: str
    detail: str


# Stable reason codes (the `dlq.reason` header).
PAYLOAD_TOO_LARGE = "payload_too_large"
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
EMPTY_PAYLOAD = "empty_payload"


def _classify_validation(exc: ValidationError) -> BadRecord:
    errors = exc.errors(include_url=False)
    first = errors[0]
    # pydantic appends the union member (`str`, `int`) to the location; the field name is enough.
    loc = str(first["loc"][0]) if first.get("loc") else "<record>"
    kind = first.get("type", "")
    if kind == "missing":
        missing = sorted({".".join(map(str, e["loc"])) for e in errors if e.get("type") == "missing"})
        return BadRecord(MISSING_FIELD, "missing field(s): " + ", ".join(missing))
    if kind in ("model_type", "model_attributes_type", "dict_type") and not first.get("loc"):
        return BadRecord(NOT_OBJECT, f"expected a JSON object, got {type(first.get('input')).__name__}")
    value = repr(first.get("input"))
    if len(value) > 80:
        value = value[:77] + "..."
    return BadRecord(INVALID_FIELD, f"field {loc}={value}: {first.get('msg')}")


def _decode(payload: bytes | None, max_bytes: int) -> Any | BadRecord:
    if payload is None or len(payload) == 0:
        return BadRecord(EMPTY_PAYLOAD, "record has no value")
    if len(payload) > max_bytes:
        return BadRecord(PAYLOAD_TOO_LARGE, f"{len(payload)} bytes > limit {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(NOT_UTF8, f"invalid UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord(NOT_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}")
    if not isinstance(obj, dict):
        return BadRecord(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse(model: type[_Record], payload: bytes | None, max_bytes: int) -> _Record | BadRecord:
    if not payload:
        return BadRecord(EMPTY_PAYLOAD, "record has no value")
    if len(payload) > max_bytes:
        return BadRecord(PAYLOAD_TOO_LARGE, f"{len(payload)} bytes > limit {max_bytes}")
    try:
        # The fast path parses and validates in one pass (pydantic-core); only a failure pays
        # for the slower decoding below, which tells not-UTF-8 / not-JSON / not-an-object apart.
        return model.__pydantic_validator__.validate_json(payload)
    except ValidationError:
        pass
    obj = _decode(payload, max_bytes)
    if isinstance(obj, BadRecord):
        return obj
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        return _classify_validation(exc)


def parse_event(payload: bytes | None, event_types: frozenset[str] | set[str], max_bytes: int) -> Event | BadRecord:
    """Decode and validate one `events` record."""
    event = _parse(Event, payload, max_bytes)
    if isinstance(event, BadRecord):
        return event
    if event.type not in event_types:
        return BadRecord(UNKNOWN_EVENT_TYPE, f"type={event.type!r} is not one of {sorted(event_types)}")
    return event


def parse_item(payload: bytes | None, max_bytes: int) -> Item | BadRecord:
    """Decode and validate one `items` record."""
    return _parse(Item, payload, max_bytes)


def encode(record: Event | Item | dict[str, Any]) -> bytes:
    """Serialize an event or item for the wire (compact JSON, None fields dropped)."""
    if isinstance(record, BaseModel):
        record = record.model_dump(exclude_none=True)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
