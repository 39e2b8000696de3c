"""Incremental feature tables from the offline event log (Ray Data).

A run folds only the log files that are new since the last run into the tables (user
sequences, the catalog, popularity/trending, co-visitation), yet the result equals a rebuild
from the whole log: the merge works on exact per-user differences. Each run publishes an
immutable version directory behind an atomically replaced manifest, so readers (training,
serving's fallback) never see half a version, and a crashed run changes nothing.

Modules, in the order a reader needs them:

* `tables` -- the tables' schemas, the layout (a user bucket: base + append segments; a co-visitation
  bucket: integer pair keys, base + delta segments; both merged on read) and the readers
  (`load_feature_tables`, `read_manifest`, `iter_sequence_parts` for the sequences one bucket at a
  time, `read_covisit_counts` for a co-visitation bucket, `table_paths` for the other tables): what
  training imports;
* `job` -- one run (`run_features`): what is new, the Ray Data pipeline, the manifest it publishes;
* `merge` -- the first Ray Data stage (user-bucket merge: sequences, popularity and pair deltas);
* `covisit_merge` -- the second (co-visitation buckets: delta segments, compaction, top-K);
* `store` -- version directories, the manifest swap, garbage collection, the run locks;
* `redis_push` -- popular/trending items pushed to Redis for serving's fallback;
* `run_metrics` -- the outcome metrics every run writes (`<data_dir>/metrics/features.prom`);
* `attribution` -- clicks joined to the impressions they came from (`attribute`, `read_attribution`),
  recomputed and published with every version.
"""

from streaming.features.job import FeatureRunResult, run_features
from streaming.features.redis_push import push_popularity_to_redis
from streaming.features.store import KEEP_VERSIONS, FeaturesBusyError
from streaming.features.tables import (
    COVISIT_BUCKETS,
    COVISIT_COUNTS,
    COVISIT_COUNTS_SCHEMA,
    COVISIT_TOPK,
    COVISIT_TOPK_SCHEMA,
    ITEMS,
    MANIFEST_NAME,
    POPULARITY,
    POPULARITY_SCHEMA,
    SEQUENCE_SCHEMA,
    SEQUENCES,
    TABLE_NAMES,
    TABLE_SCHEMAS,
    FeatureTables,
    bucket_of,
    iter_sequence_parts,
    load_feature_tables,
    read_covisit_counts,
    read_manifest,
    table_paths,
)

__all__ = [
    "COVISIT_BUCKETS",
    "COVISIT_COUNTS",
    "COVISIT_COUNTS_SCHEMA",
    "COVISIT_TOPK",
    "COVISIT_TOPK_SCHEMA",
    "ITEMS",
    "KEEP_VERSIONS",
    "MANIFEST_NAME",
    "POPULARITY",
    "POPULARITY_SCHEMA",
    "SEQUENCES",
    "SEQUENCE_SCHEMA",
    "TABLE_NAMES",
    "TABLE_SCHEMAS",
    "FeatureRunResult",
    "FeatureTables",
    "FeaturesBusyError",
    "bucket_of",
    "load_feature_tables",
    "push_popularity_to_redis",
    "read_covisit_counts",
    "read_manifest",
    "run_features",
    "iter_sequence_parts",
    "table_paths",
]
