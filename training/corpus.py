"""What training and evaluation read: the item catalog and per-user interaction sequences.

A `Corpus` is built from the live feature tables -- `load_corpus` / `from_feature_parts`, what
`streamrec train` uses: the `sequences` table read part by part through the features manifest, a
deterministic sample of at most `max_users` users kept; or `from_feature_tables` over tables
already loaded whole -- or straight from a dataset (`from_dataset`, what the benchmarks use: no
broker needed). All give the same thing: items indexed 0..n-1 (`Catalog`), and per user the
chronological item indices, timestamps and, when the data came through Kafka, each event's
(partition, offset) -- the data window an adapter was trained on is expressed in those offsets.

Sampling (issue 18: training at 10^6 users): a run reads the sequences of at most `max_users`
users (`TrainConfig.max_users`, default `DEFAULT_MAX_USERS`; 0 = all). The sample is the users with
the `max_users` smallest `user_sample_keys` (a keyed 64-bit hash of the user id): the same users on
every run and every host, and as users are added a user leaves the sample only for a new one with a
smaller key (bottom-k sampling), so incremental runs and evaluation keep seeing mostly the same
users. Tables with fewer users are read whole, so MovieLens and demo sizes are unaffected. The
driver holds the sampled users' events plus one part (one user bucket) at a time, converted with
Arrow/numpy kernels (`_SequencePart`): no Python object per event.

Order: events of a user are ordered by timestamp; equal timestamps keep the order of the
source (file row order for a dataset, log order -- partition, offset -- for feature tables,
which is the produce order because a user's events share one partition).

Splits (`leave_one_out`, `cold_start_split`) follow the evaluation protocol of
`training/evaluation.py`: per user the last interaction is the test target, the second last
the validation target, the rest is training data. The cold-start split additionally holds out
a random share of items with all their interactions from the training part.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MIN_EVAL_LEN = 3  # a user needs a training item, a validation and a test target
# Users whose sequences a training run reads when the tables hold more (TrainConfig.max_users; 0 = all).
# MovieLens-1M (6,040 users) and the demo (hundreds to 10^4) stay whole; at 10^6 users a run reads a
# tenth: ~10^6 events at 10 per user, 417 MB peak to load them instead of 3.2 GB for every sequence
# (bench/train_scale.py, 10^7 events over 10^6 users).
DEFAULT_MAX_USERS = 100_000
# blake2b personalisation of the sample key: a hash independent of `bucket_of`'s crc32, so the
# sample is spread over every user bucket and uncorrelated with the bucket layout.
SAMPLE_KEY_PERSON = b"streamrec-sample"
# Columns of the sequences table a Corpus reads (not event_ids / types / n: the largest unused ones).
CORPUS_SEQUENCE_COLUMNS = ["user_id", "item_ids", "ts", "scenes", "partitions", "offsets"]
NO_SEQUENCES = "the feature tables hold no sequences yet: ingest events, then run `streamrec features`"
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
    # Users in the feature tables this corpus was read from (more than len(user_ids) when sampled); None:
    # not from feature tables.
    users_in_tables: int | None = None

    @property
    def n_events(self) -> int:
        return int(sum(len(s) for s in self.items))

    def max_ts(self) -> int | None:
        return max((int(t[-1]) for t in self.ts if len(t)), default=None)

    # --- builders -------------------------------------------------------------------------------
    @classmethod
    def from_feature_tables(cls, tables: Any, *, source: str = "features") -> "Corpus":
        """From `streaming.features.load_feature_tables(settings)` (sequences + items tables, loaded whole;
        `from_feature_parts` reads the sequences part by part and samples)."""
        seq = tables.sequences
        if seq.num_rows == 0:
            raise NotEnoughData(NO_SEQUENCES)
        catalog = Catalog.from_table(tables.items)
        part = _SequencePart.convert(seq, pa.array(catalog.item_ids, pa.string()))
        return _assemble(catalog, [part], getattr(tables, "manifest", {}) or {}, source=source,
                         users_in_tables=seq.num_rows)

    @classmethod
    def from_feature_parts(cls, settings: Any, manifest: dict, *, max_users: int = DEFAULT_MAX_USERS,
                           items: pa.Table | None = None, source: str = "features") -> "Corpus":
        """From the feature tables of `manifest`, reading the sequences one part at a time
        (`streaming.features.tables.iter_sequence_parts`) and keeping a deterministic sample of at most
        `max_users` users (0 = all; see the module docstring). `items`: the items table when the caller
        has it (else read here). With `max_users` at or above the users in the tables, equal to
        `from_feature_tables` over the same version (same users, order, catalog and arrays).

        Peak driver memory: the sampled users' events (as numpy arrays) plus one part's Arrow table, and
        8 bytes per user of the tables for the sample keys -- not every sequence of the tables."""
        from streaming.features.tables import ITEMS, iter_sequence_parts, load_tables

        if max_users < 0:
            raise CorpusError(f"max_users={max_users!r}: must be >= 0 (0 = every user)")
        if items is None:
            items = load_tables(settings, manifest, names=(ITEMS,)).items
        catalog = Catalog.from_table(items)
        threshold, n_users = None, None
        if max_users:
            # first pass, user ids only: the key of the max_users-th smallest is the sample's threshold
            keys = [user_sample_keys(t.column("user_id")) for t in iter_sequence_parts(settings, manifest, ["user_id"])]
            all_keys = np.concatenate(keys) if keys else np.empty(0, np.uint64)
            n_users = len(all_keys)
            if n_users > max_users:
                threshold = np.partition(all_keys, max_users - 1)[max_users - 1]
            del keys, all_keys
        catalog_ids = pa.array(catalog.item_ids, pa.string())
        parts, read = [], 0
        for seq in iter_sequence_parts(settings, manifest, CORPUS_SEQUENCE_COLUMNS):
            read += seq.num_rows
            if threshold is not None:
                # keys are 64-bit: a tie at the threshold (two users, one key) is ~never; both are kept then
                seq = seq.filter(pa.array(user_sample_keys(seq.column("user_id")) <= threshold))
            if seq.num_rows:
                parts.append(_SequencePart.convert(seq, catalog_ids))
            del seq  # the part's Arrow table: only its sampled users' arrays stay
        if not parts:
            raise NotEnoughData(NO_SEQUENCES)
        return _assemble(catalog, parts, manifest, source=source, users_in_tables=n_users or read)

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


# --- reading the feature tables --------------------------------------------------------------


def user_sample_keys(user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The sample key (uint64) of each user id: blake2b-64 personalised with `SAMPLE_KEY_PERSON`; the same on
    every host and Python run. A training run reads the users with the smallest keys (`from_feature_parts`).
    One hash call per user (not per event): ~1 s per 10^6 users."""
    digests = b"".join(hashlib.blake2b(u.encode("utf-8"), digest_size=8, person=SAMPLE_KEY_PERSON).digest()
                       for u in user_ids.to_pylist())
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def load_corpus(settings: Any, *, max_users: int = DEFAULT_MAX_USERS, source: str = "features") -> Corpus:
    """The live feature tables as a Corpus of at most `max_users` sampled users (`Corpus.from_feature_parts`):
    what `streamrec train` reads."""
    from streaming.features.tables import read_manifest

    for attempt in range(2):
        manifest = read_manifest(settings)
        if manifest is None:
            raise CorpusError("no feature tables yet: run `streamrec ingest` and `streamrec features` first")
        try:
            return Corpus.from_feature_parts(settings, manifest, max_users=max_users, source=source)
        except FileNotFoundError:
            # A feature run published twice more and collected our version while we read: read the new one.
            if attempt:
                raise
    raise AssertionError("unreachable")


@dataclass
class _SequencePart:
    """One part of the sequences table as flat numpy arrays (one element per event) and per-user lengths.
    Item ids missing from the catalog are -1 in `items`; `unknown_at` / `unknown_ids` say where and which,
    resolved once every part is read (`_assemble`: they extend the catalog in sorted order)."""

    users: list[str]
    lengths: np.ndarray  # int64 per user
    items: np.ndarray  # int32 per event: catalog index, -1 = not in the catalog
    ts: np.ndarray  # int64
    partitions: np.ndarray  # int32
    offsets: np.ndarray  # int64
    scenes: np.ndarray  # object (str | None), sharing one Python object per distinct scene
    unknown_at: np.ndarray  # int64 positions in `items` of the unknown item ids
    unknown_ids: pa.Array  # their ids

    @classmethod
    def convert(cls, seq: pa.Table, catalog_ids: pa.Array) -> "_SequencePart":
        """Vectorised: list columns flattened, item ids looked up with `pc.index_in` (no loop per event)."""
        def flat(name: str) -> pa.Array:
            col = seq.column(name).combine_chunks()
            return pc.list_flatten(col)

        lengths = pc.fill_null(pc.list_value_length(seq.column("item_ids").combine_chunks()), 0)
        lengths = lengths.to_numpy(zero_copy_only=False).astype(np.int64)
        item_col = flat("item_ids")
        idx = pc.index_in(item_col, value_set=catalog_ids)
        unknown = idx.is_null()
        unknown_at = np.flatnonzero(unknown.to_numpy(zero_copy_only=False)) if idx.null_count else np.empty(0, np.int64)
        items = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int32)
        scenes = flat("scenes").dictionary_encode()
        values = np.empty(len(scenes.dictionary) + 1, dtype=object)  # the last one: a null scene
        values[:-1] = scenes.dictionary.to_pylist()
        codes = pc.fill_null(scenes.indices, len(scenes.dictionary)).to_numpy(zero_copy_only=False)
        return cls(
            users=[str(u) for u in seq.column("user_id").to_pylist()], lengths=lengths, items=items,
            # copies (astype): writable like from_events' arrays, and no view pins the part's Arrow buffers
            ts=flat("ts").to_numpy(zero_copy_only=False).astype(np.int64),
            partitions=flat("partitions").to_numpy(zero_copy_only=False).astype(np.int32),
            offsets=flat("offsets").to_numpy(zero_copy_only=False).astype(np.int64),
            scenes=values[codes], unknown_at=unknown_at,
            unknown_ids=pc.filter(item_col, unknown) if len(unknown_at) else pa.array([], pa.string()))


def _assemble(catalog: Catalog, parts: list[_SequencePart], manifest: dict, *, source: str,
              users_in_tables: int) -> Corpus:
    """The Corpus of `parts` (in order): unknown items appended to the catalog sorted by id (as
    `Catalog.extended` expects), then each part's flat arrays split into per-user views."""
    unknown = sorted(set().union(*(p.unknown_ids.to_pylist() for p in parts)))
    if unknown:
        n_known = len(catalog)
        catalog = catalog.extended(unknown)
        unknown_arr = pa.array(unknown, pa.string())
        for p in parts:
            if len(p.unknown_at):
                rank = pc.index_in(p.unknown_ids, value_set=unknown_arr).to_numpy(zero_copy_only=False)
                p.items[p.unknown_at] = (n_known + rank).astype(np.int32)
    users: list[str] = []
    cols: dict[str, list[np.ndarray]] = {"items": [], "ts": [], "partitions": [], "offsets": [], "scenes": []}
    for p in parts:
        users += p.users
        cuts = np.cumsum(p.lengths)[:-1]
        for name, out in cols.items():
            out += np.split(getattr(p, name), cuts)  # views of the part's arrays: no copy
    return Corpus(catalog, users, cols["items"], cols["ts"], cols["partitions"], cols["offsets"], cols["scenes"],
                  watermarks=manifest.get("watermarks", {}), source=source,
                  forgotten=tuple(manifest.get("forgotten", ())), users_in_tables=users_in_tables)


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
    "Catalog", "Corpus", "CorpusError", "DEFAULT_MAX_USERS", "EvalSet", "Split", "GAP_BUCKETS", "MIN_EVAL_LEN",
    "cold_start_split", "describe", "gap_bucket", "history_features", "item_text", "leave_one_out", "load_corpus",
    "NotEnoughData", "popularity_log_q", "training_windows", "user_sample_keys",
]
