"""How a benchmark hands back its figures: the JSON printed, and written to `--json` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(out: dict[str, Any], path: Path | None, indent: int = 1) -> str:
    """Print `out` as JSON and write it to `path` (its folder made) when one is given; the text."""
    text = json.dumps(out, indent=indent)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text


__all__ = ["emit"]
