"""The event/item contract has one home, `streaming/events.py`: everything else is derived from it.

These tests fail when a derived form drifts from the pydantic models (Arrow columns, log schemas,
ingest rows, the feature job's columns, the online store's Lua record) or when a second copy of
the contract appears anywhere in streaming/, training/ or services/.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from streaming import events
from streaming.events import (
    EVENT_COLUMNS,
    EVENT_FEATURE_COLUMNS,
    EVENT_LOG_SCHEMA,
    ITEM_COLUMNS,
    ITEM_LOG_ONLY_FIELDS,
    ITEM_LOG_SCHEMA,
    NON_FEATURE_COLUMNS,
    ONLINE_EVENT_FIELDS,
    PROVENANCE_COLUMNS,
    TS_MAX_MS,
    Event,
    Item,
    event_log_row,
    item_log_row,
)
from streaming.features.merge import SEQUENCE_LIST_OF
from streaming.offline_log import OfflineLog, read_table
from streaming.online_store import (
    APPLY_EVENTS_LUA,
    LUA_FIELD_INDEX,
    LUA_RECORD_FIELDS,
    lua_events_payload,
    lua_field_constant,
)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("streaming", "training", "services")
CONTRACT_HOME = "streaming/events.py"

# What log files already on disk hold: a change here breaks reading existing data dirs.
# The attribution columns (request_id, position) came with issue 17. Files written before lack them; every
# reader of them (streaming/features/attribution.py, training/hard_negatives.py) reads with a schema that
# fills nulls, and the feature job checks event files without them (tests/streaming/test_attribution.py).
ON_DISK_EVENT_LOG_BEFORE_ATTRIBUTION = [
    ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()), ("type", pa.string()),
    ("ts", pa.int64()), ("scene", pa.string()), ("context", pa.string())]
ON_DISK_EVENT_LOG = [*ON_DISK_EVENT_LOG_BEFORE_ATTRIBUTION, ("request_id", pa.string()), ("position", pa.int64()),
                     ("partition", pa.int32()), ("offset", pa.int64()), ("ingest_ts", pa.int64())]
ON_DISK_ITEM_LOG = [("item_id", pa.string()), ("title", pa.string()), ("text", pa.string()),
                    ("attributes", pa.string()), ("ts", pa.int64()), ("deleted", pa.bool_()),
                    ("partition", pa.int32()), ("offset", pa.int64()), ("ingest_ts", pa.int64())]

FULL_EVENT = Event(event_id="e-1", user_id="u7", item_id="i42", type="click", ts=1_732_350_000_000,
                   scene="home", context={"device": "ios", "n": [1, 2]})
BARE_EVENT = Event(event_id="e-2", user_id="u7", item_id="i43", type="view", ts=TS_MAX_MS)
FULL_ITEM = Item(item_id="i42", title="Alien", text="A space horror classic", attributes={"genre": "sci-fi"},
                 ts=1_732_350_000_000, deleted=True)
BARE_ITEM = Item(item_id="i43", title="Heat", ts=0)


# --- the derived forms match the models ----------------------------------------------------------


def test_arrow_columns_are_the_model_fields_in_order():
    assert EVENT_COLUMNS.names == [f for f in Event.model_fields if f not in events.ATTRIBUTION_COLUMNS]
    assert ITEM_COLUMNS.names == [f for f in Item.model_fields if f not in ITEM_LOG_ONLY_FIELDS]
    kinds = {"ts": pa.int64(), "deleted": pa.bool_()}
    for schema in (EVENT_COLUMNS, ITEM_LOG_SCHEMA):
        for f in schema:
            if f.name not in PROVENANCE_COLUMNS.names:
                assert f.type == kinds.get(f.name, pa.string()), f.name  # dicts are JSON text
    assert events.EVENT_JSON_COLUMNS == ("context",) and events.ITEM_JSON_COLUMNS == ("attributes",)


def test_log_schema_is_the_contract_plus_provenance():
    attribution = [EVENT_LOG_SCHEMA.field(n) for n in events.ATTRIBUTION_COLUMNS]
    assert EVENT_LOG_SCHEMA.equals(pa.schema([*EVENT_COLUMNS, *attribution, *PROVENANCE_COLUMNS]))
    deleted = [pa.field(n, pa.bool_()) for n in ITEM_LOG_ONLY_FIELDS]
    assert ITEM_LOG_SCHEMA.equals(pa.schema([*ITEM_COLUMNS, *deleted, *PROVENANCE_COLUMNS]))
    assert PROVENANCE_COLUMNS.names == ["partition", "offset", "ingest_ts"]


def test_log_schemas_are_what_existing_files_hold():
    assert EVENT_LOG_SCHEMA.equals(pa.schema(ON_DISK_EVENT_LOG)), "a log schema change needs a migration"
    assert ITEM_LOG_SCHEMA.equals(pa.schema(ON_DISK_ITEM_LOG)), "a log schema change needs a migration"


def test_feature_columns_are_the_log_columns_features_read():
    assert EVENT_FEATURE_COLUMNS == tuple(n for n in EVENT_LOG_SCHEMA.names if n not in NON_FEATURE_COLUMNS)
    # The feature merge keeps each column it reads in a list column of the sequences table.
    assert set(SEQUENCE_LIST_OF) | {"user_id"} == set(EVENT_FEATURE_COLUMNS)


@pytest.mark.parametrize("record", [FULL_EVENT, BARE_EVENT, FULL_ITEM, BARE_ITEM],
                         ids=["event", "bare-event", "item", "bare-item"])
def test_a_built_row_round_trips_through_the_log(tmp_path, record):
    is_event = isinstance(record, Event)
    schema, build = (EVENT_LOG_SCHEMA, event_log_row) if is_event else (ITEM_LOG_SCHEMA, item_log_row)
    row = build(record, 3, 42, 1_000)
    assert len(row) == len(schema.names)
    table = pa.Table.from_arrays([pa.array([v], f.type) for v, f in zip(row, schema)], schema=schema)
    log = OfflineLog(tmp_path)
    written = log.write("topic", 3, table)
    (back,) = read_table(log, [written], schema).to_pylist()
    assert {k: back.pop(k) for k in PROVENANCE_COLUMNS.names} == {"partition": 3, "offset": 42, "ingest_ts": 1_000}
    model = type(record)
    for column in events.json_columns(model):
        back[column] = json.loads(back[column]) if back[column] is not None else None
    assert model.model_validate(back) == record


def test_lua_record_fields_match_what_the_script_indexes():
    assert set(ONLINE_EVENT_FIELDS) <= set(Event.model_fields)
    assert LUA_RECORD_FIELDS == ("offset", *ONLINE_EVENT_FIELDS)
    first, _, body = APPLY_EVENTS_LUA.partition("\n")
    m = re.fullmatch(r"local ([A-Z_, ]+) = ([0-9, ]+)", first)
    assert m, first
    names, values = m[1].split(", "), [int(v) for v in m[2].split(", ")]
    assert names == [lua_field_constant(f) for f in LUA_RECORD_FIELDS]
    assert values == [LUA_FIELD_INDEX[f] for f in LUA_RECORD_FIELDS] == list(range(1, len(LUA_RECORD_FIELDS) + 1))
    indexed = set(re.findall(r"\br\[([^\]]+)\]", body))
    assert indexed == set(names), "the script reads a record only through the generated constants, each of them"
    (record,) = json.loads(lua_events_payload([(7, FULL_EVENT)]))
    assert len(record) == len(LUA_RECORD_FIELDS)
    assert record[LUA_FIELD_INDEX["offset"] - 1] == 7
    for f in ONLINE_EVENT_FIELDS:
        assert record[LUA_FIELD_INDEX[f] - 1] == getattr(FULL_EVENT, f), f


# --- no second definition ------------------------------------------------------------------------

CONTRACT_TABLES = {
    "event columns": set(EVENT_COLUMNS.names),
    "item columns": set(ITEM_COLUMNS.names),
    "provenance": set(PROVENANCE_COLUMNS.names),
}
TS_BOUND_NAMES = {"TS_MIN_MS", "TS_MAX_MS"}


def _restates(names: set[str], columns: set[str]) -> bool:
    """A literal restates a contract table when it names most of its columns (a projection of a
    few, like `select(["user_id", "ts"])`, is fine)."""
    return len(names & columns) >= min(len(columns), len(columns) // 2 + 2)


def _literal_names(node: ast.List | ast.Tuple) -> set[str]:
    """The column names a literal spells: string elements, the first element of `(name, type)`
    pairs (a `pa.schema` literal), attributes read (`(e.event_id, e.user_id, ...)`, a hand-written
    row), also inside a one-argument call (`json(e.context)`)."""
    out = set()
    for e in node.elts:
        if isinstance(e, ast.Tuple) and e.elts:
            e = e.elts[0]
        if isinstance(e, ast.Call) and len(e.args) == 1:
            e = e.args[0]
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            out.add(e.value)
        elif isinstance(e, ast.Attribute):
            out.add(e.attr)
    return out


def contract_copies(source: str, rel: str) -> list[str]:
    """Places in `source` that define the contract again: a list/tuple/`pa.schema` literal naming
    most columns of a contract table, a TS bound constant, or its value."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.List, ast.Tuple)):
            names = _literal_names(node)
            for table, columns in CONTRACT_TABLES.items():
                if _restates(names, columns):
                    found.append(f"{rel}:{node.lineno}: a literal restating the {table}: {sorted(names)}")
        elif isinstance(node, ast.Constant) and node.value == TS_MAX_MS and type(node.value) is int:
            found.append(f"{rel}:{node.lineno}: the TS_MAX_MS value {node.value}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in TS_BOUND_NAMES:
                    found.append(f"{rel}:{node.lineno}: {t.id} defined again")
    return found


def test_no_other_module_defines_the_contract():
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel != CONTRACT_HOME and "__pycache__" not in path.parts:
                found += contract_copies(path.read_text(encoding="utf-8"), rel)
    assert not found, f"the contract is defined in {CONTRACT_HOME} only; derive from it instead:\n" + "\n".join(found)


def test_the_contract_scan_catches_the_old_copies():
    probe = '''
EVENT_FIELDS = pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
                          ("type", pa.string()), ("ts", pa.int64()), ("scene", pa.string()), ("context", pa.string())])
_PROVENANCE = [("partition", pa.int32()), ("offset", pa.int64()), ("ingest_ts", pa.int64())]
_EVENT_COLS = ["event_id", "user_id", "item_id", "type", "ts", "scene", "partition", "offset"]
TS_MAX_MS = 7_258_118_400_000
def _event_row(e, partition, offset, now_ms):
    return (e.event_id, e.user_id, e.item_id, e.type, e.ts, e.scene, _json_or_none(e.context), partition, offset, now_ms)
def ok(t):
    return t.select(["user_id", "item_id", "ts", "scene"]).sort_by([("user_id", "ascending"), ("ts", "ascending")])
'''
    hits = contract_copies(probe, "probe.py")
    assert sorted(int(h.split(":")[1]) for h in hits) == [2, 4, 5, 6, 6, 8], hits
