"""Datasets for streamrec: MovieLens from local files and a seeded synthetic stream.

Every dataset is a `Dataset`: an item catalog plus a time-ordered stream of interaction
events, as Arrow data in the event contract's columns, so the producer can publish it, and
training and evaluation can read it offline, without a second format. `load_dataset(spec)`
turns the one string a command line takes into a dataset.

Modules: `base` (the dataset types), `movielens` (the file parsers), `fetch` (the one download:
MovieLens-100K), `synthetic` (the generator and its ground truth), `spec` (`load_dataset`).
"""

from streaming.datasets.base import CATALOG_TS_MS, DEFAULT_BATCH_SIZE, Dataset, DatasetError, InMemoryDataset
from streaming.datasets.fetch import (
    GROUPLENS_ML100K_URL,
    ML100K_NAME,
    RECBOLE_REQUIREMENT,
    download_grouplens_zip,
    download_recbole_wheel,
    extract_grouplens_zip,
    extract_recbole_wheel,
    fetch_ml100k,
)
from streaming.datasets.movielens import (
    FORMAT_GROUPLENS_100K,
    FORMAT_GROUPLENS_DAT,
    FORMAT_RECBOLE,
    ML100K_GENRES,
    RATING_EVENT_TYPE,
    detect_format,
    load_grouplens_100k,
    load_grouplens_dat,
    load_movielens,
    load_recbole,
)
from streaming.datasets.spec import SYNTHETIC_SPEC, load_dataset, parse_synthetic_spec
from streaming.datasets.synthetic import (
    SYNTHETIC_EVENT_TYPES,
    SyntheticConfig,
    SyntheticDataset,
    SyntheticTruth,
    synthetic_dataset,
    synthetic_options_help,
)

__all__ = [
    "CATALOG_TS_MS",
    "DEFAULT_BATCH_SIZE",
    "FORMAT_GROUPLENS_100K",
    "FORMAT_GROUPLENS_DAT",
    "FORMAT_RECBOLE",
    "GROUPLENS_ML100K_URL",
    "ML100K_GENRES",
    "ML100K_NAME",
    "RATING_EVENT_TYPE",
    "RECBOLE_REQUIREMENT",
    "SYNTHETIC_EVENT_TYPES",
    "SYNTHETIC_SPEC",
    "Dataset",
    "DatasetError",
    "InMemoryDataset",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticTruth",
    "detect_format",
    "download_grouplens_zip",
    "download_recbole_wheel",
    "extract_grouplens_zip",
    "extract_recbole_wheel",
    "fetch_ml100k",
    "load_dataset",
    "load_grouplens_100k",
    "load_grouplens_dat",
    "load_movielens",
    "load_recbole",
    "parse_synthetic_spec",
    "synthetic_dataset",
    "synthetic_options_help",
]
