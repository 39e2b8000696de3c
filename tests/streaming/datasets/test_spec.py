"""Dataset specs (streaming/datasets/spec.py): `load_dataset`."""

from __future__ import annotations

import pytest

from streaming.datasets import DatasetError, SyntheticConfig, SyntheticDataset, load_dataset
from tests.streaming.datasets.files import Downloads, write_ml1m


def test_load_dataset_synthetic_specs(tmp_path):
    ds = load_dataset("synthetic", tmp_path)
    assert isinstance(ds, SyntheticDataset) and ds.config == SyntheticConfig()
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
    Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=True)
    ds = load_dataset("ml-100k", tmp_path, progress=False)
    assert ds.name == "ml-100k" and ds.events_table().column("event_id").to_pylist() == ["ml-100k-0"]
    assert load_dataset("ml-100k", tmp_path, fetch=False).n_events == 1
