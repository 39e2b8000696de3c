"""A seeded synthetic dataset with structure a recommender can learn, and the ground truth.

Each item has a topic whose vocabulary shows in its title and text, users prefer one or two
topics, popularity within a topic is Zipf-distributed, and with probability `p_follow` a
user's next item is one of a few fixed "successors" of their previous item; the plant is
exposed as `SyntheticDataset.truth`, so tests and benchmarks can tell what a model should
find. Events are generated lazily in fixed-size chunks (memory O(n_users + n_items + batch)),
identical on every call for the same config and independent of the batch size; a longer
`n_events` only appends. Ids: users `u0..`, items `i0..`, events `syn<8-hex digest of the config
without n_events>-<n>`; types mostly `click` with some `view` / `like` / `purchase`; `context`
null; item `ts` is `CATALOG_TS_MS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from streaming.datasets.base import (
    CATALOG_TS_MS,
    DEFAULT_BATCH_SIZE,
    Dataset,
    DatasetError,
    check_batch_size,
    numbered_ids,
    one_batch,
)
from streaming.events import EVENT_COLUMNS, ITEM_COLUMNS, TS_MAX_MS


# Themed vocabularies: an item's title and text use its topic's words, so text alone reveals
# the topic (what a language model can pick up for cold-start items).
TOPIC_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "space": ("galaxy", "rocket", "alien", "orbit", "nebula", "astronaut", "comet", "planet",
              "telescope", "asteroid", "cosmos", "satellite", "lunar", "starship", "meteor", "gravity"),
    "cooking": ("recipe", "kitchen", "spice", "oven", "saucepan", "garlic", "baking", "flavor",
                "dough", "simmer", "chef", "pastry", "herb", "roast", "marinade", "skillet"),
    "sports": ("football", "stadium", "goal", "referee", "sprint", "marathon", "tennis", "trophy",
               "coach", "league", "dribble", "tournament", "athlete", "racket", "score", "penalty"),
    "music": ("guitar", "melody", "concert", "album", "drum", "chorus", "violin", "rhythm",
              "band", "lyrics", "symphony", "tempo", "piano", "vinyl", "harmony", "singer"),
    "travel": ("passport", "beach", "luggage", "airport", "island", "itinerary", "hostel", "backpack",
               "cruise", "souvenir", "voyage", "resort", "map", "journey", "tourist", "landmark"),
    "finance": ("stock", "dividend", "portfolio", "budget", "mortgage", "investor", "bond", "inflation",
                "savings", "market", "interest", "pension", "crypto", "loan", "equity", "tax"),
    "gardening": ("tulip", "compost", "seedling", "greenhouse", "pruning", "soil", "orchid", "shovel",
                  "harvest", "mulch", "fertilizer", "blossom", "hedge", "watering", "perennial", "bulb"),
    "fashion": ("dress", "runway", "fabric", "denim", "handbag", "tailor", "sneaker", "jacket",
                "couture", "scarf", "silk", "boutique", "heels", "wardrobe", "stylist", "catwalk"),
    "gaming": ("console", "joystick", "quest", "dungeon", "multiplayer", "level", "boss", "arcade",
               "pixel", "speedrun", "respawn", "loot", "controller", "esports", "avatar", "checkpoint"),
    "history": ("empire", "pharaoh", "medieval", "castle", "dynasty", "revolution", "archive", "knight",
                "ancient", "artifact", "monarch", "treaty", "colonial", "chronicle", "ruins", "legion"),
    "health": ("fitness", "nutrition", "yoga", "vitamin", "cardio", "meditation", "protein", "wellness",
               "stretching", "sleep", "hydration", "immune", "therapy", "calorie", "posture", "workout"),
    "cars": ("engine", "turbo", "sedan", "horsepower", "gearbox", "tire", "convertible", "mileage",
             "roadster", "dashboard", "exhaust", "hybrid", "clutch", "torque", "garage", "chassis"),
    "pets": ("puppy", "kitten", "leash", "aquarium", "parrot", "grooming", "veterinarian", "hamster",
             "kennel", "collar", "treats", "litter", "breed", "fetch", "whiskers", "terrier"),
    "science": ("molecule", "laboratory", "experiment", "quantum", "enzyme", "microscope", "genome", "reaction",
                "hypothesis", "particle", "neuron", "catalyst", "isotope", "bacteria", "equation", "fossil"),
}
TITLE_WORDS = 2  # topic words in an item title
TEXT_WORDS = 5  # topic words in an item text
# Event types and their shares: mostly clicks (the default `Settings.event_types` accept all).
SYNTHETIC_EVENT_TYPES = ("click", "view", "like", "purchase")
SYNTHETIC_EVENT_TYPE_PROBS = (0.80, 0.12, 0.05, 0.03)
# Events are generated in chunks of this many, each from its own RNG seeded by (seed, chunk),
# and then cut to the caller's batch size: the stream never depends on the batch size, and a
# longer `n_events` only appends to a shorter one.
GEN_CHUNK_EVENTS = 32_768
_EVENT_RNG_STREAM = 1  # the chunk RNGs' seed is (seed, _EVENT_RNG_STREAM, chunk index)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of `synthetic_dataset`; `help` in each field's metadata (`synthetic_options_help()`)."""

    n_users: int = field(default=1000, metadata={"help": "number of users (ids u0..u{n-1})"})
    n_items: int = field(default=500, metadata={"help": "number of items (ids i0..i{n-1}); at least n_topics"})
    n_events: int = field(default=100_000, metadata={"help": "number of events in the stream"})
    n_topics: int = field(default=12, metadata={"help": f"number of item topics; past {len(TOPIC_VOCABULARIES)} "
                                                        "the vocabularies repeat with a numeric suffix"})
    seed: int = field(default=0, metadata={"help": "random seed: same config and seed, same data"})
    start_ts_ms: int = field(default=1_700_000_000_000, metadata={"help": "time of the first event, epoch ms"})
    mean_gap_ms: float = field(default=1000.0, metadata={"help": "mean time between consecutive events (all users), "
                                                                 "ms, >= 1; gaps are geometric so ts strictly increase"})
    p_follow: float = field(default=0.5, metadata={"help": "probability that a user's next item is a successor of "
                                                           "their previous item"})
    n_successors: int = field(default=3, metadata={"help": "fixed successor items per item (same topic)"})
    zipf_a: float = field(default=1.0, metadata={"help": "Zipf exponent of item popularity within a topic (0 = uniform)"})
    p_two_topics: float = field(default=0.4, metadata={"help": "probability that a user likes two topics instead of one"})
    taste_noise: float = field(default=0.05, metadata={"help": "share of a user's taste spread evenly over all topics"})
    activity_sigma: float = field(default=1.0, metadata={"help": "lognormal sigma of per-user activity (0 = equal)"})
    scenes: tuple[str, ...] | None = field(default=None, metadata={"help": "scene names drawn uniformly per event "
                                                                           "(`|`-separated in a spec); none: no scene"})

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise DatasetError(f"synthetic {name}={getattr(self, name)!r}: {what}")

        for name in ("n_users", "n_items", "n_events", "n_topics", "n_successors"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(self.n_items >= self.n_topics, "n_items", f"must be at least n_topics={self.n_topics}")
        need(isinstance(self.start_ts_ms, int) and self.start_ts_ms >= 0, "start_ts_ms", "must be an integer >= 0")
        need(math.isfinite(self.mean_gap_ms) and self.mean_gap_ms >= 1, "mean_gap_ms", "must be >= 1")
        for name in ("p_follow", "p_two_topics", "taste_noise"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must be between 0 and 1")
        need(0.0 <= self.zipf_a <= 10.0, "zipf_a", "must be between 0 and 10")
        need(0.0 <= self.activity_sigma <= 10.0, "activity_sigma", "must be between 0 and 10")
        if self.scenes is not None:
            need(len(self.scenes) > 0 and all(isinstance(s, str) and s for s in self.scenes), "scenes",
                 "must be a non-empty tuple of non-empty names, or None")
        # Geometric gaps average mean_gap_ms; leave room for their spread (x2).
        need(self.start_ts_ms + 2 * self.n_events * self.mean_gap_ms <= TS_MAX_MS, "n_events",
             "start_ts_ms + n_events * mean_gap_ms runs past year 2200")

    def digest(self) -> str:
        """Short hash of everything but `n_events` (a longer stream extends a shorter one)."""
        payload = {k: v for k, v in dataclasses.asdict(self).items() if k != "n_events"}
        return hashlib.sha256(repr(sorted(payload.items())).encode()).hexdigest()[:8]


def synthetic_options_help() -> str:
    """One line per `SyntheticConfig` field: name, default, help (for CLIs and error messages)."""
    return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata['help']}" for f in dataclasses.fields(SyntheticConfig))


@dataclass(frozen=True)
class SyntheticTruth:
    """What the generator planted; indexes are positions (user `u7` is row 7, item `i3` is row 3).

    A user's taste: with probability `taste_noise` a uniformly random topic, otherwise
    `user_topics[u, 0]` with probability `user_topic_weights[u]`, else `user_topics[u, 1]`
    (the same topic twice for one-topic users). `user_tastes` spells that out as a matrix.
    """

    topic_names: tuple[str, ...]
    item_topic: np.ndarray  # (n_items,) topic index of each item
    item_popularity: np.ndarray  # (n_items,) probability of the item within its topic
    successors: np.ndarray  # (n_items, n_successors) item indexes, same topic, not the item (unless alone)
    user_topics: np.ndarray  # (n_users, 2) favourite topic indexes
    user_topic_weights: np.ndarray  # (n_users,) share of the first favourite among the two
    taste_noise: float
    user_activity: np.ndarray  # (n_users,) probability that an event is by this user

    @property
    def user_tastes(self) -> np.ndarray:
        """(n_users, n_topics) topic probabilities, rows sum to 1 (dense: for tests and analysis)."""
        n_users, n_topics = len(self.user_activity), len(self.topic_names)
        tastes = np.full((n_users, n_topics), self.taste_noise / n_topics)
        rows = np.arange(n_users)
        w = self.user_topic_weights
        np.add.at(tastes, (rows, self.user_topics[:, 0]), (1.0 - self.taste_noise) * w)
        np.add.at(tastes, (rows, self.user_topics[:, 1]), (1.0 - self.taste_noise) * (1.0 - w))
        return tastes


SUCCESSOR_REDRAWS = 64  # rounds of redrawing successors that hit the item itself or repeat


def _topic_names(n_topics: int) -> tuple[str, ...]:
    themes = list(TOPIC_VOCABULARIES)
    return tuple(themes[t % len(themes)] + ("" if t < len(themes) else f"-{t // len(themes) + 1}") for t in range(n_topics))


def topic_words(n_topics: int) -> list[tuple[str, ...]]:
    """Each topic's vocabulary (what its items' titles and texts are made of)."""
    themes = list(TOPIC_VOCABULARIES.values())
    # A repeated vocabulary gets the round number as suffix ("galaxy2"), so text still tells topics apart.
    return [tuple(w + ("" if t < len(themes) else str(t // len(themes) + 1)) for w in themes[t % len(themes)])
            for t in range(n_topics)]


def _conflicts(out: np.ndarray) -> np.ndarray:
    """Mask of draws equal to their own row (the item itself) or to an earlier draw in the row."""
    bad = out == np.arange(len(out))[:, None]
    for a in range(1, out.shape[1]):
        bad[:, a] |= (out[:, a:a + 1] == out[:, :a]).any(axis=1)
    return bad


def _topic_successors(pop: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(s, k) positions within a topic of s items: k distinct others, drawn by popularity."""
    s = len(pop)
    if s == 1:
        return np.zeros((1, k), dtype=np.int64)  # a one-item topic: the item follows itself
    if s <= k + 1:  # too few items to choose from: all the others, in turn
        return (np.arange(s)[:, None] + 1 + np.arange(k)[None, :] % (s - 1)) % s
    cum = np.cumsum(pop / pop.sum())
    cum[-1] = 1.0
    out = np.minimum(np.searchsorted(cum, rng.random((s, k)), side="right"), s - 1)
    for _ in range(SUCCESSOR_REDRAWS):
        bad = _conflicts(out)
        if not bad.any():
            break
        out[bad] = np.minimum(np.searchsorted(cum, rng.random(int(bad.sum())), side="right"), s - 1)
    # Whatever still collides (a very steep zipf_a) takes the next items in turn: never itself.
    bad = _conflicts(out)
    rows, cols = np.nonzero(bad)
    out[rows, cols] = (rows + 1 + cols) % s
    return out


def _make_truth(cfg: SyntheticConfig) -> SyntheticTruth:
    rng = np.random.default_rng([cfg.seed, 0])
    # Topics get (near) equal item counts; the popularity inside a topic is Zipf by a random rank.
    item_topic = rng.permutation(np.arange(cfg.n_items) % cfg.n_topics)
    item_pop = np.empty(cfg.n_items)
    successors = np.empty((cfg.n_items, cfg.n_successors), dtype=np.int64)
    for t in range(cfg.n_topics):
        members = np.flatnonzero(item_topic == t)
        weights = 1.0 / np.arange(1, len(members) + 1) ** cfg.zipf_a
        weights = weights[rng.permutation(len(members))]
        item_pop[members] = weights / weights.sum()
        successors[members] = members[_topic_successors(item_pop[members], cfg.n_successors, rng)]
    # Users like one or two distinct topics (split by a Beta(2, 2) share), plus a little of everything.
    first = rng.integers(0, cfg.n_topics, cfg.n_users)
    two = (rng.random(cfg.n_users) < cfg.p_two_topics) & (cfg.n_topics > 1)
    second = np.where(two, (first + 1 + rng.integers(0, max(cfg.n_topics - 1, 1), cfg.n_users)) % cfg.n_topics, first)
    weight = np.where(two, rng.beta(2.0, 2.0, cfg.n_users), 1.0)
    activity = rng.lognormal(0.0, cfg.activity_sigma, cfg.n_users)
    return SyntheticTruth(
        topic_names=_topic_names(cfg.n_topics),
        item_topic=item_topic,
        item_popularity=item_pop,
        successors=successors,
        user_topics=np.stack([first, second], axis=1),
        user_topic_weights=weight,
        taste_noise=cfg.taste_noise,
        user_activity=activity / activity.sum(),
    )


def _make_items(cfg: SyntheticConfig, truth: SyntheticTruth) -> pa.Table:
    rng = np.random.default_rng([cfg.seed, 2])
    words = topic_words(cfg.n_topics)
    vocab_size = min(len(w) for w in words)
    n_words = min(TITLE_WORDS + TEXT_WORDS, vocab_size)
    # Distinct random words per item: the first n_words of a random permutation of the vocabulary.
    picks = np.argsort(rng.random((cfg.n_items, vocab_size)), axis=1)[:, :n_words]
    titles, texts = [], []
    for i, (t, row) in enumerate(zip(truth.item_topic.tolist(), picks.tolist())):
        vocab = words[t]
        picked = [vocab[j] for j in row]
        title = " ".join(w.capitalize() for w in picked[:TITLE_WORDS]) + f" {i}"
        body = picked[TITLE_WORDS:]
        titles.append(title)
        texts.append(f"{title}: all about {', '.join(body[:-1])} and {body[-1]}.")
    topic_attrs = pa.array([json.dumps({"topic": name}) for name in truth.topic_names], pa.string())
    return pa.table(
        {
            "item_id": numbered_ids("i", cfg.n_items),
            "title": pa.array(titles, pa.string()),
            "text": pa.array(texts, pa.string()),
            "attributes": topic_attrs.take(pa.array(truth.item_topic)),
            "ts": pa.array(np.full(cfg.n_items, CATALOG_TS_MS, dtype=np.int64)),
        },
        schema=ITEM_COLUMNS,
    )


class _Sampler:
    """Vectorised draws from the planted distributions (arrays O(n_users + n_items))."""

    def __init__(self, cfg: SyntheticConfig, truth: SyntheticTruth) -> None:
        self.n_topics = cfg.n_topics
        self.noise = cfg.taste_noise
        self.user_cum = np.cumsum(truth.user_activity)
        self.user_cum[-1] = 1.0
        self.user_topics = truth.user_topics
        self.user_weights = truth.user_topic_weights
        # Items grouped by topic; `block_cum` is topic index + cumulative popularity in the topic,
        # so one searchsorted of (topic + u) picks an item of that topic by popularity.
        self.by_topic = np.argsort(truth.item_topic, kind="stable")
        topics_sorted = truth.item_topic[self.by_topic]
        pop_sorted = truth.item_popularity[self.by_topic]
        self.block_end = np.searchsorted(topics_sorted, np.arange(cfg.n_topics), side="right")
        block_start = np.r_[0, self.block_end[:-1]]
        before_block = np.r_[0.0, np.cumsum(pop_sorted)[self.block_end[:-1] - 1]]
        within = np.cumsum(pop_sorted) - np.repeat(before_block, self.block_end - block_start)
        self.block_cum = topics_sorted + within
        self.block_cum[self.block_end - 1] = np.arange(1, cfg.n_topics + 1)  # exact block ends
        self.type_cum = np.cumsum(SYNTHETIC_EVENT_TYPE_PROBS)
        self.type_cum[-1] = 1.0

    def users(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(self.user_cum, u, side="right"), len(self.user_cum) - 1)

    def topics(self, users: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One uniform per event: below `noise` a uniform topic, above it one of the favourites."""
        fav = self.user_topics[users]
        if self.noise >= 1.0:
            return np.minimum((u * self.n_topics).astype(np.int64), self.n_topics - 1)
        v = (u - self.noise) / (1.0 - self.noise)
        topic = np.where(v < self.user_weights[users], fav[:, 0], fav[:, 1])
        if self.noise > 0.0:
            uniform = np.minimum((u / self.noise * self.n_topics).astype(np.int64), self.n_topics - 1)
            topic = np.where(u < self.noise, uniform, topic)
        return topic

    def items(self, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.block_cum, topics + u, side="right")
        # topic + u can round up to topic + 1; keep the draw inside its topic's block.
        pos = np.minimum(pos, self.block_end[topics] - 1)
        return self.by_topic[pos]

    def types(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(self.type_cum, u, side="right"), len(self.type_cum) - 1)


@dataclass
class SyntheticDataset(Dataset):
    """A generated dataset; `truth` holds what was planted. Build with `synthetic_dataset(cfg)`."""

    config: SyntheticConfig
    truth: SyntheticTruth

    def __post_init__(self) -> None:
        self._sampler = _Sampler(self.config, self.truth)
        self._user_ids = numbered_ids("u", self.config.n_users)
        self._item_ids = self.items.column("item_id").combine_chunks()
        self._type_names = pa.array(SYNTHETIC_EVENT_TYPES, pa.string())
        self._scene_names = pa.array(self.config.scenes, pa.string()) if self.config.scenes else None
        self._event_prefix = f"syn{self.config.digest()}-"

    def iter_event_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        check_batch_size(batch_size)
        return _rebatch(self._chunks(), batch_size)

    def _chunks(self) -> Iterator[pa.RecordBatch]:
        cfg = self.config
        last_item = np.full(cfg.n_users, -1, dtype=np.int64)  # the per-user state: previous item
        last_ts = cfg.start_ts_ms
        for chunk, start in enumerate(range(0, cfg.n_events, GEN_CHUNK_EVENTS)):
            n = min(GEN_CHUNK_EVENTS, cfg.n_events - start)
            batch, last_ts = self._chunk(chunk, start, n, last_item, last_ts)
            yield batch

    def _chunk(self, chunk: int, start: int, n: int, last_item: np.ndarray, last_ts: int) -> tuple[pa.RecordBatch, int]:
        cfg, s = self.config, self._sampler
        rng = np.random.default_rng([cfg.seed, _EVENT_RNG_STREAM, chunk])
        m = GEN_CHUNK_EVENTS  # always draw a full chunk, then cut: the prefix never depends on n
        u_user, u_topic, u_item, u_follow, u_type = (rng.random(m)[:n] for _ in range(5))
        succ_j = rng.integers(0, cfg.n_successors, m)[:n]
        scenes = rng.integers(0, len(cfg.scenes) if cfg.scenes else 1, m)[:n]
        gaps = rng.geometric(1.0 / cfg.mean_gap_ms, m)[:n]
        users = s.users(u_user)
        fresh = s.items(s.topics(users, u_topic), u_item)
        follow = u_follow < cfg.p_follow
        types = s.types(u_type)
        items = resolve_items(users, fresh, follow, succ_j, self.truth.successors, last_item)
        ts = last_ts + np.cumsum(gaps)
        if start == 0:
            ts -= gaps[0]  # the first event is at start_ts_ms exactly
        ids = numbered_ids(self._event_prefix, n, start)
        batch = pa.record_batch(
            [
                ids,
                self._user_ids.take(pa.array(users)),
                self._item_ids.take(pa.array(items)),
                self._type_names.take(pa.array(types)),
                pa.array(ts, pa.int64()),
                self._scene_names.take(pa.array(scenes)) if self._scene_names is not None else pa.nulls(n, pa.string()),
                pa.nulls(n, pa.string()),
            ],
            schema=EVENT_COLUMNS,
        )
        return batch, int(ts[-1])


def resolve_items(users: np.ndarray, fresh: np.ndarray, follow: np.ndarray, succ_j: np.ndarray,
                   successors: np.ndarray, last_item: np.ndarray) -> np.ndarray:
    """Each event's item: a successor of the user's previous item (if `follow`), else `fresh`.

    Events of one user form a chain, resolved without a Python loop over events: with the
    events grouped by user, an event is known at depth 0 when it is `fresh`, or follows the
    item carried over in `last_item`; an event `d` follows after such an event is at depth d
    and is resolved in round d from the event before it. Rounds number about
    log(chunk) / log(1 / p_follow), not the events per user. Updates `last_item` in place.
    """
    n = len(users)
    by_user = np.argsort(users, kind="stable")  # within a user, time order is kept
    su, sfollow, sj = users[by_user], follow[by_user], succ_j[by_user]
    first = np.r_[True, su[1:] != su[:-1]]
    carried = last_item[su]
    sfollow = sfollow & (~first | (carried >= 0))  # a user's first event ever cannot follow
    items = fresh[by_user].copy()
    from_state = first & sfollow
    items[from_state] = successors[carried[from_state], sj[from_state]]
    known = first | ~sfollow
    positions = np.arange(n)
    depth = positions - np.maximum.accumulate(np.where(known, positions, -1))
    order = np.argsort(depth, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(depth))]
    for d in range(1, len(bounds) - 1):
        idx = order[bounds[d]:bounds[d + 1]]
        items[idx] = successors[items[idx - 1], sj[idx]]
    last = np.r_[np.flatnonzero(first)[1:] - 1, n - 1] if n else np.empty(0, dtype=np.int64)
    last_item[su[last]] = items[last]
    out = np.empty_like(items)
    out[by_user] = items
    return out


def _rebatch(chunks: Iterator[pa.RecordBatch], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Cut a stream of record batches into batches of exactly `batch_size` rows (the last: fewer)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += chunk.num_rows
        if held < batch_size:
            continue
        table = pa.Table.from_batches(pending, schema=EVENT_COLUMNS)
        offset = 0
        while held - offset >= batch_size:
            yield one_batch(table.slice(offset, batch_size))
            offset += batch_size
        rest = table.slice(offset)
        pending = [one_batch(rest)] if rest.num_rows else []
        held = rest.num_rows
    if held:
        yield one_batch(pa.Table.from_batches(pending, schema=EVENT_COLUMNS))


def synthetic_dataset(cfg: SyntheticConfig | None = None) -> SyntheticDataset:
    """A seeded synthetic dataset (see `SyntheticConfig` and the module docstring)."""
    cfg = cfg or SyntheticConfig()
    truth = _make_truth(cfg)
    return SyntheticDataset(name="synthetic", items=_make_items(cfg, truth), n_events=cfg.n_events,
                            config=cfg, truth=truth)
