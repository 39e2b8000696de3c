"""Ingest's fast path for events (`streaming.ingest_topics.parse_event_fields`) decides exactly as `parse_event`.

Ingest validates every event into a plain field dict instead of a pydantic model (building the
model cost three quarters of the validation). These tests hold it to the contract's one decoder:
on the fuzzer's hostile payloads (tests/streaming/test_events_fuzz.py) and on hand-picked edges, the
same acceptance with the same values, or the same `BadRecord`; and the log row and the Redis
payload built from the dict are those built from the model.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel, model_validator

from streaming.events import EVENT_LOG_SCHEMA, BadRecord, Event, event_log_row, parse_event
from streaming.ingest_topics import event_fields_log_row, fields_validator, parse_event_fields
from streaming.online_store import lua_events_payload
from tests.streaming.test_events_fuzz import EVENT_TYPES, FUZZ, MAX_BYTES, event_payloads

GOOD = b'{"event_id":"e-1","user_id":"u7","item_id":"i42","type":"click","ts":1732350000000}'


ids = st.one_of(st.text(min_size=0, max_size=8), st.text(min_size=250, max_size=260), st.integers(),
                st.floats(allow_nan=False), st.sampled_from(["NaN", "inf", "-inf", " ", "\t x"]))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**65),
                                     st.floats(allow_nan=False), st.text(max_size=6)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)),
                           max_leaves=8)
OPTIONAL = {"scene": st.one_of(st.none(), st.text(max_size=70)),
            "context": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_values, max_size=4), json_values),
            "request_id": st.one_of(st.none(), ids),
            "position": st.one_of(st.none(), st.integers(min_value=-1, max_value=1002), st.booleans())}


@st.composite
def plausible_events(draw) -> bytes:
    """Mostly valid events with varied values (the fuzzer's hostile payloads are mostly refused):
    edges of every bound, numbers as ids, optional fields absent, null or set, unknown fields."""
    record = {"event_id": draw(ids), "user_id": draw(ids), "item_id": draw(ids),
              "type": draw(st.sampled_from([*sorted(EVENT_TYPES), "other"])),
              "ts": draw(st.one_of(st.integers(min_value=-1, max_value=7_258_118_400_001), st.sampled_from([0, 1.0])))}
    for name, values in OPTIONAL.items():
        if draw(st.booleans()):
            record[name] = draw(values)
    record.update(draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)))
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def assert_same_decision(payload: bytes | None, event_types=EVENT_TYPES, max_bytes: int = MAX_BYTES) -> None:
    fast = parse_event_fields(payload, event_types, max_bytes)
    slow = parse_event(payload, event_types, max_bytes)
    if isinstance(slow, BadRecord):
        assert fast == slow, payload
        return
    assert isinstance(fast, dict), (payload, fast)
    assert fast == slow.__dict__, payload
    assert {k: type(v) for k, v in fast.items()} == {k: type(v) for k, v in slow.__dict__.items()}, payload
    assert event_fields_log_row(fast, 3, 42, 1_000) == event_log_row(slow, 3, 42, 1_000)


@given(event_payloads)
@FUZZ
def test_fuzzed_events_get_the_same_decision_and_values(payload):
    assert_same_decision(payload)


@given(plausible_events())
@FUZZ
def test_plausible_events_get_the_same_decision_and_values(payload):
    assert_same_decision(payload)


@given(event_payloads, st.frozensets(st.sampled_from(sorted(EVENT_TYPES)), max_size=2))
@FUZZ
@example(GOOD, frozenset({"view"}))
def test_the_event_types_setting_refuses_alike(payload, event_types):
    assert_same_decision(payload, event_types)


@pytest.mark.parametrize("payload", [
    GOOD,
    b'{"event_id":1,"user_id":2,"item_id":3.5,"type":"click","ts":0}',  # numbers as id text
    b'{"event_id":"e","user_id":"u","item_id":"i","type":"click","ts":7,"scene":null,"context":null,"position":null}',
    b'{"event_id":"e","user_id":"u","item_id":"i","type":"click","ts":7,"scene":"home","context":{"a":[1,{"b":2}]},'
    b'"request_id":"r-1","position":3,"unknown":{"x":NaN}}',
    b'{"event_id":NaN,"user_id":"u","item_id":"i","type":"click","ts":7}',  # pydantic-core reads it as "NaN"
    b'{"event_id":"NaN","user_id":"u","item_id":"i","type":"click","ts":7}',  # the same text, sent as a string
    b'{"event_id":"e","user_id":"u","item_id":Infinity,"type":"click","ts":7}',
    b'{"event_id":"e","user_id":"u","item_id":"i","type":"buy","ts":7}',
    b'{"event_id":"e","user_id":"u","item_id":"i","type":"click","ts":7.0}',
    b'{"event_id":"e","user_id":"u","item_id":"i","type":"click","ts":7,"position":0}',
    b'{"event_id":" ","user_id":"u","item_id":"i","type":"click","ts":7}',
    b'{"event_id":"e","user_id":"u","item_id":"i","type":"click","ts":7,"context":{"a":1e400}}',
    b'{"event_id":"e","user_id":"\\ud800","item_id":"i","type":"click","ts":7}',
    b'{"event_id":"e","event_id":"f","user_id":"u","item_id":"i","type":"click","ts":7}',  # the last key wins
    b'{"user_id":"u"}', b"[1]", b"{", b"\xff", b"", None,
])
def test_edges_get_the_same_decision(payload):
    assert_same_decision(payload)


def test_a_payload_over_the_limit_is_refused_alike():
    assert_same_decision(GOOD, max_bytes=len(GOOD) - 1)
    assert isinstance(parse_event_fields(GOOD, EVENT_TYPES, len(GOOD)), dict)


def test_absent_optional_fields_read_as_their_defaults_and_the_dict_is_the_callers():
    first = parse_event_fields(GOOD, EVENT_TYPES, MAX_BYTES)
    assert first == Event.model_validate_json(GOOD).__dict__
    first["user_id"] = "pseudonym"  # ingest replaces the raw id in place
    assert parse_event_fields(GOOD, EVENT_TYPES, MAX_BYTES)["user_id"] == "u7"


def test_the_redis_payload_from_field_dicts_is_the_models():
    payloads = [GOOD, b'{"event_id":"e-2","user_id":7,"item_id":"i\\"q","type":"view","ts":5,"scene":"s"}']
    models = [(i, parse_event(p, EVENT_TYPES, MAX_BYTES)) for i, p in enumerate(payloads)]
    dicts = [(i, parse_event_fields(p, EVENT_TYPES, MAX_BYTES)) for i, p in enumerate(payloads)]
    assert lua_events_payload(dicts) == lua_events_payload(models)
    assert json.loads(lua_events_payload(dicts))[1] == [1, "7", 'i"q', 5]
    assert lua_events_payload([]) == "[]"


def test_a_model_with_model_validators_has_no_field_validator():
    class Checked(BaseModel):
        a: int

        @model_validator(mode="after")
        def _check(self):
            return self

    with pytest.raises(TypeError, match="Checked has model validators"):
        fields_validator(Checked)


def test_the_row_builders_cover_the_log_schema():
    assert len(event_fields_log_row(parse_event_fields(GOOD, EVENT_TYPES, MAX_BYTES), 0, 0, 0)) == len(EVENT_LOG_SCHEMA)
