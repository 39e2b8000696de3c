"""The feature tables: their schemas, where they live, and how to read the live version.

This is the feature store's read side, what training and tools import. A version is readable
only through its manifest (`manifest.json` under `Settings.features_dir`), which lists every
file of every table; nothing is found by listing directories.

Tables
------
* ``sequences`` -- one row per user: ``user_id``, ``item_ids``, ``ts``, ``types``,
  ``event_ids``, ``scenes`` (values nullable), ``partitions``, ``offsets`` (lists, one
  element per event) and ``n``. Events are ordered by (ts, partition, offset) and deduplicated
  by event_id within the user, keeping the first in that order. ``partitions``/``offsets``
  are the events' log positions: they make the merge of late events exact. Split into
  ``user_buckets`` files by ``zlib.crc32(user_id) % user_buckets`` (`bucket_of`), rows sorted
  by user_id.
* ``items`` -- the catalog: the latest record per item_id by (ts, partition, offset), with
  ``ITEM_LOG_SCHEMA`` columns; deleted items stay, flagged ``deleted=True`` (never null).
* ``popularity`` -- ``item_id``, ``count`` (deduplicated interactions, all time) and
  ``trending`` = sum over those events of 2^(-(ref_ts - ts) / half_life), where ``ref_ts``
  (manifest ``ref_ts``, epoch ms) is the largest event ts read so far (it never decreases).
  Deleted items keep their counts here; readers filter them with the ``items`` table.
* ``covisit_counts`` -- ``item_a``, ``item_b``, ``count``: how often the two items sit at most
  ``covisit_window`` positions apart in a user's deduplicated sequence, summed over users;
  symmetric (both directions stored), an item never pairs with itself.
* ``covisit_topk`` -- ``item_id``, ``neighbors``, ``scores``: the ``covisit_topk`` strongest
  neighbours by count desc, then item id asc. Both co-visitation tables are split into
  ``covisit_buckets`` files (`STREAMREC_COVISIT_BUCKETS`, default ``COVISIT_BUCKETS``) by
  ``crc32(item_a) % covisit_buckets``, rows sorted by (item_a, item_b) / item_id, so a run rewrites only
  the buckets it touches. A changed bucket count is a changed parameter: the next run rebuilds every
  table in the new layout (`streaming.features.job`), never mixing two layouts in one version.

Layout::

    features_dir/manifest.json                     the only entry point (atomically replaced)
    features_dir/.lock                             fcntl lock of a run
    features_dir/v000007/manifest.json             copy of the manifest that published v7
    features_dir/v000007/sequences/bucket-00003.parquet
    features_dir/v000007/covisit_counts/bucket-00011.parquet
    features_dir/v000007/covisit_topk/bucket-00011.parquet
    features_dir/v000007/items.parquet, popularity.parquet

The manifest holds ``format``, ``version``, ``created_at``, ``params`` (bucket counts, window,
top-K, half-life, topics: a change forces a full rebuild), ``watermarks`` ({topic: {partition:
last offset processed}}), ``ref_ts``, ``tables`` ({name: [{"bucket", "path", "rows", ...}]},
paths relative to features_dir; a bucket with no rows has no entry), ``counts`` (totals),
``history`` (the last published versions) and ``last_run``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streaming.events import ITEM_LOG_SCHEMA
from streaming.settings import Settings
from streaming.versioned_store import read_json

MANIFEST_NAME = "manifest.json"
# Item-hash files of the co-visitation tables when the settings carry no `covisit_buckets`
# (STREAMREC_COVISIT_BUCKETS); a change of the count rebuilds every table.
COVISIT_BUCKETS = 16

SEQUENCES = "sequences"
ITEMS = "items"
POPULARITY = "popularity"
COVISIT_COUNTS = "covisit_counts"
COVISIT_TOPK = "covisit_topk"
TABLE_NAMES = (SEQUENCES, ITEMS, POPULARITY, COVISIT_COUNTS, COVISIT_TOPK)

SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_ids", pa.list_(pa.string())),
        ("ts", pa.list_(pa.int64())),
        ("types", pa.list_(pa.string())),
        ("event_ids", pa.list_(pa.string())),
        ("scenes", pa.list_(pa.string())),
        ("partitions", pa.list_(pa.int32())),
        ("offsets", pa.list_(pa.int64())),
        ("n", pa.int64()),
    ]
)
POPULARITY_SCHEMA = pa.schema([("item_id", pa.string()), ("count", pa.int64()), ("trending", pa.float64())])
COVISIT_COUNTS_SCHEMA = pa.schema([("item_a", pa.string()), ("item_b", pa.string()), ("count", pa.int64())])
COVISIT_TOPK_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("neighbors", pa.list_(pa.string())), ("scores", pa.list_(pa.int64()))]
)
TABLE_SCHEMAS = {
    SEQUENCES: SEQUENCE_SCHEMA,
    ITEMS: ITEM_LOG_SCHEMA,
    POPULARITY: POPULARITY_SCHEMA,
    COVISIT_COUNTS: COVISIT_COUNTS_SCHEMA,
    COVISIT_TOPK: COVISIT_TOPK_SCHEMA,
}


@dataclass(frozen=True)
class FeatureTables:
    """The tables of one published version (see the module docstring for their columns)."""

    manifest: dict
    sequences: pa.Table
    items: pa.Table
    popularity: pa.Table
    covisit_counts: pa.Table
    covisit_topk: pa.Table

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def ref_ts(self) -> int | None:
        return self.manifest.get("ref_ts")


def bucket_of(key: str, buckets: int) -> int:
    """Stable bucket of a user or item id (crc32, the same on every host and Python run)."""
    return zlib.crc32(key.encode("utf-8")) % buckets


def read_manifest(settings: Settings) -> dict | None:
    """The live manifest, or None when no version was ever published."""
    return read_json(Path(settings.features_dir) / MANIFEST_NAME)


def table_paths(settings: Settings, manifest: dict, name: str) -> list[str]:
    """Absolute paths of the files of table `name` in `manifest` (e.g. for `ray.data.read_parquet`)."""
    root = Path(settings.features_dir).absolute()
    return [str(root / e["path"]) for e in manifest["tables"].get(name, [])]


def read_parquet(path: str, schema: pa.Schema) -> pa.Table:
    """One table file, read as `schema`."""
    return pq.read_table(path, schema=schema)


def load_tables(settings: Settings, manifest: dict, names: tuple[str, ...] = TABLE_NAMES) -> FeatureTables:
    """The tables `names` of the version `manifest` published (the others empty)."""
    loaded = {}
    for name in TABLE_NAMES:
        schema = TABLE_SCHEMAS[name]
        paths = table_paths(settings, manifest, name) if name in names else []
        parts = [read_parquet(p, schema) for p in paths]
        loaded[name] = pa.concat_tables(parts) if parts else schema.empty_table()
    return FeatureTables(manifest=manifest, **loaded)


def load_feature_tables(settings: Settings) -> FeatureTables | None:
    """The tables of the live version (through the manifest), or None when none was published."""
    for attempt in range(2):
        manifest = read_manifest(settings)
        if manifest is None:
            return None
        try:
            return load_tables(settings, manifest)
        except FileNotFoundError:
            # A run published twice more and collected our version while we read: read the new one.
            if attempt:
                raise
    return None
