"""Click attribution (streaming/features/attribution.py): exact counts on constructed cases, reading the
offline log (old event files without the attribution columns included), and the feature job publishing it."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.events import (
    ATTRIBUTION_COLUMNS,
    EVENT_LOG_SCHEMA,
    IMPRESSION_LOG_SCHEMA,
    Event,
    Impression,
    event_log_row,
    impression_log_row,
)
from streaming.features import run_features, run_metrics
from streaming.features.attribution import (
    ATTRIBUTION_TABLES,
    CLICKS_METRIC,
    CTR_KS,
    IMPRESSIONS_METRIC,
    MISMATCHES_METRIC,
    ArmCounts,
    ArmKey,
    attribute,
    load_attribution,
    read_attribution,
)
from streaming.features.tables import read_manifest
from streaming.job_metrics import metrics_file, read_job_metrics
from streaming.offline_log import CorruptLogFile, OfflineLog
from streaming.settings import Settings

TS0 = 1_700_000_000_000  # epoch ms
WINDOW_MS = 60_000
HOME_V1 = ArmKey("home", "v1", "control", None)


def imp(rid: str, items: list[str], ts: int, *, scene="home", version="v1", variant="control", experiment=None,
        user="u1", partition=0, offset=0) -> dict:
    return dict(request_id=rid, user_id=user, scene=scene, version=version, variant=variant, experiment=experiment,
                item_ids=items, scores=[1.0] * len(items), fallback=None if version else "popular", ts=ts,
                partition=partition, offset=offset, ingest_ts=0)


def clk(eid: str, rid: str | None, item: str, ts: int, position: int | None = None, *, type_="click", user="u1",
        partition=0, offset=0) -> dict:
    return dict(event_id=eid, user_id=user, item_id=item, type=type_, ts=ts, scene=None, context=None,
                request_id=rid, position=position, partition=partition, offset=offset, ingest_ts=0)


def tables(imps: list[dict], clicks: list[dict]) -> tuple[pa.Table, pa.Table]:
    return (pa.Table.from_pylist(imps, schema=IMPRESSION_LOG_SCHEMA),
            pa.Table.from_pylist(clicks, schema=EVENT_LOG_SCHEMA))


# --- exactness on constructed cases --------------------------------------------------------------


def test_every_click_gets_one_outcome():
    imps, clicks = tables(
        [imp("r1", ["a", "b", "c"], TS0), imp("r2", ["d", "e"], TS0 + 10_000)],
        [
            clk("e1", "r1", "b", TS0 + 5, 2),  # attributed at its position
            clk("e2", "r1", "a", TS0 + WINDOW_MS, 1),  # exactly at the window's end: attributed
            clk("e3", "r1", "c", TS0 + WINDOW_MS + 1, 3),  # one ms later: late
            clk("e4", "r9", "a", TS0, 1),  # no such impression: orphan
            clk("e5", "r2", "d", TS0 + 9_999, 1),  # before its impression: early (clock skew)
            clk("e6", "r2", "e", TS0 + 10_000, 1),  # position 1 holds d: attributed by item at 2, mismatched
            clk("e7", "r2", "z", TS0 + 10_001, 2),  # not in the answer: unshown (and mismatched)
            clk("e8", "r2", "z", TS0 + 10_002),  # same (request, item) as e7: a duplicate
            clk("e1", "r1", "b", TS0 + 5, 2, offset=9),  # a producer retry of e1: a duplicate
            clk("e9", "r1", "b", TS0 + 7, 2),  # a second click on (r1, b): a duplicate
            clk("e10", "r1", "c", TS0 + 1, 3, type_="view"),  # not a click type: not considered
            clk("e11", None, "c", TS0 + 1, 3),  # no request id: not considered
        ],
    )
    a = attribute(imps, clicks, WINDOW_MS)
    assert a.outcomes() == {"attributed": 3, "late": 1, "early": 1, "orphan": 1, "unshown": 1}
    assert (a.clicks, a.mismatched_clicks, a.duplicate_clicks, a.impressions) == (7, 2, 3, 2)
    assert a.clicks == sum(a.outcomes().values())  # never silently dropped
    assert a.counters()["late_clicks"] == a.late_clicks == 1 and a.orphan_clicks == 1 and a.early_clicks == 1
    assert a.arms == {HOME_V1: ArmCounts(impressions=2, clicked=2, clicks=3, shown=2, clicked_at=(1, 2, 2))}
    assert a.items.to_pylist() == [
        {"item_id": "a", "exposures": 1, "clicks": 1}, {"item_id": "b", "exposures": 1, "clicks": 1},
        {"item_id": "c", "exposures": 1, "clicks": 0}, {"item_id": "d", "exposures": 1, "clicks": 0},
        {"item_id": "e", "exposures": 1, "clicks": 1}]


def test_a_duplicate_never_hides_an_attributed_click_and_first_impression_wins():
    imps, clicks = tables(
        [imp("r1", ["a", "b"], TS0, offset=0), imp("r1", ["x"], TS0 + 1, offset=1),  # a retried impression
         imp("r2", ["a"], TS0 + 100, offset=2)],
        [clk("e1", "r1", "b", TS0 - 50, 2),  # early, and first in time...
         clk("e2", "r1", "b", TS0 + 50, 2),  # ...but this one is in the window: the pair is attributed
         clk("e3", "r2", "a", TS0 + 100 + WINDOW_MS + 5, 1),  # late...
         clk("e4", "r2", "a", TS0 + 100 + WINDOW_MS + 9, 1)],  # ...twice: one late click
    )
    a = attribute(imps, clicks, WINDOW_MS)
    assert (a.impressions, a.duplicate_impressions) == (2, 1)
    assert a.outcomes() == {"attributed": 1, "late": 1, "early": 0, "orphan": 0, "unshown": 0}
    assert a.duplicate_clicks == 2
    assert a.arms[HOME_V1].clicked_at == (0, 1, 1)  # b at position 2 of the first record, not "x"


def test_two_variants_ctr_at_k_and_by_position():
    control = ("home", "v1", "control", "exp1")
    cand = ("home", "v2", "v2", "exp1")
    twelve = [f"i{n}" for n in range(1, 13)]
    imps, clicks = tables(
        [
            imp("c1", twelve, TS0, experiment="exp1"),
            imp("c2", ["i1", "i2"], TS0, experiment="exp1"),
            imp("c3", [], TS0, experiment="exp1"),  # showed nothing: not in CTR@k's denominator
            imp("c4", ["i1"], TS0, experiment="exp1"),
            imp("k1", ["i3", "i4", "i5", "i6", "i7", "i8"], TS0, version="v2", variant="v2", experiment="exp1"),
            imp("k2", ["i3"], TS0, version="v2", variant="v2", experiment="exp1"),
            imp("p1", ["i9"], TS0, scene="search", version=None, variant="control"),  # a fallback, no experiment
        ],
        [
            clk("a1", "c1", "i12", TS0 + 1, 12), clk("a2", "c1", "i7", TS0 + 2, 7),  # c1: best position 7
            clk("a3", "c2", "i1", TS0 + 1, 1), clk("a4", "c2", "i2", TS0 + 1, 2),  # c2: best 1
            clk("b1", "k1", "i8", TS0 + 1, 6),  # k1: best 6
            clk("p", "p1", "i9", TS0 + 1, 1),
        ],
    )
    a = attribute(imps, clicks, WINDOW_MS)
    assert a.arms[control] == ArmCounts(impressions=4, clicked=2, clicks=4, shown=3, clicked_at=(1, 1, 2))
    assert a.arms[cand] == ArmCounts(impressions=2, clicked=1, clicks=1, shown=2, clicked_at=(0, 0, 1))
    assert a.arms[("search", None, "control", None)] == ArmCounts(1, 1, 1, 1, (1, 1, 1))
    assert a.arms[control].ctr == 0.5 and a.arms[cand].ctr == 0.5
    assert [a.ctr_at(control, k) for k in CTR_KS] == [1 / 3, 1 / 3, 2 / 3]
    assert [a.ctr_at(cand, k) for k in CTR_KS] == [0.0, 0.0, 0.5]
    assert a.ctr_at(("home", "v9", "nope", None), 5) == 0.0
    with pytest.raises(ValueError, match="CTR_KS"):
        a.ctr_at(control, 3)

    rows = {(r["variant"], r["position"]): (r["impressions"], r["clicks"], r["ctr"])
            for r in a.by_position.to_pylist() if r["scene"] == "home"}
    assert rows[("control", 1)] == (3, 1, 1 / 3)  # c1, c2, c4 show something at 1; c2 clicked there
    assert rows[("control", 2)] == (2, 1, 0.5)
    assert rows[("control", 3)] == (1, 0, 0.0) and rows[("control", 12)] == (1, 1, 1.0)
    assert ("control", 13) not in rows
    assert rows[("v2", 1)] == (2, 0, 0.0) and rows[("v2", 6)] == (1, 1, 1.0) and ("v2", 7) not in rows
    assert sum(r["clicks"] for r in a.by_position.to_pylist()) == a.attributed_clicks == 6
    items = {r["item_id"]: (r["exposures"], r["clicks"]) for r in a.items.to_pylist()}
    assert items["i1"] == (3, 1) and items["i3"] == (3, 0) and items["i12"] == (1, 1) and items["i9"] == (2, 1)
    assert a.arms_table().num_rows == 3


def reference(imps: list[dict], clicks: list[dict], window_ms: int) -> tuple[dict, dict]:
    """The documented rules, one row at a time: (counters, {arm: ArmCounts})."""
    def order(kv: tuple[int, dict]) -> tuple:
        return kv[1]["ts"], kv[1]["partition"], kv[1]["offset"], kv[0]

    first: dict[str, dict] = {}
    for _, row in sorted(enumerate(imps), key=order):
        first.setdefault(row["request_id"], row)
    seen_ids, outcomes = set(), []
    for n, c in sorted(enumerate(clicks), key=order):
        if c["type"] != "click" or c["request_id"] is None or c["event_id"] in seen_ids:
            continue
        seen_ids.add(c["event_id"])
        i, pos, where = first.get(c["request_id"]), c["position"], None
        if i is None:
            outcome = "orphan"
        elif c["ts"] < i["ts"]:
            outcome = "early"
        elif c["ts"] - i["ts"] > window_ms:
            outcome = "late"
        elif pos and pos <= len(i["item_ids"]) and i["item_ids"][pos - 1] == c["item_id"]:
            outcome, where = "attributed", pos
        else:
            where = i["item_ids"].index(c["item_id"]) + 1 if c["item_id"] in i["item_ids"] else None
            outcome = "attributed" if where else "unshown"
        mismatched = outcome in ("attributed", "unshown") and pos is not None and where != pos
        outcomes.append(((c["request_id"], c["item_id"]), outcome != "attributed", n, outcome, where, mismatched))
    kept: dict[tuple, tuple] = {}
    for o in sorted(outcomes, key=lambda o: o[1]):  # attributed first, then in (ts, partition, offset) order
        kept.setdefault(o[0], o)
    counts = {f"{k}_clicks": sum(o[3] == k for o in kept.values()) for k in ("attributed", "late", "early", "orphan",
                                                                          "unshown")}
    counts.update(clicks=len(kept), mismatched_clicks=sum(o[5] for o in kept.values()),
                  duplicate_clicks=sum(c["type"] == "click" and c["request_id"] is not None for c in clicks) - len(kept),
                  impressions=len(first), duplicate_impressions=len(imps) - len(first))
    best: dict[str, int] = {}
    clicks_of: dict[str, int] = defaultdict(int)
    for (rid, _), _, _, outcome, where, _ in kept.values():
        if outcome == "attributed":
            best[rid] = min(best.get(rid, where), where)
            clicks_of[rid] += 1
    arms: dict[tuple, list] = {}
    for rid, i in first.items():
        a = arms.setdefault((i["scene"], i["version"], i["variant"], i["experiment"]), [0, 0, 0, 0, [0] * len(CTR_KS)])
        a[0] += 1
        a[1] += rid in best
        a[2] += clicks_of[rid]
        a[3] += bool(i["item_ids"])
        for n, k in enumerate(CTR_KS):
            a[4][n] += best.get(rid, 10**9) <= k
    return counts, {k: ArmCounts(a[0], a[1], a[2], a[3], tuple(a[4])) for k, a in arms.items()}


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_the_reference(seed):
    rng = random.Random(seed)
    catalog = [f"i{n}" for n in range(15)]
    imps = [imp(f"r{rng.randrange(90)}", rng.sample(catalog, rng.randrange(0, 12)), TS0 + rng.randrange(0, 10**4),
                scene=rng.choice(["home", "search"]), version=rng.choice(["v1", "v2", None]),
                variant=rng.choice(["control", "v2"]), experiment=rng.choice([None, "x"]),
                partition=rng.randrange(2), offset=n) for n in range(70)]
    clicks = []
    for n in range(300):
        if clicks and rng.random() < 0.1:  # a producer retry
            clicks.append(dict(rng.choice(clicks), offset=n))
            continue
        i = rng.choice(imps)
        item = rng.choice(i["item_ids"] + catalog[:2]) if rng.random() < 0.9 else "zz"
        pos = rng.choice([None, rng.randrange(1, 14), (i["item_ids"].index(item) + 1) if item in i["item_ids"] else 1])
        clicks.append(clk(f"e{n}", rng.choice([i["request_id"], i["request_id"], f"orphan{n % 7}", None]), item,
                          i["ts"] + rng.randrange(-WINDOW_MS // 4, 2 * WINDOW_MS), pos,
                          type_=rng.choice(["click", "click", "click", "view"]), partition=rng.randrange(2), offset=n))
    want_counts, want_arms = reference(imps, clicks, WINDOW_MS)
    a = attribute(*tables(imps, clicks), WINDOW_MS)
    assert a.counters() == want_counts
    assert a.arms == want_arms
    assert sum(r["clicks"] for r in a.by_position.to_pylist()) == a.attributed_clicks


def test_empty_inputs():
    imps, clicks = tables([], [])
    a = attribute(imps, clicks, WINDOW_MS)
    assert a.arms == {} and a.clicks == 0 and a.by_position.num_rows == 0 and a.items.num_rows == 0
    a = attribute(imps, tables([], [clk("e1", "r1", "a", TS0)])[1], WINDOW_MS)
    assert a.orphan_clicks == 1 and a.clicks == 1


# --- reading the offline log -----------------------------------------------------------------------


def make_settings(data_dir: Path, **kw) -> Settings:
    return Settings(**{"data_dir": data_dir, "user_buckets": 2, "attribution_window_s": WINDOW_MS / 1000, **kw})


def write_log(settings: Settings, topic: str, rows: list[tuple], schema: pa.Schema) -> None:
    """One file per partition, as ingest writes them (rows from the contract's row builders)."""
    by_part = defaultdict(list)
    for row in rows:
        by_part[row[schema.get_field_index("partition")]].append(dict(zip(schema.names, row)))
    for p, rs in sorted(by_part.items()):
        OfflineLog(settings.log_dir).write(topic, p, pa.Table.from_pylist(rs, schema=schema))


def impression_rows(specs: list[tuple], start_offset: int = 0) -> list[tuple]:
    """(request_id, scene, version, variant, experiment, items, ts) -> log rows on partition 0."""
    return [impression_log_row(Impression(request_id=rid, user_id="p1", scene=scene, version=version, variant=variant,
                                          experiment=exp, item_ids=items, scores=[0.5] * len(items), ts=ts),
                               0, start_offset + n, 0)
            for n, (rid, scene, version, variant, exp, items, ts) in enumerate(specs)]


def event_rows(specs: list[tuple], partition: int, start_offset: int = 0) -> list[tuple]:
    """(event_id, item, ts, request_id, position, type) -> log rows."""
    return [event_log_row(Event(event_id=eid, user_id="p1", item_id=item, type=type_, ts=ts, request_id=rid,
                                position=pos), partition, start_offset + n, 0)
            for n, (eid, item, ts, rid, pos, type_) in enumerate(specs)]


def write_old_event_file(settings: Settings, partition: int, offsets: range) -> None:
    """An event log file written before `request_id` / `position` existed (its schema lacks them)."""
    old = pa.schema([f for f in EVENT_LOG_SCHEMA if f.name not in ATTRIBUTION_COLUMNS])
    rows = [dict(event_id=f"old{o}", user_id="p1", item_id="a", type="click", ts=TS0, scene=None, context=None,
                 partition=partition, offset=o, ingest_ts=0) for o in offsets]
    OfflineLog(settings.log_dir).write(settings.events_topic, partition, pa.Table.from_pylist(rows, schema=old))


def fill_log(s: Settings) -> None:
    write_log(s, s.impressions_topic, impression_rows([
        ("r1", "home", "v1", "control", "x1", ["a", "b"], TS0),
        ("r2", "home", "v2", "v2", "x1", ["c", "a"], TS0 + 1000),
        ("r3", "search", None, "control", None, ["d"], TS0 + 2000),
    ]), IMPRESSION_LOG_SCHEMA)
    write_old_event_file(s, 1, range(3))
    write_log(s, s.events_topic, event_rows([
        ("e1", "b", TS0 + 10, "r1", 2, "click"),
        ("e2", "a", TS0 + 1010, "r2", 2, "click"),
        ("e3", "d", TS0 + 2000 + WINDOW_MS + 1, "r3", 1, "click"),  # late
        ("e4", "q", TS0 + 5, "r404", None, "click"),  # orphan
        ("e5", "a", TS0 + 20, "r1", 1, "view"),  # not a click
        ("e6", "a", TS0 + 20, None, None, "click"),  # no request id
    ], partition=1, start_offset=3), EVENT_LOG_SCHEMA)


def test_read_attribution_over_log_files(tmp_path):
    s = make_settings(tmp_path)
    fill_log(s)
    a = read_attribution(s)
    assert a.window_ms == WINDOW_MS
    assert a.outcomes() == {"attributed": 2, "late": 1, "early": 0, "orphan": 1, "unshown": 0}
    assert a.arms == {
        ("home", "v1", "control", "x1"): ArmCounts(1, 1, 1, 1, (0, 1, 1)),
        ("home", "v2", "v2", "x1"): ArmCounts(1, 1, 1, 1, (0, 1, 1)),
        ("search", None, "control", None): ArmCounts(1, 0, 0, 1, (0, 0, 0)),
    }
    # Filters keep impressions; a click follows its impression; orphans have none, so all are kept.
    home = read_attribution(s, scene="home")
    assert set(home.arms) == {("home", "v1", "control", "x1"), ("home", "v2", "v2", "x1")}
    assert (home.attributed_clicks, home.late_clicks, home.orphan_clicks) == (2, 0, 1)
    exp = read_attribution(s, experiment="x1", since_ms=TS0 + 500)
    assert set(exp.arms) == {("home", "v2", "v2", "x1")} and exp.attributed_clicks == 1
    assert exp.orphan_clicks == 0  # the orphan click came before since_ms


def test_read_attribution_of_an_empty_log(tmp_path):
    a = read_attribution(make_settings(tmp_path))
    assert a.arms == {} and a.clicks == 0


def test_a_corrupt_impression_file_is_named(tmp_path):
    s = make_settings(tmp_path)
    fill_log(s)
    f = OfflineLog(s.log_dir).list_files(s.impressions_topic)[0]
    Path(f.path).write_bytes(b"PAR1 not really")
    with pytest.raises(CorruptLogFile, match=re.escape(Path(f.path).name)):
        read_attribution(s)


# --- the feature job ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_feature_job_publishes_attribution(tmp_path, ray_local):
    s = make_settings(tmp_path)
    fill_log(s)
    r = run_features(s)
    assert not r.noop and r.new_files == 3  # the impressions file, the old and the new event file
    m = read_manifest(s)
    assert all(m["tables"][name] for name in ATTRIBUTION_TABLES)
    assert m["watermarks"][s.impressions_topic] == {"0": 2}
    assert m["attribution"]["counts"]["attributed_clicks"] == 2 and m["attribution"]["window_s"] == 60.0
    assert m["counts"]["events"] == 9  # the old file's events (no attribution columns) were read too
    published = load_attribution(s)
    fresh = read_attribution(s)
    assert published.arms == fresh.arms and published.counters() == fresh.counters()
    assert published.by_position.equals(fresh.by_position) and published.items.equals(fresh.items)

    prom = read_job_metrics(metrics_file(s, run_metrics.FEATURES_METRICS))
    assert {labels["outcome"]: v for labels, v in prom.series(CLICKS_METRIC)} == {
        "attributed": 2, "late": 1, "early": 0, "orphan": 1, "unshown": 0}
    assert prom.value(IMPRESSIONS_METRIC) == 3 and prom.value(MISMATCHES_METRIC) == 0

    assert run_features(s).noop  # nothing new
    # New impressions alone make a run, and attribution sees the clicks that were orphans before.
    write_log(s, s.impressions_topic, impression_rows([("r404", "home", "v1", "control", "x1", ["q"], TS0)],
                                                      start_offset=3), IMPRESSION_LOG_SCHEMA)
    r = run_features(s)
    assert not r.noop and r.new_files == 1 and r.new_events == 0
    a = load_attribution(s)
    assert (a.attributed_clicks, a.orphan_clicks) == (3, 0)
    assert read_manifest(s)["watermarks"][s.impressions_topic] == {"0": 3}
    # A new window recomputes it on the next run, even with nothing new in the log.
    wide = make_settings(tmp_path, attribution_window_s=3600.0)
    r = run_features(wide)
    assert not r.noop and r.new_files == 0
    a = load_attribution(wide)
    assert (a.late_clicks, a.window_ms) == (0, 3_600_000)
    assert run_features(wide).noop
    assert {pq.read_schema(str(s.features_dir / e["path"])).names[0] for n in ATTRIBUTION_TABLES
            for e in read_manifest(s)["tables"][n]} == {"scene", "item_id"}
