"""Fuzzing the event decoder (`streaming.events.parse_event` / `parse_item`) with hypothesis.

Whatever the bytes -- random, JSON-shaped, nested thousands deep, numbers out of every range,
NaN / Infinity, lone surrogates escaped or raw, duplicate keys, a wrong type in every field,
over the size limit, invalid UTF-8 -- the decoder returns a record that keeps the contract, or a
`BadRecord` whose reason is one of the stable codes; it never raises. The last test sends such
records through the real broker and ingest: every one refused is in the DLQ once, with its reason.

The profile is derandomized and has no example database, so CI runs the same examples every time.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from streaming.dlq import read_dlq
from streaming.events import (
    DECODER_ERROR,
    EVENT_LOG_SCHEMA,
    ID_MAX_LEN,
    INVALID_FIELD,
    ITEM_LOG_SCHEMA,
    MAX_JSON_DEPTH,
    NOT_UTF8,
    PAYLOAD_TOO_LARGE,
    REASONS,
    TEXT_MAX_LEN,
    TITLE_MAX_LEN,
    TOO_DEEP,
    TS_MAX_MS,
    TS_MIN_MS,
    BadRecord,
    Event,
    Item,
    event_log_row,
    is_unicode_text,
    item_log_row,
    json_text,
    json_value_problem,
    parse_event,
    parse_item,
)
from streaming.ingest import Ingestor
from streaming.producer import EventProducer
from streaming.settings import DEFAULT_EVENT_TYPES
from tests.streaming.helpers import isolated_settings, popularity_total, read_log

EVENT_TYPES = frozenset(DEFAULT_EVENT_TYPES)
MAX_BYTES = 64 * 1024  # the default STREAMREC_MAX_PAYLOAD_BYTES
EXAMPLES = 300  # per property: the whole file's unit part runs in ~15 s on 2 shared cores
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same examples on every run: CI is deterministic
    database=None,
    deadline=None,  # a shared CI machine is slow now and then; a hang still fails (pytest-timeout)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REFUSALS = REASONS - {DECODER_ERROR}  # decoder_error would be a bug: no input may cause it
MAX_DETAIL_CHARS = 500


# --- JSON-shaped hostile bytes -------------------------------------------------------------------


def jstr(text: str, *, ascii_only: bool = True) -> bytes:
    return json.dumps(text, ensure_ascii=ascii_only).encode("utf-8")


def obj(pairs) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


def pairs_of(record: dict[str, bytes]) -> list[tuple[bytes, bytes]]:
    return [(jstr(k), v) for k, v in record.items()]


def arr(items) -> bytes:
    return b"[" + b",".join(items) + b"]"


HOSTILE_NUMBERS = [
    b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1E+999", b"1e-400", b"-0", b"0.0", b"1.5",
    b"1e3", b"9" * 400 + b".5", b"9" * 5000, b"-" + b"9" * 4301, str(2**63).encode(), str(2**64).encode(),
    str(-(2**63) - 1).encode(), str(TS_MAX_MS + 1).encode(), b"-1", b"01", b"+1", b".5", b"0x10",
]
HOSTILE_STRINGS = [
    b'"\\ud800"', b'"\\udfff"', b'"x\\ud83d"', b'"\\ude00y"', b'"\\ud83d\\ude00"', b'"\\uDBFF\\uDFFF"',
    b'"\\u0000"', b'"\xed\xa0\x80"', b'"\xff"', b'"\xc3("', b'"\xf4\x90\x80\x80"', b'"\xc0\x80"',
    b'"\\x41"', b'"unterminated', b'"tab\there"', b'"NaN"', b'"inf"', b'""', b'" "',
]
numbers = st.one_of(
    st.integers().map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.one_of(st.integers(min_value=1, max_value=40), st.sampled_from([309, 400, 4300, 4301, 6000])).map(lambda n: b"9" * n),
    st.sampled_from(HOSTILE_NUMBERS),
)
strings = st.one_of(
    st.text(max_size=20).map(jstr),
    st.text(max_size=20).map(lambda s: jstr(s, ascii_only=False)),
    st.text(max_size=120).map(jstr),
    st.sampled_from(HOSTILE_STRINGS),
)
scalars = st.one_of(st.sampled_from([b"null", b"true", b"false"]), numbers, strings)
FIELD_NAMES = sorted(set(Event.model_fields) | set(Item.model_fields))
keys = st.one_of(st.sampled_from(FIELD_NAMES).map(jstr), strings)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(arr),
        st.lists(st.tuples(keys, children), max_size=4).map(obj),
    ),
    max_leaves=12,  # generating dominates the run time; width and depth have their own tests
)


def nested(kind: str, depth: int) -> bytes:
    """`depth` levels of arrays, objects, or both in turn."""
    if kind == "[":
        return b"[" * depth + b"]" * depth
    if kind == "{":
        return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    opening = b"".join(b"[" if i % 2 else b'{"a":' for i in range(depth - 1))
    closing = b"".join(b"]" if i % 2 else b"}" for i in reversed(range(depth - 1)))
    return opening + b"{}" + closing


GOOD_EVENT = {"event_id": jstr("e-1"), "user_id": jstr("u7"), "item_id": b"42", "type": jstr("click"),
              "ts": b"1732350000000", "scene": jstr("home"), "context": b'{"device":"ios","n":[1,2.5]}'}
GOOD_ITEM = {"item_id": jstr("i42"), "title": jstr("Alien"), "text": jstr("space horror"),
             "attributes": b'{"genre":"sci-fi"}', "ts": b"0", "deleted": b"false"}


@st.composite
def record_payloads(draw, good: dict[str, bytes]) -> bytes:
    """A valid record, then per field: kept, replaced by a hostile value, dropped, or repeated (a
    duplicate key before or after it); unknown fields; shuffled; sometimes framed badly."""
    pairs = []
    for name, value in good.items():
        action = draw(st.sampled_from(["keep", "keep", "keep", "hostile", "drop", "dup_before", "dup_after"]))
        key = jstr(name)
        if action == "hostile":
            pairs.append((key, draw(values)))
        elif action == "keep":
            pairs.append((key, value))
        elif action == "dup_before":
            pairs += [(key, draw(values)), (key, value)]
        elif action == "dup_after":
            pairs += [(key, value), (key, draw(values))]
    pairs += draw(st.lists(st.tuples(keys, values), max_size=3))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    payload = obj(pairs)
    frame = draw(st.sampled_from(["plain"] * 6 + ["ws", "bom", "trailing", "truncated", "deep"]))
    if frame == "ws":
        payload = b" \n\t" + payload + b"\r\n "
    elif frame == "bom":
        payload = b"\xef\xbb\xbf" + payload
    elif frame == "trailing":
        payload += draw(st.sampled_from([b"x", b"{}", b",", b"\x00", b"\xff"]))
    elif frame == "truncated":
        payload = payload[: draw(st.integers(min_value=0, max_value=max(len(payload) - 1, 0)))]
    elif frame == "deep":
        depth = draw(st.integers(min_value=1, max_value=3 * MAX_JSON_DEPTH))
        kind = draw(st.sampled_from("[{m"))
        payload = payload[:-1] + (b"," if len(payload) > 2 else b"") + b'"x":' + nested(kind, depth) + b"}"
    return payload


event_payloads = record_payloads(GOOD_EVENT)
item_payloads = record_payloads(GOOD_ITEM)


# --- what every outcome must satisfy ---------------------------------------------------------


def as_table(row: tuple, schema: pa.Schema) -> pa.Table:
    """One log row as ingest writes it (a column per field), through Parquet and back."""
    table = pa.Table.from_arrays([pa.array([v], type=f.type) for v, f in zip(row, schema)], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return pq.read_table(io.BytesIO(buf.getvalue()), schema=schema)


def strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"{token} stored in a JSON column")

    return json.loads(text, parse_constant=refuse)


def assert_id(value) -> None:
    assert type(value) is str and 1 <= len(value) <= ID_MAX_LEN and re.search(r"\S", value), repr(value)
    assert is_unicode_text(value)


def assert_text(value, max_len: int, *, optional: bool) -> None:
    if optional and value is None:
        return
    assert type(value) is str and len(value) <= max_len and is_unicode_text(value), repr(value)[:100]


def assert_json_object(value) -> None:
    if value is not None:
        assert type(value) is dict and json_value_problem(value, 2) is None


def assert_event_contract(event: Event) -> None:
    for name in ("event_id", "user_id", "item_id"):
        assert_id(getattr(event, name))
    assert event.type in EVENT_TYPES
    assert type(event.ts) is int and TS_MIN_MS <= event.ts <= TS_MAX_MS
    assert_text(event.scene, 64, optional=True)
    assert_json_object(event.context)
    row = event_log_row(event, 3, 17, 1_700_000_000_000)
    back = as_table(row, EVENT_LOG_SCHEMA).to_pylist()[0]
    assert back == dict(zip(EVENT_LOG_SCHEMA.names, row))
    if event.context is not None:
        assert strict_json(back["context"]) == event.context
        assert back["context"] == json_text(event.context)


def assert_item_contract(item: Item) -> None:
    assert_id(item.item_id)
    assert_text(item.title, TITLE_MAX_LEN, optional=False)
    assert_text(item.text, TEXT_MAX_LEN, optional=True)
    assert_json_object(item.attributes)
    assert type(item.ts) is int and TS_MIN_MS <= item.ts <= TS_MAX_MS
    assert type(item.deleted) is bool
    row = item_log_row(item, 0, 5, 1_700_000_000_000)
    back = as_table(row, ITEM_LOG_SCHEMA).to_pylist()[0]
    assert back == dict(zip(ITEM_LOG_SCHEMA.names, row))
    if item.attributes is not None:
        assert strict_json(back["attributes"]) == item.attributes


def is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_event(payload: bytes, max_bytes: int = MAX_BYTES) -> Event | BadRecord:
    out = parse_event(payload, EVENT_TYPES, max_bytes)  # raising here is the failure
    if isinstance(out, BadRecord):
        assert out.reason in REFUSALS, out
        assert 0 < len(out.detail) <= MAX_DETAIL_CHARS, out  # a DLQ header, not a copy of the payload
    else:
        assert isinstance(out, Event)
        assert_event_contract(out)
    if 0 < len(payload) <= max_bytes and not is_utf8(payload):
        assert isinstance(out, BadRecord) and out.reason == NOT_UTF8, out
    return out


def check_item(payload: bytes, max_bytes: int = MAX_BYTES) -> Item | BadRecord:
    out = parse_item(payload, max_bytes)
    if isinstance(out, BadRecord):
        assert out.reason in REFUSALS, out
        assert 0 < len(out.detail) <= MAX_DETAIL_CHARS, out  # a DLQ header, not a copy of the payload
    else:
        assert isinstance(out, Item)
        assert_item_contract(out)
    if 0 < len(payload) <= max_bytes and not is_utf8(payload):
        assert isinstance(out, BadRecord) and out.reason == NOT_UTF8, out
    return out


# --- properties ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(b"\x00")
@example(b"\xef\xbb\xbf{}")
def test_any_bytes_give_a_record_or_a_known_reason(payload):
    check_event(payload)
    check_item(payload)


@FUZZ
@given(values)
def test_any_json_shaped_value_gives_a_record_or_a_known_reason(payload):
    check_event(payload)
    check_item(payload)


@FUZZ
@given(event_payloads)
@example(obj(pairs_of(GOOD_EVENT)))
def test_event_shaped_hostile_records(payload):
    check_event(payload)
    check_event(payload, max_bytes=256)  # the smallest limit the settings allow


@FUZZ
@given(item_payloads)
@example(obj(pairs_of(GOOD_ITEM)))
def test_item_shaped_hostile_records(payload):
    check_item(payload)


def test_the_valid_records_pass():
    assert isinstance(check_event(obj(pairs_of(GOOD_EVENT))), Event)
    assert isinstance(check_item(obj(pairs_of(GOOD_ITEM))), Item)


@FUZZ
@given(st.sampled_from("[{m"), st.integers(min_value=1, max_value=MAX_JSON_DEPTH + 50) | st.integers(min_value=1, max_value=200_000),
       st.booleans())
@example("[", 200_000, True)
@example("{", 100_000, False)
def test_deep_nesting_is_too_deep_never_a_recursion_error(kind, depth, kept):
    """`depth` levels of containers under the record's object (level 1): in `context` (kept) or in
    an unknown field (dropped). Up to MAX_JSON_DEPTH levels in all it is a record; past it,
    `too_deep` (pydantic-core takes one more level of arrays in a dropped field)."""
    inner = nested(kind, depth)
    if kept:
        total = 2 + depth
        payload = obj([(b'"event_id"', b'"e"'), (b'"user_id"', b'"u"'), (b'"item_id"', b'"i"'), (b'"type"', b'"view"'),
                       (b'"ts"', b"5"), (b'"context"', obj([(b'"a"', inner)]))])
    else:
        total = 1 + depth
        payload = obj(pairs_of(GOOD_EVENT) + [(b'"x"', inner)])
    out = check_event(payload, max_bytes=10 * 1024 * 1024)
    if total <= MAX_JSON_DEPTH:
        assert isinstance(out, Event), out
    elif total > MAX_JSON_DEPTH + 1 or kept:
        assert isinstance(out, BadRecord) and out.reason == TOO_DEEP, out
    bare = nested(kind, depth)  # not an object at all, however deep
    assert isinstance(check_event(bare, max_bytes=10 * 1024 * 1024), BadRecord)


@FUZZ
@given(st.integers(min_value=1, max_value=4096), st.sampled_from([256, 1024, MAX_BYTES]))
def test_oversize_payloads_are_refused_unread(extra, limit):
    payload = obj(pairs_of(GOOD_EVENT))
    payload = payload[:-1] + b',"pad":"' + b"x" * (limit - len(payload) - 9 + extra) + b'"}'
    assert len(payload) == limit + extra
    out = check_event(payload, max_bytes=limit)
    assert out.reason == PAYLOAD_TOO_LARGE
    assert str(limit) in out.detail


@FUZZ
@given(st.integers(min_value=0), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\x80", b"\x80"]))
def test_invalid_utf8_anywhere_is_not_utf8(position, bad):
    payload = obj(pairs_of(GOOD_EVENT))
    at = position % (len(payload) + 1)
    out = check_event(payload[:at] + bad + payload[at:])
    assert out.reason == NOT_UTF8


# --- decisions, pinned -----------------------------------------------------------------------------

# An unknown field holding a lone surrogate: pydantic-core's parser refuses it, so the record takes
# the decoder's slow path (Python's json), which drops the field. Both paths must decide alike.
SLOW_PATH = (b'"x"', b'"\\ud800"')
SECOND_VALUES = {"event_id": b'"e-2"', "user_id": b"8", "item_id": b'"i43"', "type": b'"view"', "ts": b"1732350000001",
                 "scene": b'"cart"', "context": b'{"device":"web"}'}


@pytest.mark.parametrize("slow_path", [False, True], ids=["fast-path", "slow-path"])
@pytest.mark.parametrize("field", sorted(SECOND_VALUES))
def test_duplicate_keys_the_last_one_wins(field, slow_path):
    extra = [SLOW_PATH] if slow_path else []
    good = {k: json.loads(v) for k, v in GOOD_EVENT.items()}
    first_then_second = obj([*pairs_of(GOOD_EVENT), *extra, (jstr(field), SECOND_VALUES[field])])
    second_then_first = obj([(jstr(field), SECOND_VALUES[field]), *extra, *pairs_of(GOOD_EVENT)])
    assert check_event(first_then_second) == Event.model_validate({**good, field: json.loads(SECOND_VALUES[field])})
    assert check_event(second_then_first) == Event.model_validate(good)
    # ...and a bad value is no better hidden behind a good one than in front of it
    bad_last = obj([*pairs_of(GOOD_EVENT), *extra, (jstr(field), b"[1]")])
    assert check_event(bad_last).reason == INVALID_FIELD


def test_duplicate_keys_inside_context_the_last_one_wins():
    payload = obj([*pairs_of(GOOD_EVENT), (b'"context"', b'{"a":1,"b":2,"a":{"c":NaN},"a":3}')])
    assert check_event(payload).context == {"a": 3, "b": 2}


NUMBER_FIELDS = {"ts": "ts", "event_id": "event_id", "user_id": "user_id", "item_id": "item_id",
                 "context": "context", "context.deep": "context"}
NON_FINITE_OR_HUGE = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1E+309", b"9" * 400 + b".0",
                      b"9" * 4301, b"-" + b"9" * 5000, b"9" * (ID_MAX_LEN + 1)]


@pytest.mark.parametrize("number", NON_FINITE_OR_HUGE, ids=lambda b: b[:12].decode() + f"({len(b)})")
@pytest.mark.parametrize("where", sorted(NUMBER_FIELDS))
def test_non_finite_and_huge_numbers_are_refused_naming_the_field(where, number):
    if where == "context":
        value = b'{"n":' + number + b"}"
    elif where == "context.deep":
        value = b'{"a":[1,{"n":' + number + b"}]}"
    else:
        value = number
    payload = obj([*pairs_of(GOOD_EVENT), (jstr(where.split(".")[0]), value)])
    out = check_event(payload)
    assert isinstance(out, BadRecord) and out.reason == INVALID_FIELD, out
    assert out.detail.startswith(f"field {NUMBER_FIELDS[where]}")
    assert len(out.detail) < 300  # a 5,000-digit literal is summarized, not quoted


@pytest.mark.parametrize("value", [str(2**63 - 1), str(2**64 - 1), str(-(2**63)), "1e308", "-0.0", "1e-400"])
def test_numbers_in_range_are_kept(value):
    out = check_event(obj([*pairs_of(GOOD_EVENT), (b'"context"', b'{"n":' + value.encode() + b"}")]))
    assert isinstance(out, Event) and out.context == {"n": json.loads(value)}


@pytest.mark.parametrize("text", ["NaN", "inf", "-inf", "Infinity"])
def test_an_id_sent_as_a_string_that_reads_like_a_non_finite_number_is_kept(text):
    out = check_event(obj([*pairs_of(GOOD_EVENT), (b'"user_id"', jstr(text))]))
    assert isinstance(out, Event) and out.user_id == text


@pytest.mark.parametrize("where", ["event_id", "type", "scene", "context.key", "context.value", "context.list"])
@pytest.mark.parametrize("surrogate", [b"\\ud800", b"\\udfff", b"a\\ud83d"])
def test_lone_surrogates_are_refused_where_kept(where, surrogate):
    string = b'"' + surrogate + b'"'
    value = {"context.key": b"{" + string + b":1}", "context.value": b'{"k":' + string + b"}",
             "context.list": b'{"k":[1,' + string + b"]}"}.get(where, string)
    out = check_event(obj([*pairs_of(GOOD_EVENT), (jstr(where.split(".")[0]), value)]))
    # `type` has no length rule, so pydantic passes the str on: no configured type matches it
    assert isinstance(out, BadRecord) and out.reason in (INVALID_FIELD, "unknown_event_type"), out
    # in an unknown field it is dropped with the field; a valid pair is kept
    assert isinstance(check_event(obj([*pairs_of(GOOD_EVENT), (b'"x"', string)])), Event)
    pair = check_event(obj([*pairs_of(GOOD_EVENT), (b'"scene"', b'"\\ud83d\\ude00"')]))
    assert pair.scene == "\U0001f600"


WRONG_TYPES = [b"null", b"true", b"false", b"0", b"1.5", b'""', b'"x"', b"[]", b"{}", b"[1]", b'{"a":1}']


@pytest.mark.parametrize("field", sorted(Event.model_fields))
def test_a_wrong_type_in_any_event_field_is_refused(field):
    fine = {  # what the contract takes besides the good value
        "event_id": {b"0", b"1.5", b'"x"'}, "user_id": {b"0", b"1.5", b'"x"'}, "item_id": {b"0", b"1.5", b'"x"'},
        "type": set(), "ts": {b"0"}, "scene": {b"null", b'""', b'"x"'}, "context": {b"null", b"{}", b'{"a":1}'},
        "request_id": {b"null", b"0", b"1.5", b'"x"'}, "position": {b"null", b"1"},  # positions are 1-based
    }[field]
    for wrong in WRONG_TYPES:
        out = check_event(obj([*pairs_of(GOOD_EVENT), (jstr(field), wrong)]))
        if wrong in fine:
            assert isinstance(out, Event), (wrong, out)
        else:
            assert isinstance(out, BadRecord) and out.reason in (INVALID_FIELD, "unknown_event_type"), (wrong, out)
            assert field in out.detail


@pytest.mark.parametrize("field", sorted(Item.model_fields))
def test_a_wrong_type_in_any_item_field_is_refused(field):
    fine = {
        "item_id": {b"0", b"1.5", b'"x"'}, "title": {b'""', b'"x"'}, "text": {b"null", b'""', b'"x"'},
        "attributes": {b"null", b"{}", b'{"a":1}'}, "ts": {b"0"}, "deleted": {b"true", b"false"},
    }[field]
    for wrong in WRONG_TYPES + ([b'"yes"', b'"false"', b"1"] if field == "deleted" else []):
        out = check_item(obj([*pairs_of(GOOD_ITEM), (jstr(field), wrong)]))
        if wrong in fine:
            assert isinstance(out, Item), (wrong, out)
        else:
            assert isinstance(out, BadRecord) and out.reason == INVALID_FIELD, (wrong, out)
            assert out.detail.startswith(f"field {field}")


def long_key_nest(levels: int, leaf: bytes) -> bytes:
    """`levels` objects, each under a 200-character key, around `leaf`."""
    return (b"{" + jstr("k" * 200) + b":") * levels + leaf + b"}" * levels


@pytest.mark.parametrize("payload", [
    obj([*pairs_of(GOOD_EVENT), (b'"type"', jstr("t" * 60_000))]),  # unknown_event_type
    obj([*pairs_of(GOOD_EVENT), (b'"scene"', jstr("s" * 60_000))]),  # over the length limit
    obj([*pairs_of(GOOD_EVENT), (b'"context"', long_key_nest(150, b"NaN"))]),  # a long path
    obj([*pairs_of(GOOD_EVENT), (b'"context"', long_key_nest(150, b'"\\ud800"'))]),
    obj([*pairs_of(GOOD_EVENT), (b'"ts"', b"9" * 5000)]),
], ids=["type", "scene", "path-nan", "path-surrogate", "ts"])
def test_details_stay_short(payload):
    out = check_event(payload)
    assert isinstance(out, BadRecord)


def test_wide_records_are_fine():
    """Width costs nothing special: 3,000 keys in `context`, a 10,000-item list, 2,000 unknown fields."""
    wide = obj([*pairs_of(GOOD_EVENT), (b'"context"', obj([(jstr(f"k{i}"), str(i).encode()) for i in range(3000)]))])
    assert len(check_event(wide).context) == 3000
    long = obj([*pairs_of(GOOD_EVENT), (b'"context"', b'{"l":' + arr([b"1.5"] * 10_000) + b"}")])
    assert len(check_event(long).context["l"]) == 10_000
    many = obj([*pairs_of(GOOD_EVENT), *[(jstr(f"x{i}"), b"[NaN]") for i in range(2000)]])
    assert isinstance(check_event(many), Event)  # dropped, NaN and all


def test_reason_codes_are_stable():
    """Consumers of the DLQ filter on these (k8s/RUNBOOK.md): renaming one breaks them."""
    assert REASONS == {"payload_too_large", "not_utf8", "not_json", "not_object", "missing_field", "invalid_field",
                       "unknown_event_type", "empty_payload", "too_deep", "decoder_error"}


def test_a_decoder_failure_is_a_refusal_logged_without_the_payload(caplog):
    """The last line of defence: a record the decoder cannot handle (here a caller passing a str,
    not bytes) is refused as `decoder_error`, not raised into the ingest loop, which would meet
    it again after every restart."""
    secret = '{"user_id": "alice@example.com"}'
    with caplog.at_level(logging.INFO, logger="streaming.events"):
        out = parse_event(secret, EVENT_TYPES, MAX_BYTES)
        item = parse_item(12345, MAX_BYTES)
    assert out.reason == DECODER_ERROR and item.reason == DECODER_ERROR
    assert "alice" not in caplog.text and "alice" not in out.detail
    assert "decoder bug" in caplog.text


# --- through the real broker and ingest ------------------------------------------------------------

N_GOOD = 400
N_HOSTILE_EVENTS = 250
N_HOSTILE_ITEMS = 40


def harvest(strategy, n: int) -> list:
    """`n` examples of `strategy`, the same on every run (a derandomized hypothesis run that only
    collects what it draws)."""
    out: list = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out[:n]


@pytest.mark.integration
def test_hostile_records_through_ingest_land_in_the_dlq_counted_exactly(embedded_stack, tmp_path):
    """Hypothesis-generated hostile records mixed with good events, through the embedded broker
    and a real `Ingestor`: ingest keeps running, every good event is applied once, and every
    refused record is in the DLQ once, with the reason the decoder gives it."""
    settings_ = isolated_settings(embedded_stack, tmp_path, max_payload_bytes=4096)
    limit = settings_.max_payload_bytes
    drawn = harvest(st.one_of(event_payloads, values, st.binary(max_size=300)), 2 * N_HOSTILE_EVENTS)
    # mostly records the decoder has to read; a tenth over the size limit
    hostile = [p for p in drawn if len(p) <= limit][: N_HOSTILE_EVENTS * 9 // 10]
    hostile += [p for p in drawn if len(p) > limit][: N_HOSTILE_EVENTS - len(hostile)]
    hostile += [nested(kind, MAX_JSON_DEPTH + extra) for kind in "[{m" for extra in (1, 50, 300)]  # too_deep
    hostile_items = [p for p in harvest(item_payloads, 2 * N_HOSTILE_ITEMS) if len(p) <= limit][:N_HOSTILE_ITEMS]
    plan: list[tuple[str, bytes | None]] = [("good", None)] * N_GOOD + [("event", p) for p in hostile]
    plan += [("item", p) for p in hostile_items]
    random.Random(15).shuffle(plan)

    sent = []
    with EventProducer(settings_) as producer:
        for i, (kind, payload) in enumerate(plan):
            if kind == "good":
                ev = {"event_id": f"g{i}", "user_id": f"u{i % 40}", "item_id": f"i{i % 60}", "type": "click", "ts": 1_000 + i}
                sent.append((producer.send_event(ev), kind, None))
            else:
                topic = settings_.items_topic if kind == "item" else settings_.events_topic
                sent.append((producer.send_raw(topic, payload, key=f"k{i % 40}".encode()), kind, payload))
    expected_bad: dict[tuple[str, int, int], str] = {}  # (topic, partition, offset) -> reason
    accepted_events: set[tuple[int, int]] = set()
    accepted_items = 0
    for fut, kind, payload in sent:
        md = fut.get(timeout=30)
        out = None
        if kind == "event":
            out = parse_event(payload, EVENT_TYPES, limit)
        elif kind == "item":
            out = parse_item(payload, limit)
        if isinstance(out, BadRecord):
            expected_bad[(md.topic, md.partition, md.offset)] = out.reason
        elif kind == "item":
            accepted_items += 1
        else:
            accepted_events.add((md.partition, md.offset))
    assert len(expected_bad) > N_HOSTILE_EVENTS // 2 and len(set(expected_bad.values())) >= 7  # hostile enough

    stats = Ingestor(settings_).run(until_idle_s=2.0)  # returns: no hostile record stops ingest

    assert (stats.events, stats.items, stats.bad) == (len(accepted_events), accepted_items, len(expected_bad))
    assert dict(stats.bad_by_reason) == dict(Counter(expected_bad.values()))
    entries = read_dlq(settings_, idle_timeout_s=2.0)
    got = Counter((e.source_topic, e.source_partition, e.source_offset) for e in entries)
    assert max(got.values(), default=1) == 1, "a record in the DLQ twice"
    assert set(got) == set(expected_bad), "a refused record missing from the DLQ (or one too many)"
    for e in entries:
        assert e.reason == expected_bad[(e.source_topic, e.source_partition, e.source_offset)]
        assert e.detail
    # every accepted event applied once: in Redis (popularity counts each once) and in the log
    assert popularity_total(settings_) == len(accepted_events)
    log = read_log(settings_)
    assert sorted(zip(log["partition"].to_pylist(), log["offset"].to_pylist())) == sorted(accepted_events)
