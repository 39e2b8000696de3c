"""The data-flow picture at the top of the README, drawn with matplotlib only.

Render it from the repository root (it needs only matplotlib, a project dependency):

    python docs/dataflow.py

which writes ``docs/dataflow.png`` (1300 x 860 px, the image the README embeds) and
``docs/dataflow.svg`` (the same picture as text, for review diffs). Commit the three files
together: ``tests/test_docs.py`` re-renders the SVG and fails if it differs from the committed
one by a single byte, so the picture cannot drift from this source.

The output is deterministic: fixed figure size and dpi, matplotlib's default style (a user's
matplotlibrc is ignored), the bundled DejaVu fonts, a fixed ``svg.hashsalt`` (clip-path ids),
no creation date and no version string in the file metadata.

The layout is a grid in "units" of 10 px: x runs 0..130, y runs 0..86 (bottom to top).
Names follow the architecture page and the code (`streamrec ingest`, `services.serve_app.Api`,
`/v1/...`); keep them in step when those change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.path import Path as MplPath

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT, DPI = 13.0, 8.6, 100  # inches, inches, px per inch -> 1300 x 860 px
SIZE_PX = (round(WIDTH * DPI), round(HEIGHT * DPI))

# Everything that could change the bytes of the output is set here, on top of matplotlib's
# defaults (not the user's matplotlibrc).
RC = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # bundled with matplotlib
    "font.monospace": ["DejaVu Sans Mono"],
    "svg.fonttype": "none",  # text stays text in the SVG: small, greppable, diffable
    "svg.hashsalt": "streamrec-dataflow",  # stable ids instead of random ones
    "svg.image_inline": True,
    "path.simplify": False,
}
SVG_METADATA = {"Date": None, "Creator": "docs/dataflow.py (matplotlib)", "Title": "streamrec data flow"}
PNG_METADATA = {"Software": None, "Title": "streamrec data flow"}

# (fill, edge) per group; the lanes use a lighter tint of the same hue.
COLOURS = {
    "external": ("#eeeeee", "#5f6368"),
    "streaming": ("#dbeafe", "#1d4ed8"),
    "training": ("#ffedd5", "#c2410c"),
    "serving": ("#dcfce7", "#15803d"),
    "ops": ("#f3e8ff", "#7e22ce"),
}
LANE_TINT = {"streaming": "#f5f9ff", "training": "#fffaf3", "serving": "#f5fdf7"}
ARROW = "#374151"
TITLE_PT, BODY_PT, LABEL_PT = 11, 9.5, 8.5
UNIT_PER_PT = DPI / 72 / 10  # a point in layout units (1 unit = 10 px)


def box(ax, x, y, w, h, title, lines=(), *, group, dashed=False, top=False):
    """A rounded box with a bold title and short lines; a line in `backticks` is monospace.

    The text block is centred in the box, or starts at its top edge with `top=True`.

    Returns a dict of anchor points (left, right, top, bottom) at the box's mid-edges.
    """
    fill, edge = COLOURS[group]
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0,rounding_size=1.2",
            facecolor=fill, edgecolor=edge, linewidth=1.4, linestyle="--" if dashed else "-",
        )
    )
    steps = [TITLE_PT * 1.45 * UNIT_PER_PT] + [BODY_PT * 1.4 * UNIT_PER_PT] * len(lines)
    top = y + h - 0.8 if top else y + h / 2 + sum(steps) / 2
    for i, (text, step) in enumerate(zip([title, *lines], steps)):
        mono = text.startswith("`") and text.endswith("`")
        ax.text(
            x + w / 2, top - step / 2, text.strip("`"), ha="center", va="center",
            fontsize=TITLE_PT if i == 0 else BODY_PT, fontweight="bold" if i == 0 else "normal",
            family="monospace" if mono else "sans-serif", color="#111827" if i == 0 else "#1f2937",
        )
        top -= step
    return {"left": (x, y + h / 2), "right": (x + w, y + h / 2), "top": (x + w / 2, y + h), "bottom": (x + w / 2, y)}


def pill(ax, x, y, w, h, text, *, group):
    """A small monospace tag inside a box (a Kafka topic)."""
    fill, edge = COLOURS[group]
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.9", facecolor="white", edgecolor=edge, linewidth=1.1)
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=BODY_PT, family="monospace", color="#111827")
    return {"left": (x, y + h / 2), "right": (x + w, y + h / 2)}


def arrow(ax, *points, rad=0.0, both=False, dashed=False, color=ARROW):
    """An arrow through `points`: two points give a straight (or `rad`-curved) arrow, more an elbow path."""
    style = "<|-|>" if both else "-|>"
    common = dict(arrowstyle=style, mutation_scale=14, color=color, linewidth=1.5, linestyle="--" if dashed else "-")
    if len(points) == 2:
        patch = FancyArrowPatch(*points, connectionstyle=f"arc3,rad={rad}", shrinkA=1, shrinkB=1, **common)
    else:
        patch = FancyArrowPatch(path=MplPath(points), **common)
    ax.add_patch(patch)


def label(ax, x, y, text, *, ha="center", color=ARROW):
    """A short arrow label on a white background (so it stays readable where it crosses a line)."""
    ax.text(
        x, y, text, ha=ha, va="center", fontsize=LABEL_PT, style="italic", color=color, linespacing=1.25,
        bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.9),
    )


def draw(fig):
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 130)
    ax.set_ylim(0, 86)
    ax.set_axis_off()

    # Title and legend.
    ax.text(1.5, 83.3, "streamrec — data flow", fontsize=15, fontweight="bold", va="center", color="#111827")
    legend = [("external", "external"), ("streaming", "streaming/"), ("training", "training/"),
              ("serving", "services/"), ("ops", "ops side note")]
    for lx, (group, name) in zip((66, 77.5, 90.5, 103, 115.5), legend):
        fill, edge = COLOURS[group]
        ax.add_patch(Rectangle((lx, 82.4), 2.2, 1.8, facecolor=fill, edgecolor=edge, linewidth=1.2))
        ax.text(lx + 3.0, 83.3, name, fontsize=BODY_PT, va="center", color="#1f2937")

    # Swim lanes, one per package.
    for group, y0, y1, name in (("streaming", 55, 81, "STREAMING"), ("training", 30, 54, "TRAINING"), ("serving", 2, 29, "SERVING")):
        ax.add_patch(Rectangle((0.8, y0), 128.4, y1 - y0, facecolor=LANE_TINT[group], edgecolor="none"))
        ax.text(2.6, (y0 + y1) / 2, name, rotation=90, ha="center", va="center", fontsize=10,
                fontweight="bold", color=COLOURS[group][1])

    # --- streaming: producers -> Kafka -> ingest -> online store + offline log ---
    prod = box(ax, 6, 61, 17, 15, "Producers", ["apps: click events", "catalog publishers", "JSON over Kafka"], group="external")
    box(ax, 31, 56.5, 20, 23.5, "Kafka topics", ["key: user_id / item_id"], group="streaming", top=True)
    ev = pill(ax, 32.5, 70.5, 17, 3.0, "events", group="streaming")
    it = pill(ax, 32.5, 65.0, 17, 3.0, "items", group="streaming")
    dlq = pill(ax, 32.5, 58.0, 17, 3.0, "events.dlq", group="streaming")
    ingest = box(ax, 58, 59.5, 23, 17, "Ingest consumers", ["`streamrec ingest`", "decode + validate",
                 "idempotent writes", "commit offsets when durable"], group="streaming")
    redis = box(ax, 89, 67.5, 31, 12.5, "Redis online store", ["recent items per user · item metadata",
                "live catalog + change log · popularity"], group="streaming")
    parquet = box(ax, 89, 56.5, 31, 9, "Parquet offline log", ["files named topic / partition / offsets"], group="streaming")

    arrow(ax, (prod["right"][0], ev["left"][1]), ev["left"])
    arrow(ax, (prod["right"][0], it["left"][1]), it["left"])
    arrow(ax, ev["right"], (ingest["left"][0], ev["right"][1]))
    arrow(ax, it["right"], (ingest["left"][0], it["right"][1]))
    arrow(ax, (ingest["left"][0], dlq["right"][1] + 1.8), (dlq["right"][0], dlq["right"][1] + 0.3))
    label(ax, 54.0, 63.4, "bad records")
    arrow(ax, (ingest["right"][0], 71.5), (redis["left"][0], 73.5))
    arrow(ax, (ingest["right"][0], 64.5), (parquet["left"][0], 61.5))

    # --- training: feature job -> feature tables -> LoRA fine-tune -> registry (right to left) ---
    feat = box(ax, 93, 36, 27, 14, "Feature job (Ray Data)", ["periodic, incremental", "over the new log files"], group="training")
    tables = box(ax, 69, 36, 17, 14, "Feature tables", ["training sequences", "popularity · trending", "co-visitation"], group="training")
    tune = box(ax, 36, 36, 26, 14, "Ray Train LoRA fine-tune", ["pretrained LM (MiniLM), frozen", "+ LoRA adapter (peft)",
               "quality gate vs current"], group="training")
    registry = box(ax, 6, 36, 23, 14, "Adapter registry", ["versions per scene", "precomputed item", "embeddings"], group="training")

    arrow(ax, (parquet["bottom"][0], parquet["bottom"][1]), (feat["top"][0], feat["top"][1]))
    label(ax, parquet["bottom"][0] + 1.2, 53.2, "new files", ha="left")
    arrow(ax, feat["left"], tables["right"])
    arrow(ax, tables["left"], tune["right"])
    label(ax, 65.5, 46.6, "Parquet")
    arrow(ax, tune["left"], registry["right"])
    label(ax, 32.5, 46.9, "publish\nif gate\npasses")

    # --- serving: clients <-> Ray Serve Api; Api reads registry and Redis ---
    clients = box(ax, 6, 9, 25, 14, "HTTP clients (apps, web)", ["`GET|POST /v1/recommendations`",
                  "`GET /v1/items/{id}/similar`"], group="external")
    serve = box(ax, 41, 5.5, 44, 21, "Ray Serve replicas", ["`services.serve_app.Api`", "FastAPI ingress under /v1", "hot reload: load in background, atomic swap",
                "multiplexed scene@version LoRA adapters", "FAISS index over item embeddings",
                "falls back to popular items if Redis is down"], group="serving")
    sre = box(ax, 93, 4, 33, 10.5, "SRE side note", ["/metrics scraped by Prometheus", "k8s/ manifests: KubeRay, Strimzi, Redis"],
              group="ops", dashed=True)

    arrow(ax, clients["right"], (serve["left"][0], clients["right"][1]), both=True)
    label(ax, 36, 18.4, "JSON")
    arrow(ax, (registry["bottom"][0] + 4, registry["bottom"][1]), (serve["top"][0] - 14, serve["top"][1]), rad=0.15)
    label(ax, 33, 30.8, "watch: new versions,\nadapters + item embeddings")
    # Redis -> Serve: around the right edge of the training lane.
    arrow(ax, redis["right"], (125, redis["right"][1]), (125, 21), (serve["right"][0], 21))
    label(ax, 105, 24.3, "per request: recent items of the user\nfollows the catalog change log")
    arrow(ax, (serve["right"][0], 10), (sre["left"][0], 10), dashed=True, color=COLOURS["ops"][1])
    label(ax, 89, 12.0, "/metrics", color=COLOURS["ops"][1])


def render(out_dir: Path | str = HERE) -> tuple[Path, Path]:
    """Draw the picture and write dataflow.png and dataflow.svg into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / "dataflow.png", out_dir / "dataflow.svg"
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # ignore any matplotlibrc; restored when the context ends
        matplotlib.rcParams.update(RC)
        fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, facecolor="white")
        draw(fig)
        fig.savefig(png, dpi=DPI, metadata=PNG_METADATA)
        fig.savefig(svg, metadata=SVG_METADATA)
    return png, svg


if __name__ == "__main__":
    for path in render(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
