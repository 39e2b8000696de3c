"""What training and evaluation read: the item catalog and per-user interaction sequences.

A `Corpus` is built either from the live feature tables (`from_feature_tables`, what
`streamrec train` uses: the `sequences` and `items` tables through the features manifest) or
straight from a dataset (`from_dataset`, what the benchmarks use: no broker needed). Both give
the same thing: items indexed 0..n-1 (`Catalog`), and per user the chronological item indices,
timestamps and, when the data came through Kafka, each event's (partition, offset) -- the data
window an adapter was trained on is expressed in those offsets.

Order: events of a user are ordered by timestamp; equal timestamps keep the order of the
source (file row order for a dataset, log order -- partition, offset -- for feature tables,
which is the produce order because a user's events share one partition).

Splits (`leave_one_out`, `cold_start_split`) follow the evaluation protocol of
`training/evaluation.py`: per user the last interaction is the test target, the second last
the validation target, the rest is training data. The cold-start split additionally holds out
a random share of items with all their interactions from the training part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MIN_EVAL_LEN = 3  # a user needs a training item, a validation and a test target
GAP_BUCKETS = 16  # log2-second buckets of the time between consecutive interactions (0 = pad)


class CorpusError(ValueError):
    """The data cannot be used for training (empty, no users long enough, ...)."""


class NotEnoughData(CorpusError):
    """Too little data to train on yet: for a scheduled run a normal outcome, not a failure."""


def item_text(title: str | None, text: str | None, attributes: str | dict | None, item_id: str) -> str:
    """The text the item tower reads: `text` when the producer gave one, else title + attributes."""
    if text:
        return text
    parts = [title or item_id]
    if attributes:
        attrs = attributes
        if isinstance(attrs, str):
            try:
                attrs = json.loads(attrs)
            except ValueError:
                attrs = None
        if isinstance(attrs, dict):
            for key, value in attrs.items():
                if isinstance(value, (list, tuple)):
                    value = ", ".join(str(v) for v in value)
                parts.append(f"{key}: {value}")
    return ". ".join(parts)


@dataclass
class Catalog:
    """Items, indexed 0..n-1. `live` is False for deleted items (never recommended)."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    live: np.ndarray  # bool (n,)
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: i for i, item in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_table(cls, items: pa.Table) -> "Catalog":
        cols = items.to_pydict()
        n = items.num_rows
        deleted = cols.get("deleted") or [False] * n
        ids = [str(x) for x in cols["item_id"]]
        titles = [t or i for t, i in zip(cols.get("title") or [None] * n, ids)]
        texts = [
            item_text(t, x, a, i)
            for t, x, a, i in zip(cols.get("title") or [None] * n, cols.get("text") or [None] * n,
                                  cols.get("attributes") or [None] * n, ids)
        ]
        return cls(ids, titles, texts, ~np.asarray([bool(d) for d in deleted], dtype=bool))

    def extended(self, unknown_ids: Sequence[str]) -> "Catalog":
        """A copy with items seen in events but missing from the catalog (their id is their text)."""
        if not unknown_ids:
            return self
        ids = list(unknown_ids)
        return Catalog(self.item_ids + ids, self.titles + ids, self.texts + ids,
                       np.concatenate([self.live, np.ones(len(ids), dtype=bool)]))


@dataclass
class Corpus:
    """Per-user chronological interactions over a `Catalog`."""

    catalog: Catalog
    user_ids: list[str]
    items: list[np.ndarray]  # int32 item indices per user, chronological
    ts: list[np.ndarray]  # int64 epoch ms
    partitions: list[np.ndarray] | None = None  # int32 per event (feature tables only)
    offsets: list[np.ndarray] | None = None  # int64 per event (feature tables only)
    scenes: list[np.ndarray] | None = None  # object (str | None) per event
    watermarks: dict[str, dict[str, int]] = field(default_factory=dict)  # features manifest watermarks
    forgotten: tuple[str, ...] = ()  # forget tombstone ids the feature tables honour (streaming.forget)
    source: str = ""
    # Per user, int32 item indices shown to them and never clicked, most recent first (training/hard_negatives.py);
    # None: not read (TrainConfig.hard_negatives off).
    hard_negatives: list[np.ndarray] | None = None

    @property
    def n_events(self) -> int:
        return int(sum(len(s) for s in self.items))

    def max_ts(self) -> int | None:
        return max((int(t[-1]) for t in self.ts if len(t)), default=None)

    # --- builders -------------------------------------------------------------------------------
    @classmethod
    def from_feature_tables(cls, tables: Any, *, source: str = "features") -> "Corpus":
        """From `streaming.features.load_feature_tables(settings)` (sequences + items tables)."""
        catalog = Catalog.from_table(tables.items)
        seq = tables.sequences
        if seq.num_rows == 0:
            raise NotEnoughData("the feature tables hold no sequences yet: ingest events, then run `streamrec features`")
        users = seq.column("user_id").to_pylist()
        item_lists = seq.column("item_ids").to_pylist()
        known = catalog.index
        unknown = sorted({i for lst in item_lists for i in lst if i not in known})
        catalog = catalog.extended(unknown)
        index = catalog.index
        items = [np.fromiter((index[i] for i in lst), dtype=np.int32, count=len(lst)) for lst in item_lists]
        ts = [np.asarray(t, dtype=np.int64) for t in seq.column("ts").to_pylist()]
        parts = [np.asarray(p, dtype=np.int32) for p in seq.column("partitions").to_pylist()]
        offs = [np.asarray(o, dtype=np.int64) for o in seq.column("offsets").to_pylist()]
        scenes = [np.asarray(s, dtype=object) for s in seq.column("scenes").to_pylist()]
        manifest = getattr(tables, "manifest", {}) or {}
        return cls(catalog, [str(u) for u in users], items, ts, parts, offs, scenes,
                   watermarks=manifest.get("watermarks", {}), source=source,
                   forgotten=tuple(manifest.get("forgotten", ())))

    @classmethod
    def from_dataset(cls, dataset: Any, *, source: str = "dataset") -> "Corpus":
        """From a `streaming.datasets.Dataset` (events in event-time order, stable on ties)."""
        catalog = Catalog.from_table(dataset.items)
        events = dataset.events_table().select(["user_id", "item_id", "ts", "scene"])
        return cls.from_events(catalog, events, source=source)

    @classmethod
    def from_events(cls, catalog: Catalog, events: pa.Table, *, source: str = "events") -> "Corpus":
        """From an events table (user_id, item_id, ts[, scene]) in source order."""
        if events.num_rows == 0:
            raise CorpusError("no events")
        item_col = events.column("item_id").combine_chunks()
        unknown = pc.unique(pc.filter(item_col, pc.invert(pc.is_in(item_col, pa.array(catalog.item_ids))))).to_pylist()
        catalog = catalog.extended(sorted(unknown))
        item_idx = pc.index_in(item_col, pa.array(catalog.item_ids)).to_numpy(zero_copy_only=False).astype(np.int32)
        user_col = events.column("user_id").combine_chunks()
        dict_users = user_col.dictionary_encode()
        user_codes = dict_users.indices.to_numpy(zero_copy_only=False)
        user_names = dict_users.dictionary.to_pylist()
        ts = events.column("ts").to_numpy().astype(np.int64)
        # Stable sort by (user, ts): ties keep the source order.
        order = np.lexsort((np.arange(len(ts)), ts, user_codes))
        codes_sorted = user_codes[order]
        bounds = np.flatnonzero(np.diff(codes_sorted)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(order)]])
        scene_np = None
        if "scene" in events.column_names:
            scene_np = np.asarray(events.column("scene").to_pylist(), dtype=object)
        users, items, tss, scenes = [], [], [], []
        for s, e in zip(starts, ends):
            idx = order[s:e]
            users.append(str(user_names[codes_sorted[s]]))
            items.append(item_idx[idx])
            tss.append(ts[idx])
            if scene_np is not None:
                scenes.append(scene_np[idx])
        return cls(catalog, users, items, tss, scenes=scenes if scene_np is not None else None, source=source)


# --- splits ----------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Evaluation cases: for each, the user's history (chronological) and the one target item."""

    users: np.ndarray  # int32 user index into Corpus.user_ids
    histories: list[np.ndarray]  # int32 item indices
    history_ts: list[np.ndarray]  # int64
    targets: np.ndarray  # int32
    target_ts: np.ndarray  # int64: "now" for the user tower

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, mask: np.ndarray) -> "EvalSet":
        keep = np.flatnonzero(mask)
        return EvalSet(self.users[keep], [self.histories[i] for i in keep], [self.history_ts[i] for i in keep],
                       self.targets[keep], self.target_ts[keep])


@dataclass
class Split:
    """Training sequences plus validation and test cases over one corpus."""

    corpus: Corpus
    train_items: list[np.ndarray]
    train_ts: list[np.ndarray]
    valid: EvalSet
    test: EvalSet
    cold_items: np.ndarray | None = None  # bool (n_items,): held out of training (cold-start protocol)
    name: str = "leave-one-out"

    @property
    def n_items(self) -> int:
        return len(self.corpus.catalog)

    def train_counts(self) -> np.ndarray:
        """Interactions per item in the training part."""
        counts = np.zeros(self.n_items, dtype=np.int64)
        for s in self.train_items:
            np.add.at(counts, s, 1)
        return counts


def _eval_set(users: list[int], hist: list[np.ndarray], hist_ts: list[np.ndarray], targets: list[int],
              target_ts: list[int]) -> EvalSet:
    return EvalSet(np.asarray(users, dtype=np.int32), hist, hist_ts, np.asarray(targets, dtype=np.int32),
                   np.asarray(target_ts, dtype=np.int64))


def leave_one_out(corpus: Corpus) -> Split:
    """Last interaction = test, second last = validation, the rest = training (per user).

    Users with fewer than `MIN_EVAL_LEN` interactions only contribute training data.
    """
    train_items, train_ts = [], []
    v = ([], [], [], [], [])
    t = ([], [], [], [], [])
    for u, (items, ts) in enumerate(zip(corpus.items, corpus.ts)):
        if len(items) < MIN_EVAL_LEN:
            train_items.append(items)
            train_ts.append(ts)
            continue
        train_items.append(items[:-2])
        train_ts.append(ts[:-2])
        for box, cut in ((v, -2), (t, -1)):
            box[0].append(u)
            box[1].append(items[:cut])
            box[2].append(ts[:cut])
            box[3].append(int(items[cut]))
            box[4].append(int(ts[cut]))
    if not t[0]:
        raise NotEnoughData(f"no user has {MIN_EVAL_LEN} or more interactions: nothing to evaluate")
    return Split(corpus, train_items, train_ts, _eval_set(*v), _eval_set(*t))


def cold_start_split(corpus: Corpus, *, cold_share: float = 0.2, seed: int = 0) -> Split:
    """Leave-one-out where `cold_share` of the interacted items (drawn at random) and all their
    interactions are removed from training; the test set keeps only users whose test item is cold.

    Histories given to the models at validation/test time are unchanged (a cold item a user
    clicked is still known to have been clicked; only models that read text can use it).
    """
    if not 0.0 < cold_share < 1.0:
        raise CorpusError(f"cold_share={cold_share!r}: must be between 0 and 1")
    base = leave_one_out(corpus)
    interacted = np.unique(np.concatenate([s for s in corpus.items if len(s)]))
    rng = np.random.default_rng(seed)
    n_cold = max(1, int(round(cold_share * len(interacted))))
    cold = np.zeros(len(corpus.catalog), dtype=bool)
    cold[rng.choice(interacted, size=n_cold, replace=False)] = True
    keep = [~cold[s] for s in base.train_items]
    train_items = [s[k] for s, k in zip(base.train_items, keep)]
    train_ts = [s[k] for s, k in zip(base.train_ts, keep)]
    valid = base.valid.subset(~cold[base.valid.targets])
    test = base.test.subset(cold[base.test.targets])
    if len(test) == 0:
        raise CorpusError("no test target is a cold item: the corpus is too small for the cold-start protocol")
    return Split(corpus, train_items, train_ts, valid, test, cold_items=cold, name=f"cold-start-{cold_share:g}")


def gap_bucket(gap_ms: np.ndarray) -> np.ndarray:
    """Time between consecutive interactions -> 1..GAP_BUCKETS-1 (log2 seconds; 0 is padding)."""
    seconds = np.maximum(np.asarray(gap_ms, dtype=np.float64), 0.0) / 1000.0
    return np.minimum(1 + np.floor(np.log2(1.0 + seconds)).astype(np.int64), GAP_BUCKETS - 1)


def history_features(histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray], now_ts: np.ndarray,
                     max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (B, max_len) item inputs (index + 1; 0 = pad) and gap buckets for the user tower.

    The gap of position j is ts[j] - ts[j-1]; the first kept item's gap is measured from the item
    before it when there is one. `now_ts` is accepted for the caller's symmetry with serving; the
    head sees recency through the gaps (the last gap is last item -> now).
    """
    b = len(histories)
    inputs = np.zeros((b, max_len), dtype=np.int64)
    gaps = np.zeros((b, max_len), dtype=np.int64)
    for r, (h, t) in enumerate(zip(histories, history_ts)):
        if len(h) == 0:
            continue
        h = h[-max_len:]
        full_t = np.asarray(t, dtype=np.int64)
        tt = full_t[-max_len:]
        prev = np.concatenate([[full_t[-len(tt) - 1] if len(full_t) > len(tt) else tt[0]], tt[:-1]])
        n = len(h)
        inputs[r, -n:] = h.astype(np.int64) + 1
        gaps[r, -n:] = gap_bucket(tt - prev)
    return inputs, gaps


def training_windows(train_items: Sequence[np.ndarray], train_ts: Sequence[np.ndarray], max_len: int,
                     target_masks: Sequence[np.ndarray] | None = None, horizon: int = 1,
                     hard_negatives: Sequence[np.ndarray] | None = None,
                     hard_negative_max: int = 0) -> dict[str, np.ndarray]:
    """Next-item training examples: each sequence cut into windows of `max_len` inputs.

    Returns arrays (N, max_len): `inputs` (item index + 1, 0 = pad, left-padded), `gaps`
    (gap buckets), `targets` (next item index + 1, 0 = no target) -- causal: position j's
    target is the item after input j. With `horizon` h > 1, `targets` is (N, max_len, h): the
    next h items after input j (0 where the sequence ends) -- see `Recommender.next_item_loss`.
    `target_masks[u][k]` False drops item k of user u as a target (it still serves as input),
    used by incremental training and scenes.
    `hard_negatives[u]` (item indices; `Corpus.hard_negatives`) adds `hard_negatives` (N,
    hard_negative_max): each window's user's first ones, index + 1, 0 = pad -- only when some user has one,
    so that without them the windows are exactly what they were.
    """
    hard_rows = None
    if hard_negatives is not None and hard_negative_max > 0 and any(len(h) for h in hard_negatives):
        hard_rows = np.zeros((len(hard_negatives), hard_negative_max), dtype=np.int64)
        for u, h in enumerate(hard_negatives):
            h = h[:hard_negative_max]
            hard_rows[u, :len(h)] = h.astype(np.int64) + 1
    rows_in, rows_gap, rows_tg, rows_user = [], [], [], []
    for u, (items, ts) in enumerate(zip(train_items, train_ts)):
        n = len(items)
        if n < 2:
            continue
        gaps_all = gap_bucket(np.diff(np.asarray(ts, dtype=np.int64), prepend=ts[0]))
        tgt_all = items.astype(np.int64) + 1
        if target_masks is not None:
            tgt_all = np.where(target_masks[u], tgt_all, 0)
        # windows end at n-1 (last input), n-1-max_len, ...: the newest window is always full.
        padded_tg = np.concatenate([tgt_all, np.zeros(horizon, dtype=np.int64)])
        end = n - 1
        while end > 0:
            start = max(0, end - max_len)
            inp = items[start:end].astype(np.int64) + 1
            k = len(inp)
            tg = np.stack([padded_tg[start + 1 + h:end + 1 + h] for h in range(horizon)], axis=1)
            if tg[:, 0].any():
                row_i = np.zeros(max_len, dtype=np.int64)
                row_g = np.zeros(max_len, dtype=np.int64)
                row_t = np.zeros((max_len, horizon), dtype=np.int64)
                row_i[-k:], row_g[-k:], row_t[-k:] = inp, gaps_all[start:end], tg
                rows_in.append(row_i)
                rows_gap.append(row_g)
                rows_tg.append(row_t if horizon > 1 else row_t[:, 0])
                rows_user.append(u)
            end = start
    if not rows_in:
        raise NotEnoughData("no training examples: every user has fewer than 2 training interactions")
    windows = {"inputs": np.stack(rows_in), "gaps": np.stack(rows_gap), "targets": np.stack(rows_tg)}
    if hard_rows is not None:
        windows["hard_negatives"] = hard_rows[np.asarray(rows_user, dtype=np.int64)]
    return windows


def popularity_log_q(counts: np.ndarray) -> np.ndarray:
    """log of the sampling probability of each item as an in-batch negative (logQ correction)."""
    p = (counts.astype(np.float64) + 1.0) / (counts.sum() + len(counts))
    return np.log(p).astype(np.float32)


def describe(corpus: Corpus) -> str:
    lens = [len(s) for s in corpus.items]
    return (f"{len(corpus.user_ids):,} users, {len(corpus.catalog):,} items, {sum(lens):,} events "
            f"(median {int(np.median(lens)) if lens else 0} per user) from {corpus.source or 'unknown'}")


__all__ = [
    "Catalog", "Corpus", "CorpusError", "EvalSet", "Split", "GAP_BUCKETS", "MIN_EVAL_LEN", "cold_start_split",
    "describe", "gap_bucket", "history_features", "item_text", "leave_one_out", "NotEnoughData", "popularity_log_q",
    "training_windows",
]
