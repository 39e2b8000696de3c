"""Shared test data: small MovieLens directories and archives, stand-ins for the two downloaders
(no network), a small synthetic config."""

from __future__ import annotations

import urllib.error
import zipfile
from pathlib import Path

from streaming.datasets import ML100K_GENRES, Dataset, DatasetError, SyntheticConfig, fetch
from streaming.events import EVENT_COLUMNS, ITEM_COLUMNS

SMALL = SyntheticConfig(n_users=200, n_items=120, n_events=20_000, n_topics=8, seed=3)

U_DATA = (
    "1\t10\t4\t881250949\n"
    "2\t20\t3\t881250000\n"  # earlier than row 0
    "3\t10\t5\t881250949\n"  # ties row 0: must stay after it
    "1\t20\t1\t881250949\n"  # ties too
)
FLAGS_NONE = "|".join(["0"] * 19)


def flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


U_ITEM = (
    f"10|Toy Story (1995)|01-Jan-1995||http://x|{flags('Animation', 'Children' + chr(39) + 's', 'Comedy')}\n"
    f"20|Misérables, Les (1995)|01-Jan-1995||http://y|{flags('Drama', 'Musical')}\n"
    f"30|unknown||||{flags('unknown')}\n"
)


def write_ml100k(d: Path, genre_file: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text(U_DATA, encoding="latin-1")
    (d / "u.item").write_text(U_ITEM, encoding="latin-1")
    if genre_file:
        (d / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(ML100K_GENRES)) + "\n", encoding="latin-1")
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


def check_schemas(ds: Dataset) -> None:
    assert ds.items.schema == ITEM_COLUMNS
    for batch in ds.iter_event_batches(2):
        assert batch.schema == EVENT_COLUMNS
        assert batch.num_rows <= 2


def make_zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def grouplens_zip(path: Path) -> Path:
    return make_zip(path, {"ml-100k/u.data": U_DATA, "ml-100k/u.item": U_ITEM, "ml-100k/u.user": "1|24|M|x|1\n",
                       "ml-100k/u.genre": "unknown|0\n", "ml-100k/README": "hi", "ml-100k/u1.base": "x"})


def recbole_wheel(path: Path) -> Path:
    base = "recbole/dataset_example/ml-100k/"
    return make_zip(path, {"recbole/__init__.py": "", base + "ml-100k.inter": "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n",
                       base + "ml-100k.item": "item_id:token\tmovie_title:token_seq\n2\tT\n", base + "ml-100k.user": "user_id:token\n1\n",
                       base + "ml-100k.kg": "big"})


class Downloads:
    """Stand-ins for the two downloaders; each either writes a test archive or fails."""

    def __init__(self, monkeypatch, tmp_path, grouplens_ok: bool, recbole_ok: bool):
        self.calls: list[str] = []
        self.tmp = tmp_path

        def grouplens(dest_file, progress=True):
            self.calls.append("grouplens")
            if not grouplens_ok:
                raise urllib.error.URLError("no network")
            return grouplens_zip(dest_file)

        def recbole(dest_dir, progress=True):
            self.calls.append("recbole")
            if not recbole_ok:
                raise DatasetError("pip download failed: no network")
            dest_dir.mkdir(parents=True, exist_ok=True)
            return recbole_wheel(dest_dir / "recbole-1.2.1-py3-none-any.whl")

        monkeypatch.setattr(fetch, "download_grouplens_zip", grouplens)
        monkeypatch.setattr(fetch, "download_recbole_wheel", recbole)
