"""Dataset specs: the one string a command line names a dataset with (`load_dataset`).

- `ml-100k`: `datasets_dir/ml-100k/`, fetched there first if missing (`fetch_ml100k`).
- `synthetic` or `synthetic:key=value,...`: `synthetic_dataset(SyntheticConfig(...))`; keys are
  the fields of `SyntheticConfig`; `scenes` takes `|`-separated names.
- a directory path (or a directory name under `datasets_dir`) holding MovieLens files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from streaming.datasets.base import Dataset, DatasetError
from streaming.datasets.fetch import ML100K_NAME, fetch_ml100k, ml100k_complete
from streaming.datasets.movielens import MOVIELENS_FILES, load_movielens
from streaming.datasets.synthetic import SyntheticConfig, synthetic_dataset

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
        if not ml100k_complete(target):
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
        f"directory with {MOVIELENS_FILES} (looked for {path} and {datasets_dir / spec})"
    )
