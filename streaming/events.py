"""The event contract: what producers put on the `events` and `items` topics.

`events` (key = user_id)::

    {"event_id": "e-1", "user_id": "u7", "item_id": "i42", "type": "click",
     "ts": 1732350000000, "scene": "home", "context": {"device": "ios"}}

A click on a recommendation may carry the answer's `request_id` and the item's 1-based
`position` in it (`"request_id": "r-5f0c...", "position": 3`): it is then attributed to that
answer's impression (streaming/features/attribution.py).

`items` (key = item_id)::

    {"item_id": "i42", "title": "Alien", "text": "A space horror classic",
     "attributes": {"genre": "sci-fi"}, "ts": 1732350000000, "deleted": false}

Ids may be JSON strings or numbers (stored as text); `ts` is epoch milliseconds.
Unknown fields are accepted and dropped (kept out of features). Anything else wrong
-- not UTF-8, not JSON, not an object, a missing or ill-typed field, an unknown event
type, a payload over the size limit -- is a `BadRecord` with a reason code and a
detail, bound for the DLQ.

What the decoder (`parse_event`, `parse_item`) guarantees, for any bytes (fuzzed by
`tests/streaming/test_events_fuzz.py`):

* it returns a record or a `BadRecord` whose `reason` is one of `REASONS`; it never raises
  (a bug would come back as `decoder_error`, logged at ERROR without the payload) and never
  recurses without bound: a record nested deeper than `MAX_JSON_DEPTH` levels is `too_deep`;
* a record it returns satisfies the models below, and every value it keeps is plain JSON that
  any reader can take back: numbers are finite (NaN, Infinity and literals that overflow a
  double are refused where kept: `invalid_field`), integers inside `context` / `attributes`
  fit 64 bits, strings are Unicode text (an escaped lone surrogate such as `"\\ud800"` is
  refused where kept; one in raw bytes is `not_utf8`); an id never reads as a non-finite
  number (`NaN`, `inf`, `-inf`: what a NaN / Infinity token would have become);
* duplicate keys: the last one wins, at every level, as in JSON.parse and Python's json. Both
  parsers here agree on it, and the stored record is the decoded one (the log and Redis never
  keep the raw bytes), so no reader downstream can see another value for a key. Rejecting them
  would cost a second, slower parse of every record.

This module is the one home of the contract. Everything else that spells out its fields is
derived here from the two pydantic models: the Arrow columns datasets yield (`EVENT_COLUMNS`,
`ITEM_COLUMNS`), the offline log's schemas (`EVENT_LOG_SCHEMA`, `ITEM_LOG_SCHEMA`: the contract
plus where the consumer read the record), the ingest row builders, the columns the feature
job reads and the fields the online store's Lua script receives. A field added to a model
reaches all of them; `tests/streaming/test_contract.py` fails when a copy appears elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
import types
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union, get_args, get_origin

import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

log = logging.getLogger(__name__)

# Inclusive bounds on `ts` (epoch ms): 1970-01-01 .. 2200-01-01. Seconds instead of
# milliseconds (a common producer bug) still pass for recent dates, so the producer library
# always writes milliseconds.
TS_MIN_MS = 0
TS_MAX_MS = 7_258_118_400_000
ID_MAX_LEN = 256
TITLE_MAX_LEN = 1024
TEXT_MAX_LEN = 16_384
DETAIL_VALUE_CHARS = 80  # how much of a bad value a DLQ detail quotes
MAX_POSITION = 1000  # a click's `position` in the answer it came from (1-based; answers hold at most this)
SCENE_MAX_LEN = 64
# Nesting limit of a record, its own object being level 1 (a `too_deep` record). pydantic-core's
# parser (the fast path) stops here too, and Python's json (the slow path) would raise
# RecursionError a few hundred levels further: the limit makes both paths refuse the same
# records. (The fast path takes one more level of arrays, only ever seen inside an unknown
# field, which is dropped.)
MAX_JSON_DEPTH = 200
# Integers inside `context` / `attributes`: the 64-bit range (signed or unsigned), which every
# JSON reader downstream (Arrow, pandas, Go, Java) takes back exactly.
JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1
# Longest integer literal the slow path turns into an int: above every id (ID_MAX_LEN) and below
# Python's int-parsing limit (4300 digits, a ValueError). A longer one can be kept nowhere.
MAX_INT_LITERAL_DIGITS = 1000
# What a NaN / Infinity / overflowing number token becomes as an id (pydantic-core's float text).
NON_FINITE_ID_TEXTS = frozenset({"NaN", "inf", "-inf"})


def json_value_problem(value: Any, depth: int = 1) -> str | None:
    """Why `value` (at nesting level `depth`) is not plain, storable JSON, or None when it is:
    a NaN / infinite float, an integer outside 64 bits, a string with a lone surrogate, a
    non-string key, nesting deeper than MAX_JSON_DEPTH, or something JSON has no form for.
    Iterative, so no input makes it recurse; the message names the path (`a.b[2]`)."""
    stack: list[tuple[Any, Any, int]] = [(value, None, depth)]
    while stack:
        item, where, level = stack.pop()
        kind = item.__class__
        if kind is str:
            if not item.isascii() and not is_unicode_text(item):
                return located(where, f"{item[:DETAIL_VALUE_CHARS]!r} holds a lone surrogate: not Unicode text")
        elif kind is int:
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return located(where, f"integer {digits_text(item)} is outside the 64-bit range")
        elif kind is float:
            if not math.isfinite(item):
                return located(where, f"{item} is not a finite number")
        elif item is None or kind is bool:
            pass
        elif kind is dict or kind is list:
            if level > MAX_JSON_DEPTH:
                return located(where, f"nested deeper than {MAX_JSON_DEPTH} levels")
            if kind is list:
                stack.extend((sub, (where, i), level + 1) for i, sub in enumerate(item))
                continue
            for key, sub in item.items():
                if key.__class__ is not str or not (key.isascii() or is_unicode_text(key)):
                    return located(where, f"key {str(key)[:DETAIL_VALUE_CHARS]!r} is not a Unicode string")
                stack.append((sub, (where, key), level + 1))
        elif kind is NumberLiteral:
            return located(where, item.problem())
        else:
            return located(where, f"a {kind.__name__} is not a JSON value")
    return None


def is_unicode_text(text: str) -> bool:
    """False for a str holding a lone surrogate (what a JSON `\\ud800` escape decodes to)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def located(where: Any, problem: str) -> str:
    """`problem` prefixed with its path: `(((None, 'a'), 'b'), 2)` -> `a.b[2]: ...` (paths are
    built lazily, as nested pairs: only an error renders one)."""
    parts: list[str] = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if key.__class__ is int else f".{str(key)[:DETAIL_VALUE_CHARS]}")
    path = "".join(reversed(parts)).lstrip(".")
    if len(path) > 2 * DETAIL_VALUE_CHARS:  # 200 levels of long keys: the innermost part tells
        path = "..." + path[-2 * DETAIL_VALUE_CHARS :]
    return f"{path}: {problem}" if path else problem


def digits_text(number: int) -> str:
    """A short text for an integer of any size (str() of one over 4300 digits raises)."""
    return str(number) if abs(number) < 10**30 else f"of about {int(number.bit_length() * math.log10(2)) + 1} digits"


def check_json_object(value: dict[str, Any]) -> dict[str, Any]:
    """The rule of the free-form object fields: plain JSON (see json_value_problem). Level 2: the
    field sits inside the record's object."""
    # Most contexts are a few flat, ASCII, in-range values: checked inline here (the general walk
    # costs three times as much, and this runs for every event that has a context).
    for key, item in value.items():
        kind = item.__class__
        if kind is str:
            if not item.isascii():
                break
        elif kind is int:
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                break
        elif kind is float:
            if not math.isfinite(item):
                break
        elif item is not None and kind is not bool:
            break
        if key.__class__ is not str or not key.isascii():
            break
    else:
        return value
    problem = json_value_problem(value, depth=2)
    if problem is not None:
        raise ValueError(problem)
    return value


# A free-form JSON object (`context`, `attributes`).
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_object)]


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
    scene: StrictStr | None = Field(default=None, max_length=SCENE_MAX_LEN, description="Scenario (page, app surface).")
    context: JsonObject | None = None
    request_id: Id | None = Field(
        default=None, description="The `request_id` of the recommendation answer that showed the item (attribution).")
    position: StrictInt | None = Field(
        default=None, ge=1, le=MAX_POSITION, description="The item's 1-based position in that answer.")


class Item(_Record):
    """One catalog record on the `items` topic; `deleted: true` removes the item."""

    item_id: Id
    title: StrictStr = Field(max_length=TITLE_MAX_LEN)
    text: StrictStr | None = Field(default=None, max_length=TEXT_MAX_LEN)
    attributes: JsonObject | None = None
    ts: StrictInt = Field(ge=TS_MIN_MS, le=TS_MAX_MS)
    deleted: StrictBool = False  # strict: `"yes"` or `1` is a producer bug, not a deletion


Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class Tombstone(_Record):
    """One right-to-be-forgotten request on the `forget` topic (key = pseudonym), from `streamrec forget`.
    It names the user by pseudonym only (streaming.pseudonym); every event of that user with
    `ts` at or before the tombstone's `ts` is erased and refused ever after (streaming.forget)."""

    tombstone_id: Hex32 = Field(description="Unique id of the request (random); adapter manifests list the ids they honour.")
    pseudonym: Hex32 = Field(description="The user's pseudonym under the key chain of `generation` keys.")
    generation: StrictInt = Field(ge=1, le=1000, description="How many keys the chain had (rotations + 1).")
    ts: StrictInt = Field(ge=TS_MIN_MS, le=TS_MAX_MS, description="When it was requested, epoch ms.")


class Impression(_Record):
    """What one recommendation answer showed, on the `impressions` topic (key = user pseudonym), written by
    the API replica that answered (services/impressions.py). Positions are 1-based: `item_ids[0]` is
    position 1."""

    request_id: Id = Field(description="The answer's request id (clicks carry it back).")
    user_id: Id | None = Field(default=None, description="The user's pseudonym; None for a request by recent_items only.")
    scene: StrictStr = Field(max_length=SCENE_MAX_LEN)
    version: StrictStr | None = Field(default=None, max_length=64, description="The adapter version that answered; None: a fallback.")
    variant: StrictStr = Field(max_length=64, description="The experiment variant that answered (`control` without an experiment).")
    experiment: StrictStr | None = Field(default=None, max_length=128, description="The experiment id, if one ran.")
    item_ids: list[Id] = Field(max_length=MAX_POSITION)
    scores: list[float] = Field(max_length=MAX_POSITION)
    fallback: StrictStr | None = Field(default=None, max_length=32, description="popular / trending, or None for the model.")
    ts: StrictInt = Field(ge=TS_MIN_MS, le=TS_MAX_MS, description="When the answer was sent, epoch ms.")


# --- the contract as Arrow columns --------------------------------------------------------

# Arrow type of a field's plain Python type. Dicts travel as JSON text: their keys are free-form,
# and a Parquet struct column would fix one set of keys for every record.
ARROW_TYPES: dict[type, pa.DataType] = {str: pa.string(), int: pa.int64(), bool: pa.bool_(), dict: pa.string()}
LIST_ARROW_TYPES: dict[type, pa.DataType] = {str: pa.string(), float: pa.float64()}
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
# Log columns no feature table reads: `context` is free-form, `ingest_ts` is bookkeeping, and the
# attribution fields are read by the attribution job alone (log files written before they existed lack them).
ATTRIBUTION_COLUMNS = ("request_id", "position")
NON_FEATURE_COLUMNS = ("context", "ingest_ts", *ATTRIBUTION_COLUMNS)


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


def _list_item_type(annotation: Any) -> type | None:
    """`str` for `list[Id]`, `float` for `list[float]`; None when the annotation is not a list."""
    if get_origin(annotation) is not list:
        return None
    return plain_type(get_args(annotation)[0])


def arrow_fields(model: type[BaseModel]) -> list[pa.Field]:
    """The model's fields as Arrow fields, in declaration order (all nullable, as Parquet reads them)."""
    out = []
    for name, info in model.model_fields.items():
        inner = _list_item_type(info.annotation)
        if inner is not None:
            out.append(pa.field(name, pa.list_(LIST_ARROW_TYPES[inner])))
            continue
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
# A dataset's events have no recommendation answers behind them: the attribution fields are log columns only.
EVENT_COLUMNS = pa.schema([f for f in arrow_fields(Event) if f.name not in ATTRIBUTION_COLUMNS])
ITEM_COLUMNS = pa.schema([f for f in arrow_fields(Item) if f.name not in ITEM_LOG_ONLY_FIELDS])
EVENT_JSON_COLUMNS = json_columns(Event)
ITEM_JSON_COLUMNS = json_columns(Item)
# The offline log's files: the whole record, then its provenance.
EVENT_LOG_SCHEMA = pa.schema([*arrow_fields(Event), *PROVENANCE_COLUMNS])
ITEM_LOG_SCHEMA = pa.schema([*arrow_fields(Item), *PROVENANCE_COLUMNS])
IMPRESSION_LOG_SCHEMA = pa.schema([*arrow_fields(Impression), *PROVENANCE_COLUMNS])
# The log columns the feature job reads (streaming.features).
EVENT_FEATURE_COLUMNS = tuple(n for n in EVENT_LOG_SCHEMA.names if n not in NON_FEATURE_COLUMNS)
# An event's fields the online store applies, in the order its Lua script receives them after
# the record's offset (streaming.online_store builds the payload and the script's indices from it).
ONLINE_EVENT_FIELDS = ("user_id", "item_id", "ts")


def log_row_builder(model: type[BaseModel], schema: pa.Schema, name: str, *, from_fields: bool = False) -> Callable[..., tuple]:
    """A function `name(record, <provenance...>)` returning one log row: a tuple in `schema`'s
    column order, dict fields as JSON text. The ingest hot loop builds hundreds of thousands of
    rows a second, so the function is generated as the plain tuple expression one would write
    by hand (a loop over the columns per row cost twice as much). `from_fields`: the record is
    the plain dict of every field that `streaming.ingest_topics.parse_event_fields` returns."""
    fields, as_json = model.model_fields, set(json_columns(model))
    params = [n for n in schema.names if n not in fields]
    get = "record[{!r}]".format if from_fields else "record.{}".format
    values = [f"json_text({get(n)})" if n in as_json else get(n) if n in fields else n for n in schema.names]
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
impression_log_row = log_row_builder(Impression, IMPRESSION_LOG_SCHEMA, "impression_log_row")


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
TOO_DEEP = "too_deep"
DECODER_ERROR = "decoder_error"  # a bug in this module, never an input's fault (see parse_event)
REASONS = frozenset({PAYLOAD_TOO_LARGE, NOT_UTF8, NOT_JSON, NOT_OBJECT, MISSING_FIELD, INVALID_FIELD,
                     UNKNOWN_EVENT_TYPE, EMPTY_PAYLOAD, TOO_DEEP, DECODER_ERROR})


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
    if kind == "value_error":  # check_json_object: its message names the path and the value
        return BadRecord(INVALID_FIELD, f"field {loc}: {first.get('ctx', {}).get('error', first.get('msg'))}")
    value = first.get("input")
    if isinstance(value, str) and len(value) > DETAIL_VALUE_CHARS:
        value = value[: DETAIL_VALUE_CHARS + 1]  # repr only what the detail quotes
    text = repr(value)
    if len(text) > DETAIL_VALUE_CHARS:
        text = text[: DETAIL_VALUE_CHARS - 3] + "..."
    return BadRecord(INVALID_FIELD, f"field {loc}={text}: {first.get('msg')}")


class NumberLiteral:
    """A number token the slow path cannot keep: NaN / Infinity, a float literal that overflows a
    double, an integer literal over MAX_INT_LITERAL_DIGITS digits. Fields refuse it like any other
    wrong type (`invalid_field`); in an unknown field it is dropped with the field."""

    __slots__ = ("literal",)

    def __init__(self, literal: str):
        self.literal = literal

    def problem(self) -> str:
        text = self.literal
        if text in ("NaN", "Infinity", "-Infinity"):
            return f"{text} is not a finite number (nor JSON)"
        if "." in text or "e" in text or "E" in text:
            return f"{text[:24]}{'...' if len(text) > 24 else ''} overflows a double"
        return f"an integer literal of {len(text.lstrip('-'))} digits is out of range"

    def __repr__(self) -> str:
        return f"<{self.problem()}>"


def _int_literal(text: str) -> int | NumberLiteral:
    return int(text) if len(text) <= MAX_INT_LITERAL_DIGITS else NumberLiteral(text)


def _float_literal(text: str) -> float | NumberLiteral:
    value = float(text)
    return value if math.isfinite(value) else NumberLiteral(text)


def _nesting_exceeds(obj: Any, limit: int) -> bool:
    """True when `obj` nests containers deeper than `limit` levels (itself being level 1)."""
    stack = [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if item.__class__ is dict:
            item = item.values()
        elif item.__class__ is not list:
            continue
        if level > limit:
            return True
        stack.extend((sub, level + 1) for sub in item if sub.__class__ is dict or sub.__class__ is list)
    return False


def _decode(payload: bytes) -> Any | BadRecord:
    """The slow path: tells the refusals apart, and decodes what pydantic-core's parser refuses but
    the contract may still take (a bad value in an unknown field, which is dropped)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(NOT_UTF8, f"invalid UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(text, parse_int=_int_literal, parse_float=_float_literal, parse_constant=NumberLiteral)
    except json.JSONDecodeError as exc:
        return BadRecord(NOT_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError:  # deeper than Python's json follows; far past MAX_JSON_DEPTH
        return BadRecord(TOO_DEEP, f"nested deeper than {MAX_JSON_DEPTH} levels")
    if _nesting_exceeds(obj, MAX_JSON_DEPTH):
        return BadRecord(TOO_DEEP, f"nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(obj, dict):
        return BadRecord(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse(model: type[_Record], payload: bytes | None, max_bytes: int, ids_look_non_finite: Callable) -> _Record | BadRecord:
    if not payload:
        return BadRecord(EMPTY_PAYLOAD, "record has no value")
    if len(payload) > max_bytes:
        return BadRecord(PAYLOAD_TOO_LARGE, f"{len(payload)} bytes > limit {max_bytes}")
    try:
        # The fast path parses and validates in one pass (pydantic-core); only a failure pays
        # for the slower decoding below, which tells not-UTF-8 / not-JSON / not-an-object apart.
        record = model.__pydantic_validator__.validate_json(payload)
    except ValidationError:
        pass
    else:
        # pydantic-core turns a NaN / Infinity token given as an id into the text "NaN" / "inf";
        # the slow path tells such a token from the same text sent as a string.
        if not ids_look_non_finite(record):
            return record
    obj = _decode(payload)
    if isinstance(obj, BadRecord):
        return obj
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        return _classify_validation(exc)


def _event_ids_look_non_finite(e: Event) -> bool:
    return e.event_id in NON_FINITE_ID_TEXTS or e.user_id in NON_FINITE_ID_TEXTS or e.item_id in NON_FINITE_ID_TEXTS


def _item_id_looks_non_finite(i: Item) -> bool:
    return i.item_id in NON_FINITE_ID_TEXTS


def _impression_ids_look_non_finite(i: Impression) -> bool:
    return i.request_id in NON_FINITE_ID_TEXTS or any(x in NON_FINITE_ID_TEXTS for x in i.item_ids)


def _decoder_bug(payload: bytes | None, exc: Exception) -> BadRecord:
    # One poison record must not stop the stream (ingest would crash on it again after every
    # restart): it goes to the DLQ, and the bug is logged without the payload (privacy).
    what = f"{len(payload)}-byte" if isinstance(payload, (bytes, bytearray)) else type(payload).__name__
    log.error("decoder bug on a %s record: %s; the record goes to the DLQ as %s (traceback at DEBUG)",
              what, type(exc).__name__, DECODER_ERROR)
    log.debug("decoder bug", exc_info=exc)
    return BadRecord(DECODER_ERROR, f"the decoder failed with {type(exc).__name__}: a bug in streaming/events.py")


def parse_event(payload: bytes | None, event_types: frozenset[str] | set[str], max_bytes: int) -> Event | BadRecord:
    """Decode and validate one `events` record. Never raises (see the module's guarantees)."""
    try:
        event = _parse(Event, payload, max_bytes, _event_ids_look_non_finite)
        if isinstance(event, BadRecord):
            return event
        if event.type not in event_types:
            shown = repr(event.type[: DETAIL_VALUE_CHARS + 1])  # a hostile type may be 64 KiB long
            shown = shown if len(shown) <= DETAIL_VALUE_CHARS else shown[: DETAIL_VALUE_CHARS - 3] + "..."
            return BadRecord(UNKNOWN_EVENT_TYPE, f"type={shown} is not one of {sorted(event_types)}")
        return event
    except Exception as exc:  # noqa: BLE001 (the guarantee: a record is refused, never the stream)
        return _decoder_bug(payload, exc)


def parse_item(payload: bytes | None, max_bytes: int) -> Item | BadRecord:
    """Decode and validate one `items` record. Never raises (see the module's guarantees)."""
    try:
        return _parse(Item, payload, max_bytes, _item_id_looks_non_finite)
    except Exception as exc:  # noqa: BLE001 (the guarantee: a record is refused, never the stream)
        return _decoder_bug(payload, exc)


def parse_impression(payload: bytes | None, max_bytes: int) -> Impression | BadRecord:
    """Decode and validate one `impressions` record. Never raises (see the module's guarantees);
    `item_ids` and `scores` must be as long as each other."""
    try:
        record = _parse(Impression, payload, max_bytes, _impression_ids_look_non_finite)
        if isinstance(record, Impression) and len(record.item_ids) != len(record.scores):
            return BadRecord(INVALID_FIELD, f"field scores: {len(record.scores)} scores for {len(record.item_ids)} items")
        if isinstance(record, Impression) and not all(math.isfinite(x) for x in record.scores):
            return BadRecord(INVALID_FIELD, "field scores: not all finite numbers")
        return record
    except Exception as exc:  # noqa: BLE001 (the guarantee: a record is refused, never the stream)
        return _decoder_bug(payload, exc)


def encode(record: Event | Item | Impression | dict[str, Any]) -> bytes:
    """Serialize an event or item for the wire (compact JSON, None fields dropped)."""
    if isinstance(record, BaseModel):
        record = record.model_dump(exclude_none=True)
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
