"""The README's data-flow picture cannot drift from its source, docs/dataflow.py.

The committed docs/dataflow.svg must be byte-identical to a fresh render. This holds because the
script pins everything that could vary: figure size and dpi, matplotlib's default style (not a
user's matplotlibrc), the bundled DejaVu fonts, `svg.hashsalt` (otherwise clip-path ids are
random), no `Date` and a fixed `Creator` in the metadata (otherwise a timestamp and the
matplotlib version land in the file), and `svg.fonttype: none` (text stays <text>, so the bytes do
not depend on glyph outlines). What is left is matplotlib's own SVG writer: a matplotlib release
that changes how it writes paths would fail this test; re-render with `python docs/dataflow.py`
and commit the result.
"""

import importlib.util
import re
import struct
from pathlib import Path

import matplotlib
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RENDER = "python docs/dataflow.py"


def _load_dataflow():
    spec = importlib.util.spec_from_file_location("docs_dataflow", DOCS / "dataflow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_committed_svg_is_a_fresh_render_of_docs_dataflow_py(tmp_path):
    dataflow = _load_dataflow()
    png, svg = dataflow.render(tmp_path)
    assert png.parent == svg.parent == tmp_path
    fresh, committed = svg.read_bytes(), (DOCS / "dataflow.svg").read_bytes()
    assert fresh == committed, (
        f"docs/dataflow.svg is not what docs/dataflow.py draws (matplotlib {matplotlib.__version__}): "
        f"run `{RENDER}` and commit docs/dataflow.svg and docs/dataflow.png"
    )
    assert _png_size(png) == dataflow.SIZE_PX


def test_committed_png_exists_at_readme_size():
    png = DOCS / "dataflow.png"
    assert png.is_file(), f"docs/dataflow.png is missing: run `{RENDER}`"
    assert _png_size(png) == (1300, 860)


# A path the map names must exist: docs/architecture.md and the README are kept current by this.
_PATH_RE = re.compile(r"(?<![\w./-])((?:streaming|training|services|tests|k8s|bench|docs)/[\w./-]*\w)")
_MAPS = ("docs/architecture.md", "README.md")


@pytest.mark.parametrize("doc", _MAPS)
def test_every_path_the_map_names_exists(doc):
    root = DOCS.parent
    text = (root / doc).read_text(encoding="utf-8")
    missing = sorted({p for p in _PATH_RE.findall(text) if not (root / p).exists() and "<" not in p
                      and not p.startswith(("docs/dataflow.", "bench/results"))})
    assert not missing, f"{doc} names paths that do not exist (update the map): {missing}"


def test_architecture_names_every_module():
    """A module is named by its file name, or, inside a subpackage (streaming/features/...), by the
    subpackage's folder name."""
    root = DOCS.parent
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    unnamed = []
    for pkg in ("streaming", "training", "services"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path.name == "__init__.py" or "__pycache__" in path.parts:
                continue
            sub = path.parent.name if path.parent != root / pkg else None
            if path.name not in text and not (sub and f"{sub}/" in text):
                unnamed.append(str(path.relative_to(root)))
    assert not unnamed, f"docs/architecture.md does not name these modules (add them to the layout): {unnamed}"
