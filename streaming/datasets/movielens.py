"""MovieLens from local files, in the three layouts it is distributed in (GroupLens ml-100k,
GroupLens ml-1m `::` files, RecBole atomic files), detected from the files present.

Every rating becomes an event `type="rate"`, `context='{"rating": 4}'` (JSON text),
`ts = seconds * 1000`, `event_id = f"{name}-{row}"` (row = 0-based data row of the ratings
file, header excluded), ids exactly as written in the file: the same files always give the
same events, so offline runs are comparable. Items get `title` as written, `text` like
"Toy Story (1995). Genres: Animation, Children's, Comedy." (what a language model reads),
`attributes` = `{"genres": [...], "year": 1995}` (year left out when unknown) and
`ts = CATALOG_TS_MS`. A malformed line is an error naming the file, line and reason, never
skipped silently.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

from streaming.datasets.base import CATALOG_TS_MS, DatasetError, InMemoryDataset, numbered_ids, sorted_by_ts
from streaming.events import EVENT_COLUMNS, ITEM_COLUMNS, TS_MAX_MS, TS_MIN_MS

MS_PER_S = 1000
RATING_EVENT_TYPE = "rate"

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
    if not TS_MIN_MS <= ms <= TS_MAX_MS:
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
    """Column lists for a ratings file, turned into a sorted `EVENT_COLUMNS` table."""

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
        event_ids = numbered_ids(f"{self.name}-", n)
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
            schema=EVENT_COLUMNS,
        )
        return sorted_by_ts(table)


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
            schema=ITEM_COLUMNS,
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


def _read_ratings(path: Path, name: str, split: Callable[[str], list[str]], bad_count: str, item_what: str) -> pa.Table:
    """Rating lines of a GroupLens file (`user item rating seconds`, split by `split`) as events."""
    rows = _EventRows(name)
    context = _RatingContexts()
    for lineno, line in _lines(path, GROUPLENS_ENCODING):
        parts = split(line)
        if len(parts) != 4:
            raise _bad(path, lineno, bad_count.format(n=len(parts)), line)
        rows.add(
            _id(parts[0], path, lineno, "user id", line),
            _id(parts[1], path, lineno, item_what, line),
            _seconds_to_ms(parts[3], path, lineno, line),
            context(parts[2], path, lineno, line),
            RATING_EVENT_TYPE,
        )
    return rows.table()


def _read_u_data(path: Path, name: str) -> pa.Table:
    return _read_ratings(path, name, str.split,
                         "expected 4 tab-separated fields (user item rating timestamp), got {n}", "item id")


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
    return _read_ratings(path, name, lambda line: line.split("::"),
                         "expected `UserID::MovieID::Rating::Timestamp`, got {n} fields", "movie id")


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
MOVIELENS_FILES = (
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
        raise DatasetError(f"dataset directory {directory} {what}; expected a directory with {MOVIELENS_FILES}")
    if (directory / "u.data").is_file():
        return FORMAT_GROUPLENS_100K
    if (directory / "ratings.dat").is_file():
        return FORMAT_GROUPLENS_DAT
    if any(p.is_file() for p in directory.glob("*.inter")):
        return FORMAT_RECBOLE
    raise DatasetError(f"{directory}: no MovieLens files found; expected {MOVIELENS_FILES}")


_LOADERS: dict[str, Callable[[Path, str | None], InMemoryDataset]] = {
    FORMAT_GROUPLENS_100K: load_grouplens_100k,
    FORMAT_GROUPLENS_DAT: load_grouplens_dat,
    FORMAT_RECBOLE: load_recbole,
}


def load_movielens(directory: Path, name: str | None = None) -> InMemoryDataset:
    """Load a MovieLens directory in any supported layout (see the module docstring)."""
    return _LOADERS[detect_format(Path(directory))](Path(directory), name)
