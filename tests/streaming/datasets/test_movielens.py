"""The MovieLens parsers (streaming/datasets/movielens.py): three layouts, and errors that name file and line."""

from __future__ import annotations

import json

import pytest

from streaming.datasets import CATALOG_TS_MS, FORMAT_GROUPLENS_100K, DatasetError, detect_format, load_movielens
from tests.streaming.datasets.files import FLAGS_NONE, U_DATA, check_schemas, write_ml100k, write_ml1m, write_recbole


def test_grouplens_100k(tmp_path):
    ds = load_movielens(write_ml100k(tmp_path / "ml-100k"))
    assert detect_format(tmp_path / "ml-100k") == FORMAT_GROUPLENS_100K
    assert ds.name == "ml-100k" and ds.n_events == 4
    check_schemas(ds)
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
    assert items["30"]["ts"] == CATALOG_TS_MS == 0


def test_grouplens_100k_without_u_genre_uses_builtin_names(tmp_path):
    ds = load_movielens(write_ml100k(tmp_path / "x", genre_file=False))
    assert json.loads(ds.items.to_pylist()[1]["attributes"])["genres"] == ["Drama", "Musical"]
    assert ds.name == "x"


def test_grouplens_dat(tmp_path):
    ds = load_movielens(write_ml1m(tmp_path / "ml-1m"), name="one-m")
    check_schemas(ds)
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
    check_schemas(ds)
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
