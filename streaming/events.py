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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

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
