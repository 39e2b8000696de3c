"""Click attribution: clicks joined to the impressions they came from, by `request_id`, within a window.

Every recommendation answer carries a `request_id` and is logged as an impression
(`streaming.events.Impression`, topic `STREAMREC_IMPRESSIONS_TOPIC`). A click that carries that
`request_id` back (and the item's 1-based `position`) is matched to it here:

* A *click* is an event whose `type` is in `CLICK_TYPES` (only ``click``: a purchase or a like
  comes later and elsewhere, and counting it again would inflate CTR) with a non-null `request_id`.
  Clicks are deduplicated by `event_id` (producer retries), then by (`request_id`, `item_id`): a
  second click on the same item of the same answer counts once. The first one by (ts, partition,
  offset) is kept; the others are counted in `duplicate_clicks`. Impressions are deduplicated by
  `request_id` the same way (`duplicate_impressions`).
* Every remaining click gets exactly one outcome (attributed + late + early + orphan + unshown =
  `clicks`), none is dropped silently:
  - ``orphan``: no impression has its `request_id` (impressions off, dropped by a full buffer, or
    not logged yet);
  - ``early``: it came before its impression (clock skew between the API and the client);
  - ``late``: more than `STREAMREC_ATTRIBUTION_WINDOW_S` after its impression;
  - ``attributed``: within the window, and the item at its `position` is the clicked item -- or, when
    the position is missing or holds another item, the clicked item is elsewhere in the answer:
    attributed at the item's own position, and a wrong position is counted in `mismatched_clicks`;
  - ``unshown``: within the window, but the clicked item was not in the answer at all (counted in
    `mismatched_clicks` too when it gave a position).
* Per arm -- `ArmKey` (scene, version, variant, experiment) of the impression -- `ArmCounts`: impressions,
  `clicked` (impressions with at least one attributed click: the numerator of CTR, what the experiment
  statistics compare), attributed `clicks`, `shown` (impressions that showed at least one item) and
  `clicked_at` for CTR@k, k in `CTR_KS`: impressions with an attributed click within their top k / `shown`.
* `by_position`: per arm and position, impressions that showed something there, attributed clicks
  there and their ratio. `items`: per item, exposures (answers that listed it) and attributed clicks.

The feature job (`streaming.features.job`) recomputes attribution from the whole log on every run
that has new log files and publishes it with the feature version (`publish_attribution`: tables
`ATTRIBUTION_ARMS`, `ATTRIBUTION_POSITIONS`, `ATTRIBUTION_ITEMS`, the counters in the manifest's
`attribution` entry, and `streamrec_attribution_*` in `features.prom`). A full recompute is the
simplest exact answer (a late click changes an old impression's row); it reads two small columns of
the event log plus the impressions. Making it incremental is the scale follow-up (issue 18).
`read_attribution` computes the same from the log on demand (`streamrec experiment status`, the canary).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from streaming.events import (
    ATTRIBUTION_COLUMNS,
    EVENT_LOG_SCHEMA,
    IMPRESSION_LOG_SCHEMA,
)
from streaming.features.store import write_parquet
from streaming.features.tables import read_manifest, read_parquet
from streaming.offline_log import CorruptLogFile, LogFile, OfflineLog, check_log_file
from streaming.settings import Settings

logger = logging.getLogger(__name__)

CLICK_TYPES = ("click",)  # the event types that count as a click on an impression
CTR_KS = (1, 5, 10)  # CTR@k is computed for these k (positions, 1-based)
MS_PER_S = 1000
ARM_COLUMNS = ("scene", "version", "variant", "experiment")
OUTCOMES = ("attributed", "late", "early", "orphan", "unshown")  # one per deduplicated click

# The columns read from the log (only these: the impressions' scores and the events' context stay on disk).
IMPRESSION_COLUMNS = ("request_id", "user_id", *ARM_COLUMNS, "item_ids", "ts", "partition", "offset")
CLICK_COLUMNS = tuple(n for n in EVENT_LOG_SCHEMA.names if n not in ("scene", "context", "ingest_ts"))
# Old event log files predate the attribution columns: they are checked (and read) without them.
EVENT_SCHEMA_WITHOUT_ATTRIBUTION = pa.schema([f for f in EVENT_LOG_SCHEMA if f.name not in ATTRIBUTION_COLUMNS])

# The tables the feature job publishes (manifest `tables` entries; files in the version directory).
ATTRIBUTION_ARMS = "attribution_arms"
ATTRIBUTION_POSITIONS = "attribution_positions"
ATTRIBUTION_ITEMS = "attribution_items"
ATTRIBUTION_TABLES = (ATTRIBUTION_ARMS, ATTRIBUTION_POSITIONS, ATTRIBUTION_ITEMS)
_KEY_FIELDS = [("scene", pa.string()), ("version", pa.string()), ("variant", pa.string()), ("experiment", pa.string())]
ARMS_SCHEMA = pa.schema([*_KEY_FIELDS, ("impressions", pa.int64()), ("shown", pa.int64()), ("clicked", pa.int64()),
                         ("clicks", pa.int64()), *[(f"clicked_at_{k}", pa.int64()) for k in CTR_KS],
                         ("ctr", pa.float64()), *[(f"ctr_at_{k}", pa.float64()) for k in CTR_KS]])
POSITIONS_SCHEMA = pa.schema([*_KEY_FIELDS, ("position", pa.int32()), ("impressions", pa.int64()),
                              ("clicks", pa.int64()), ("ctr", pa.float64())])
ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("exposures", pa.int64()), ("clicks", pa.int64())])

# Metric names (in features.prom, written by streaming.features.run_metrics from the live version).
CLICKS_METRIC = "streamrec_attribution_clicks_total"
IMPRESSIONS_METRIC = "streamrec_attribution_impressions_total"
MISMATCHES_METRIC = "streamrec_attribution_position_mismatches_total"


class ArmKey(NamedTuple):
    """An arm of the attribution: equal (and hashed) like the plain tuple (scene, version, variant, experiment)."""

    scene: str
    version: str | None  # None: a fallback answered
    variant: str  # `control` without an experiment
    experiment: str | None


@dataclass(frozen=True)
class ArmCounts:
    """One arm's totals. `clicked_at[i]`: impressions with an attributed click within the top `CTR_KS[i]`."""

    impressions: int
    clicked: int
    clicks: int
    shown: int = 0
    clicked_at: tuple[int, ...] = ()

    @property
    def ctr(self) -> float:
        """Clicked impressions / impressions (0.0 without impressions)."""
        return self.clicked / self.impressions if self.impressions else 0.0

    def ctr_at(self, k: int) -> float:
        """CTR@k: impressions clicked within their top k / impressions that showed at least one item."""
        if k not in CTR_KS:
            raise ValueError(f"CTR@{k} is not computed; k must be one of {CTR_KS} (CTR_KS)")
        if len(self.clicked_at) != len(CTR_KS):
            raise ValueError("these ArmCounts were built without clicked_at (one count per CTR_KS)")
        return self.clicked_at[CTR_KS.index(k)] / self.shown if self.shown else 0.0


@dataclass(frozen=True)
class Attribution:
    """The result of `attribute` (see the module docstring for every field's meaning)."""

    arms: dict[ArmKey, ArmCounts]
    by_position: pa.Table  # POSITIONS_SCHEMA
    items: pa.Table  # ITEMS_SCHEMA
    window_ms: int
    impressions: int = 0  # deduplicated impressions
    clicks: int = 0  # deduplicated clicks (with a request id): the sum of the outcomes
    attributed_clicks: int = 0
    late_clicks: int = 0
    early_clicks: int = 0
    orphan_clicks: int = 0
    unshown_clicks: int = 0
    mismatched_clicks: int = 0
    duplicate_clicks: int = 0
    duplicate_impressions: int = 0

    def ctr_at(self, arm_key: tuple, k: int) -> float:
        """CTR@k of one arm (0.0 for an arm without impressions)."""
        arm = self.arms.get(ArmKey(*arm_key))
        return (arm or ArmCounts(0, 0, 0, 0, (0,) * len(CTR_KS))).ctr_at(k)

    def outcomes(self) -> dict[str, int]:
        """Deduplicated clicks by outcome (`OUTCOMES`)."""
        return {"attributed": self.attributed_clicks, "late": self.late_clicks, "early": self.early_clicks,
                "orphan": self.orphan_clicks, "unshown": self.unshown_clicks}

    def counters(self) -> dict[str, int]:
        """Every counter, JSON-ready (the manifest's `attribution.counts`)."""
        return {"impressions": self.impressions, "clicks": self.clicks, **{f"{k}_clicks": v for k, v in
                self.outcomes().items()}, "mismatched_clicks": self.mismatched_clicks,
                "duplicate_clicks": self.duplicate_clicks, "duplicate_impressions": self.duplicate_impressions}

    def arms_table(self) -> pa.Table:
        """`arms` as a table (ARMS_SCHEMA), sorted by key."""
        rows = []
        for key, a in sorted(self.arms.items(), key=lambda kv: tuple((v is not None, v or "") for v in kv[0])):
            row = dict(key._asdict(), impressions=a.impressions, shown=a.shown, clicked=a.clicked, clicks=a.clicks,
                       ctr=a.ctr)
            for k, n in zip(CTR_KS, a.clicked_at):
                row[f"clicked_at_{k}"], row[f"ctr_at_{k}"] = n, a.ctr_at(k)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=ARMS_SCHEMA)


# --- the join ----------------------------------------------------------------------------------


@dataclass
class Joined:
    """The row-level join behind an `Attribution`: deduplicated impressions and the attributed clicks."""

    impressions: pa.Table  # one row per request_id
    lengths: np.ndarray  # items shown per impression
    flat_items: pa.Array  # every impression's items, concatenated
    click_rows: np.ndarray  # attributed clicks: impression row,
    click_positions: np.ndarray  # ... 1-based position,
    click_items: pa.Array  # ... item
    counts: dict[str, int] = field(default_factory=dict)


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray:
    """A column, or nulls when a hand-built table lacks it (e.g. provenance)."""
    if name in table.column_names:
        return table[name].cast(type_)
    return pa.chunked_array([pa.nulls(table.num_rows, type_)])


def _first_rows(table: pa.Table, keys: list[str], rank: np.ndarray | None = None) -> np.ndarray:
    """Row indices of the first row per `keys` in (rank, ts, partition, offset) order, ascending."""
    df = pd.DataFrame({k: table[k].to_pandas() for k in keys})
    df["_rank"] = rank if rank is not None else 0
    for col in ("ts", "partition", "offset"):
        df["_" + col] = _column(table, col, pa.int64()).to_numpy(zero_copy_only=False)
    df["_row"] = np.arange(table.num_rows)
    df = df.sort_values(["_rank", "_ts", "_partition", "_offset", "_row"], kind="stable", na_position="first")
    return np.sort(df.drop_duplicates(subset=keys, keep="first")["_row"].to_numpy())


def _is_click(events: pa.Table) -> pa.ChunkedArray:
    """Which rows are clicks with a request id (`CLICK_TYPES`)."""
    return pc.fill_null(pc.and_(pc.is_in(_column(events, "type", pa.string()), pa.array(CLICK_TYPES)),
                                pc.is_valid(_column(events, "request_id", pa.string()))), False)


def _clicks(clicks: pa.Table) -> pa.Table:
    """The clicks with a request id, deduplicated by event_id (a null id is its own)."""
    c = clicks.filter(_is_click(clicks))
    if not c.num_rows:
        return c
    eid = c["event_id"].to_pandas().astype(object)
    eid = eid.where(eid.notna(), pd.Series([f"\x00row{i}" for i in range(c.num_rows)], dtype=object))
    c = c.set_column(c.schema.get_field_index("event_id"), "event_id", pa.array(eid.to_numpy(), pa.string()))
    return c.take(_first_rows(c, ["event_id"]))


def join(impressions: pa.Table, clicks: pa.Table, window_ms: int) -> Joined:
    """Match clicks to impressions (see the module docstring); the pure core of `attribute`."""
    imps = impressions.take(_first_rows(impressions, ["request_id"])) if impressions.num_rows else impressions
    item_lists = imps["item_ids"].combine_chunks() if imps.num_rows else pa.array([], pa.list_(pa.string()))
    lengths = pc.fill_null(pc.list_value_length(item_lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = pc.list_flatten(item_lists)

    c = _clicks(clicks)
    with_request_id = int(pc.sum(_is_click(clicks)).as_py() or 0)
    index = pd.Index(imps["request_id"].to_pandas().astype(object) if imps.num_rows else [], dtype=object)
    rows = (index.get_indexer(c["request_id"].to_pandas().astype(object)) if c.num_rows else np.zeros(0)).astype(np.int64)
    ts = _column(c, "ts", pa.int64()).to_numpy(zero_copy_only=False)
    imp_ts = _column(imps, "ts", pa.int64()).to_numpy(zero_copy_only=False)
    orphan = rows < 0
    delta = ts - (imp_ts[np.maximum(rows, 0)] if len(imp_ts) else np.zeros(len(rows), np.int64))
    early = ~orphan & (delta < 0)
    late = ~orphan & (delta > window_ms)
    inwin = ~orphan & ~early & ~late

    # The position: the given one when it holds the clicked item, else the item's own one in the answer.
    r = np.where(inwin, rows, 0)
    pos = pc.fill_null(_column(c, "position", pa.int64()), 0).to_numpy(zero_copy_only=False)
    items = _column(c, "item_id", pa.string()).combine_chunks()
    has_pos = pos > 0
    ok = inwin & has_pos & (pos <= (lengths[r] if len(lengths) else 0))
    at = np.where(ok, (starts[r] if len(starts) else 0) + pos - 1, 0)
    shown_there = flat.take(pa.array(at, pa.int64())) if len(flat) else pa.nulls(len(at), pa.string())
    match = ok & pc.fill_null(pc.equal(shown_there, items), False).to_numpy(zero_copy_only=False)
    final_pos = np.where(match, pos, 0)
    need = np.flatnonzero(inwin & ~match)
    if len(need):  # position missing or wrong: look the item up in its answer (only those answers)
        wanted = np.unique(r[need])
        sub = item_lists.take(pa.array(wanted, pa.int64()))
        parents = pc.list_parent_indices(sub).to_numpy(zero_copy_only=False)
        sub_len = pc.fill_null(pc.list_value_length(sub), 0).to_numpy(zero_copy_only=False)
        sub_starts = np.concatenate([[0], np.cumsum(sub_len)[:-1]])
        where = pd.DataFrame({"row": wanted[parents], "item": pc.list_flatten(sub).to_pandas().astype(object),
                              "at": np.arange(len(parents)) - sub_starts[parents] + 1})
        where = where.drop_duplicates(["row", "item"], keep="first")
        looked = pd.DataFrame({"row": r[need], "item": items.take(pa.array(need, pa.int64())).to_pandas().astype(object)})
        found = looked.merge(where, on=["row", "item"], how="left")["at"].fillna(0).to_numpy().astype(np.int64)
        final_pos[need] = found
    attributed = final_pos > 0
    mismatched = inwin & has_pos & ~match

    # Several clicks on one (request, item) count once: an attributed one if any, else the first.
    keep = _first_rows(c, ["request_id", "item_id"], rank=(~attributed).astype(np.int8)) if c.num_rows \
        else np.zeros(0, np.int64)
    counts = {
        "impressions": imps.num_rows, "duplicate_impressions": impressions.num_rows - imps.num_rows,
        "clicks": len(keep), "duplicate_clicks": with_request_id - len(keep),
        "attributed_clicks": int(attributed[keep].sum()), "late_clicks": int(late[keep].sum()),
        "early_clicks": int(early[keep].sum()), "orphan_clicks": int(orphan[keep].sum()),
        "unshown_clicks": int((inwin & ~attributed)[keep].sum()), "mismatched_clicks": int(mismatched[keep].sum()),
    }
    won = keep[attributed[keep]]
    return Joined(imps, lengths, flat, rows[won], final_pos[won], items.take(pa.array(won, pa.int64())), counts)


def attribute(impressions: pa.Table, clicks: pa.Table, window_ms: int) -> Attribution:
    """Attribute `clicks` (event log rows) to `impressions` (impression log rows) within `window_ms`.
    Pure; the tables need the columns of `IMPRESSION_COLUMNS` / `CLICK_COLUMNS` (provenance optional)."""
    j = join(impressions, clicks, int(window_ms))
    imps, n = j.impressions, j.impressions.num_rows
    if n:
        keys_df = pd.DataFrame({k: _column(imps, k, pa.string()).to_pandas() for k in ARM_COLUMNS})
        codes = keys_df.groupby(list(ARM_COLUMNS), dropna=False, sort=False).ngroup().to_numpy().astype(np.int64)
    else:
        codes = np.zeros(0, np.int64)
    n_arms = int(codes.max()) + 1 if n else 0
    _, first = np.unique(codes, return_index=True)
    keys = [ArmKey(*(row[k] for k in ARM_COLUMNS)) for row in imps.select(list(ARM_COLUMNS)).take(
        pa.array(first, pa.int64())).to_pylist()] if n else []
    never = np.iinfo(np.int64).max  # best clicked position of an impression without a click
    best = np.full(n, never)
    np.minimum.at(best, j.click_rows, j.click_positions)

    def per_arm(mask_or_rows: np.ndarray) -> np.ndarray:
        return np.bincount(codes[mask_or_rows], minlength=n_arms)

    impressions_n, shown = per_arm(np.arange(n)), per_arm(j.lengths > 0)
    clicked, clicks_n = per_arm(best < never), per_arm(j.click_rows)
    at_k = [per_arm(best <= k) for k in CTR_KS]
    arms = {keys[a]: ArmCounts(int(impressions_n[a]), int(clicked[a]), int(clicks_n[a]), int(shown[a]),
                               tuple(int(x[a]) for x in at_k)) for a in range(n_arms)}
    by_pos = _by_position(codes, keys, j)
    exposures = pc.value_counts(j.flat_items) if len(j.flat_items) else None
    items = pd.DataFrame({"item_id": exposures.field("values").to_pandas() if exposures is not None else [],
                          "exposures": exposures.field("counts").to_numpy() if exposures is not None else []})
    clicked_items = pd.Series(j.click_items.to_pandas()).value_counts()
    items["clicks"] = items["item_id"].map(clicked_items).fillna(0).astype(np.int64)
    items_t = pa.Table.from_pandas(items.sort_values("item_id"), schema=ITEMS_SCHEMA, preserve_index=False)
    return Attribution(arms=arms, by_position=by_pos, items=items_t, window_ms=int(window_ms), **j.counts)


def _by_position(codes: np.ndarray, keys: list[ArmKey], j: Joined) -> pa.Table:
    if not len(codes):
        return POSITIONS_SCHEMA.empty_table()
    width = int(j.lengths.max()) + 1
    hist = np.bincount(codes * width + j.lengths, minlength=len(keys) * width).reshape(len(keys), width)
    shown_at = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # shown_at[a, p]: impressions with >= p items
    clicks_at = np.bincount(codes[j.click_rows] * width + j.click_positions,
                            minlength=len(keys) * width).reshape(len(keys), width)
    arm_i, pos = np.nonzero(shown_at[:, 1:])
    pos = pos + 1
    imps, clk = shown_at[arm_i, pos], clicks_at[arm_i, pos]
    cols: dict[str, Any] = {k: [keys[a][i] for a in arm_i] for i, k in enumerate(ARM_COLUMNS)}
    cols.update(position=pos.astype(np.int32), impressions=imps, clicks=clk, ctr=clk / imps)
    return pa.table(cols, schema=POSITIONS_SCHEMA)


# --- reading the log ---------------------------------------------------------------------------


def _read_log(log: OfflineLog, files: list[LogFile], schema: pa.Schema, columns: tuple[str, ...],
              check_schema: pa.Schema, filter_: Any = None) -> pa.Table:
    """`columns` of `files` (a column a file lacks reads as nulls); a bad file is named (`CorruptLogFile`)."""
    wanted = pa.schema([schema.field(c) for c in columns])
    if not files:
        return wanted.empty_table()
    try:
        dataset = pads.dataset([f.path for f in files], schema=schema, format="parquet", filesystem=log.fs)
        return dataset.to_table(columns=list(columns), filter=filter_).cast(wanted)
    except (pa.ArrowException, OSError) as exc:
        for f in files:  # name the culprit (footer, then pages)
            check_log_file(log, f, check_schema, read_pages=True)
        raise CorruptLogFile(log.root, files[0], f"{type(exc).__name__}: {exc}") from exc


def read_impressions(settings: Settings, columns: tuple[str, ...] = IMPRESSION_COLUMNS) -> pa.Table:
    """The impression log (`log/<impressions_topic>/`), `columns` only."""
    log = OfflineLog(settings.log_dir)
    return _read_log(log, log.list_files(settings.impressions_topic), IMPRESSION_LOG_SCHEMA, columns,
                     IMPRESSION_LOG_SCHEMA)


def read_clicks(settings: Settings) -> pa.Table:
    """The event log's clicks that carry a request id (`CLICK_TYPES`), `CLICK_COLUMNS` only; files
    written before the attribution columns existed read as nulls there (so they hold no such click)."""
    log = OfflineLog(settings.log_dir)
    filter_ = pads.field("request_id").is_valid() & pads.field("type").isin(list(CLICK_TYPES))
    return _read_log(log, log.list_files(settings.events_topic), EVENT_LOG_SCHEMA, CLICK_COLUMNS,
                     EVENT_SCHEMA_WITHOUT_ATTRIBUTION, filter_)


def window_ms_of(settings: Settings) -> int:
    return round(float(settings.attribution_window_s) * MS_PER_S)


def read_attribution(settings: Settings, *, scene: str | None = None, experiment: str | None = None,
                     since_ms: int | None = None) -> Attribution:
    """`attribute` over the offline log, with the window `STREAMREC_ATTRIBUTION_WINDOW_S`.

    Filters keep the impressions of `scene`, of `experiment`, and at or after `since_ms` (epoch ms); a
    click follows its impression (kept or left out with it, whatever its own time). Orphan clicks have no
    impression to tell their scene or experiment: all of them since `since_ms` are counted."""
    imps, clicks = read_impressions(settings), read_clicks(settings)
    if scene is not None or experiment is not None or since_ms is not None:
        mask = np.ones(imps.num_rows, dtype=bool)
        for name, value, op in (("scene", scene, pc.equal), ("experiment", experiment, pc.equal),
                                ("ts", since_ms, pc.greater_equal)):
            if value is not None:
                mask &= pc.fill_null(op(imps[name], value), False).to_numpy(zero_copy_only=False)
        kept = imps.filter(pa.array(mask))
        rid = clicks["request_id"]
        keep = pc.is_in(rid, kept["request_id"].combine_chunks()).to_numpy(zero_copy_only=False)
        orphan = ~pc.is_in(rid, imps["request_id"].combine_chunks()).to_numpy(zero_copy_only=False)
        if since_ms is not None:
            orphan &= pc.fill_null(pc.greater_equal(clicks["ts"], since_ms), False).to_numpy(zero_copy_only=False)
        clicks, imps = clicks.filter(pa.array(keep | orphan)), kept
    return attribute(imps, clicks, window_ms_of(settings))


# --- publishing with the feature version -------------------------------------------------------


def publish_attribution(settings: Settings, root: Path, vdir: str) -> tuple[dict[str, list[dict]], dict]:
    """Recompute attribution from the whole log and write its tables into the version directory `vdir`
    under `root`; returns the manifest `tables` entries and the manifest's `attribution` entry."""
    att = read_attribution(settings)
    entries = {}
    for name, table in ((ATTRIBUTION_ARMS, att.arms_table()), (ATTRIBUTION_POSITIONS, att.by_position),
                        (ATTRIBUTION_ITEMS, att.items)):
        rel = f"{vdir}/{name}.parquet"
        write_parquet(table, str(root / rel))
        entries[name] = [{"bucket": None, "path": rel, "rows": table.num_rows}]
    logger.info("attribution: %d impressions, clicks by outcome %s", att.impressions, att.outcomes())
    return entries, {"window_s": float(settings.attribution_window_s), "counts": att.counters()}


def attribution_is_stale(manifest: dict | None, settings: Settings) -> bool:
    """True when `manifest` holds no attribution, or one computed with another window (the job reruns it)."""
    entry = (manifest or {}).get("attribution")
    return entry is None or entry.get("window_s") != float(settings.attribution_window_s)


def load_attribution(settings: Settings, manifest: dict | None = None) -> Attribution | None:
    """The attribution the feature job published with `manifest` (default: the live one); None when none was."""
    manifest = manifest if manifest is not None else read_manifest(settings)
    entry = (manifest or {}).get("attribution")
    if entry is None:
        return None
    root = Path(settings.features_dir).absolute()
    tables = {}
    for name, schema in ((ATTRIBUTION_ARMS, ARMS_SCHEMA), (ATTRIBUTION_POSITIONS, POSITIONS_SCHEMA),
                         (ATTRIBUTION_ITEMS, ITEMS_SCHEMA)):
        parts = [read_parquet(str(root / e["path"]), schema) for e in manifest["tables"].get(name, [])]
        tables[name] = pa.concat_tables(parts) if parts else schema.empty_table()
    arms = {ArmKey(*(row[k] for k in ARM_COLUMNS)): ArmCounts(
        row["impressions"], row["clicked"], row["clicks"], row["shown"], tuple(row[f"clicked_at_{k}"] for k in CTR_KS))
        for row in tables[ATTRIBUTION_ARMS].to_pylist()}
    counts = {k: int(v) for k, v in entry.get("counts", {}).items()}
    return Attribution(arms=arms, by_position=tables[ATTRIBUTION_POSITIONS], items=tables[ATTRIBUTION_ITEMS],
                       window_ms=round(float(entry["window_s"]) * MS_PER_S), **counts)


def add_attribution_metrics(registry: Any, entry: dict | None) -> None:
    """The live version's attribution counters (manifest `attribution` entry) as gauges in `registry`
    (gauges named `_total` like `streamrec_train_runs_total`: each file/push replaces the last). Nothing
    when no attribution was published."""
    from prometheus_client import Gauge

    if not entry:
        return
    counts = entry.get("counts", {})
    clicks = Gauge(CLICKS_METRIC, "deduplicated clicks with a request_id in the log, by attribution outcome "
                   "(attributed, late, early, orphan, unshown)", ["outcome"], registry=registry)
    for outcome in OUTCOMES:
        clicks.labels(outcome).set(counts.get(f"{outcome}_clicks", 0))
    Gauge(IMPRESSIONS_METRIC, "deduplicated impressions in the log", registry=registry).set(
        counts.get("impressions", 0))
    Gauge(MISMATCHES_METRIC, "clicks whose position did not hold the clicked item", registry=registry).set(
        counts.get("mismatched_clicks", 0))
