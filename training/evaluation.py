"""Offline evaluation: one protocol and one set of metrics for every model (LoRA-tuned LM, baselines,
SASRec); the evaluation harness (`training/eval_harness.py`) runs them all.

Protocol (the splits themselves live in `training/corpus.py`):

- Leave-one-out by time per user: the last interaction is the test target, the second last the
  validation target (equal timestamps keep the order of the source). `Split.test` / `Split.valid`.
- Ranking over **all** live items of the catalog; the items in the user's history are excluded
  (`exclude_seen=True`), deleted items (`live` False) are never candidates.
- Cold start (`cold_start_split`): 20 % of the interacted items are removed, with all their
  interactions, from training; evaluated are the users whose test item is cold. Candidates are
  still all live items (warm and cold), so a content-free model (popularity, co-visitation)
  cannot hit: it gives cold items its lowest scores.

Metrics (`evaluate`, keys `METRIC_KEYS`; the names say 10, they hold @`k`):

- recall10: share of cases whose target is in the top k (hit rate; one target per case);
- ndcg10: mean of 1/log2(rank + 2) over hits (0 for misses), rank 0-based;
- mrr10: mean of 1/(rank + 1) over hits (0 for misses);
- coverage10: |union of all top-k lists| / number of live items;
- diversity10: mean over cases of the mean pairwise cosine distance (1 - cos) between the
  top-k items, with `ref_embeddings` (rows L2-normalized here; an all-zero row stays zero,
  i.e. distance 1 to everything); NaN without `ref_embeddings`.
- n: number of cases.

Ranking rules (deterministic; a model gains nothing from ties):

- order = score descending, then item index ascending;
- rank of the target = #(candidates with score > s_t) + #(candidates with score == s_t and a
  lower index than the target);
- the top-k lists use the same order (a constant scorer's top k are items 0..k-1);
- NaN scores count as -inf; a -inf the *scorer* returns is still a candidate (ranked last, by
  index), only `evaluate`'s own masks (non-live, seen) remove items;
- a case whose target is not a candidate -- a deleted (non-live) item, or, with
  `exclude_seen`, an item already in the user's history (a repeat) -- is kept in `n` and
  counted as a miss: the protocol's denominator does not depend on the model.

Per case: `evaluate(..., return_ranks=True)` also returns each case's target rank, and
`case_metrics(ranks)` the per-case NDCG/Recall/MRR whose means are the figures above -- what the
bootstrap intervals of `training/bootstrap.py` resample (users are the unit).

Reports: `results_table_markdown` (rows = models, columns = metrics of the "test" protocol then
Recall/NDCG of every other protocol, e.g. "cold"; best value of each column in bold; a missing
protocol shows "—"; optional 95% intervals after NDCG/Recall) and `save_report`
(`evaluation.json`, `evaluation.md`, `evaluation.png`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from training.corpus import EvalSet

METRIC_KEYS = ("recall10", "ndcg10", "mrr10", "coverage10", "diversity10")
PRIMARY_PROTOCOL = "test"


@runtime_checkable
class Scorer(Protocol):
    """A model under evaluation: scores every item of the catalog for a batch of users.

    `histories[r]`: the user's item indices (int32, chronological), `history_ts[r]` their epoch-ms
    timestamps, `now_ts[r]` the time of the target interaction. Returns (B, n_items) scores,
    float32, higher = better. `evaluate` masks seen and non-live items itself.
    Optional attribute `content_free` (bool): the model cannot score items without interactions.
    """

    name: str

    def score(self, histories: list[np.ndarray], history_ts: list[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        ...


# --- ranking ---------------------------------------------------------------------------------


def candidate_mask(histories: Sequence[np.ndarray], live: np.ndarray, exclude_seen: bool = True) -> np.ndarray:
    """(B, n_items) bool: True where the item is a candidate (live, and unseen with `exclude_seen`)."""
    live = np.asarray(live, dtype=bool)
    mask = np.broadcast_to(live, (len(histories), len(live))).copy()
    if exclude_seen and len(histories):
        lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        if lens.sum():
            rows = np.repeat(np.arange(len(histories)), lens)
            cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            mask[rows, cols] = False
    return mask


def _clean_scores(scores: Any, shape: tuple[int, int]) -> np.ndarray:
    s = np.array(scores, copy=True)  # never write into the scorer's arrays
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float32)
    if s.shape != shape:
        raise ValueError(f"scorer returned shape {s.shape}, expected {shape} (batch, n_items)")
    s[np.isnan(s)] = -np.inf
    return s


def target_ranks(scores: np.ndarray, targets: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """0-based rank of each target among the candidates (score desc, then index asc).

    A target that is not a candidate gets rank `n_items` (a miss at any k).
    `scores` must already have NaN replaced (see `_clean_scores`).
    """
    b, n = scores.shape
    rows = np.arange(b)
    targets = np.asarray(targets, dtype=np.int64)
    s_t = scores[rows, targets][:, None]
    idx = np.arange(n)[None, :]
    better = (scores > s_t) | ((scores == s_t) & (idx < targets[:, None]))
    ranks = np.count_nonzero(better & candidates, axis=1).astype(np.int64)
    ranks[~candidates[rows, targets]] = n
    return ranks


def top_k(scores: np.ndarray, k: int, candidates: np.ndarray) -> np.ndarray:
    """(B, k) item indices in ranking order (score desc, index asc); -1 pads rows with < k candidates."""
    b, n = scores.shape
    kk = min(k, n)
    s = np.where(candidates, scores, -np.inf)
    if kk == 0 or b == 0:
        return np.full((b, k), -1, dtype=np.int64)
    # k-th largest value per row; everything above it is in, ties at it are taken by index.
    kth = -np.partition(-s, kk - 1, axis=1)[:, kk - 1][:, None]
    greater = (s > kth) & candidates
    equal = (s == kth) & candidates
    need = kk - np.count_nonzero(greater, axis=1)
    take = equal & (np.cumsum(equal, axis=1) <= need[:, None])
    r, c = np.nonzero(greater | take)  # row-major: within a row, index ascending
    order = np.lexsort((c, -s[r, c], r))
    r, c = r[order], c[order]
    starts = np.searchsorted(r, np.arange(b))
    pos = np.arange(len(r)) - starts[r]
    out = np.full((b, k), -1, dtype=np.int64)
    out[r, pos] = c
    return out


def _normalized(emb: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norms, 1e-12)


def intra_list_diversity(top: np.ndarray, unit_embeddings: np.ndarray) -> np.ndarray:
    """Per row: mean pairwise (1 - cosine) among the listed items (-1 = padding); NaN if < 2 items."""
    valid = top >= 0
    e = unit_embeddings[np.where(valid, top, 0)] * valid[..., None]
    gram = np.einsum("bkd,bjd->bkj", e, e)
    m = valid.sum(axis=1).astype(np.float64)
    pair_sum = gram.sum(axis=(1, 2)) - np.einsum("bkk->b", gram)  # ordered pairs i != j
    n_pairs = m * (m - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pairs > 0, 1.0 - pair_sum / np.maximum(n_pairs, 1), np.nan)


# --- evaluation ------------------------------------------------------------------------------


def case_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-case ranking metrics from 0-based target ranks (`evaluate(..., return_ranks=True)`).

    Returns float64 arrays, one value per case: "ndcg10" (1/log2(rank + 2) on a hit, else 0),
    "recall10" (1.0 on a hit, else 0.0) and "mrr10" (1/(rank + 1) on a hit, else 0); a hit is
    rank < k (the names say 10, they hold @k). A rank >= n_items (target not a candidate) is a
    miss. Their means are exactly `evaluate`'s figures: `evaluate` computes them with this
    function. These are what `training/bootstrap.py` resamples.
    """
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    ranks = np.asarray(ranks, dtype=np.int64)
    hit = ranks < k
    safe = np.where(hit, ranks, 0).astype(np.float64)
    return {
        "ndcg10": np.where(hit, 1.0 / np.log2(safe + 2.0), 0.0),
        "recall10": hit.astype(np.float64),
        "mrr10": np.where(hit, 1.0 / (safe + 1.0), 0.0),
    }


def evaluate(scorer: Scorer, cases: EvalSet, *, live: np.ndarray, k: int = 10,
             ref_embeddings: np.ndarray | None = None, batch_size: int = 256, exclude_seen: bool = True,
             progress: bool = False, return_ranks: bool = False
             ) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """Score `cases` with `scorer` under the protocol above; returns METRIC_KEYS + "n".

    With `return_ranks=True` returns `(metrics, ranks)` instead: `ranks` (int64, one per case, in
    the order of `cases`) is each target's 0-based rank among the candidates, `n_items` for a
    target that is not a candidate. `case_metrics(ranks, k)` gives the per-case values whose means
    are `metrics` -- the input of the bootstrap intervals, without scoring the cases twice.
    """
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    live = np.asarray(live, dtype=bool)
    n_items = len(live)
    n_cases = len(cases)
    unit = None
    if ref_embeddings is not None:
        if len(ref_embeddings) != n_items:
            raise ValueError(f"ref_embeddings has {len(ref_embeddings)} rows, the catalog {n_items} items")
        unit = _normalized(ref_embeddings)
    ranks_all: list[np.ndarray] = []
    div_all: list[np.ndarray] = []
    covered = np.zeros(n_items, dtype=bool)
    starts = range(0, n_cases, max(1, batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=math.ceil(n_cases / max(1, batch_size)), desc=f"eval {getattr(scorer, 'name', '?')}",
                      unit="batch")
    for lo in starts:
        hi = min(lo + batch_size, n_cases)
        hist = cases.histories[lo:hi]
        raw = scorer.score(hist, cases.history_ts[lo:hi], cases.target_ts[lo:hi])
        scores = _clean_scores(raw, (hi - lo, n_items))
        cand = candidate_mask(hist, live, exclude_seen)
        ranks_all.append(target_ranks(scores, cases.targets[lo:hi], cand))
        top = top_k(scores, k, cand)
        covered[top[top >= 0]] = True
        if unit is not None:
            div_all.append(intra_list_diversity(top, unit))
    if not n_cases:
        empty = {**{key: float("nan") for key in METRIC_KEYS}, "n": 0}
        return (empty, np.zeros(0, dtype=np.int64)) if return_ranks else empty
    ranks = np.concatenate(ranks_all)
    per_case = case_metrics(ranks, k)
    n_live = int(live.sum())
    div = np.concatenate(div_all) if div_all else np.array([np.nan])
    metrics = {
        "recall10": float(per_case["recall10"].mean()),
        "ndcg10": float(per_case["ndcg10"].mean()),
        "mrr10": float(per_case["mrr10"].mean()),
        "coverage10": float(covered.sum() / n_live) if n_live else float("nan"),
        "diversity10": float(np.nanmean(div)) if np.isfinite(div).any() else float("nan"),
        "n": int(n_cases),
    }
    return (metrics, ranks) if return_ranks else metrics


def evaluate_models(scorers: Mapping[str, Scorer], protocols: Mapping[str, tuple[EvalSet, np.ndarray]], *,
                    k: int = 10, ref_embeddings: np.ndarray | None = None, batch_size: int = 256,
                    exclude_seen: bool = True, progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """results[model][protocol] = evaluate(...) for every scorer and every (cases, live) protocol."""
    return {
        name: {proto: evaluate(scorer, cases, live=live, k=k, ref_embeddings=ref_embeddings, batch_size=batch_size,
                               exclude_seen=exclude_seen, progress=progress)
               for proto, (cases, live) in protocols.items()}
        for name, scorer in scorers.items()
    }


# --- reports ---------------------------------------------------------------------------------

CI_COLUMNS = ("ndcg10", "recall10")  # the metrics whose intervals the table shows (others would only widen it)
CI_DIGITS = 3  # an interval's ends: the third digit is already below the bootstrap's own run-to-run noise

_PRIMARY_COLUMNS = (("ndcg10", "NDCG@10"), ("recall10", "Recall@10"), ("mrr10", "MRR@10"),
                    ("coverage10", "Coverage@10"), ("diversity10", "Diversity"))
_SECONDARY_COLUMNS = (("recall10", "Recall@10"), ("ndcg10", "NDCG@10"))


def _protocols(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for per_model in results.values():
        for proto in per_model:
            if proto not in seen:
                seen.append(proto)
    if PRIMARY_PROTOCOL in seen:
        seen.remove(PRIMARY_PROTOCOL)
        seen.insert(0, PRIMARY_PROTOCOL)
    return seen


def report_columns(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(protocol, metric key, header) per column: all metrics of the first protocol ("test" when
    present), then Recall@10 and NDCG@10 of each other protocol, headed "<Protocol> ..."."""
    protos = _protocols(results)
    cols: list[tuple[str, str, str]] = []
    for i, proto in enumerate(protos):
        if i == 0:
            prefix = "" if proto == PRIMARY_PROTOCOL else f"{proto.capitalize()} "
            cols += [(proto, key, prefix + head) for key, head in _PRIMARY_COLUMNS]
        else:
            cols += [(proto, key, f"{proto.capitalize()} {head}") for key, head in _SECONDARY_COLUMNS]
    return cols


def _value(results: Mapping[str, Mapping[str, Any]], model: str, proto: str, key: str) -> float | None:
    v = (results.get(model) or {}).get(proto) or {}
    v = v.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _interval(ci: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]] | None, model: str, proto: str,
              key: str) -> tuple[float, float] | None:
    if ci is None or key not in CI_COLUMNS:
        return None
    v = ((ci.get(model) or {}).get(proto) or {}).get(key)
    if v is None or len(v) != 2 or v[0] is None or v[1] is None:
        return None
    lo, hi = float(v[0]), float(v[1])
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def results_table_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]], *, digits: int = 4,
                           ci: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]] | None = None) -> str:
    """Markdown table: one row per model, one column per (protocol, metric); best in bold.

    A missing protocol or a NaN metric shows "—" and never counts as best; ties for best are all bold.
    `ci[model][protocol][metric] = [lo, hi]` (optional, e.g. from `training.bootstrap`): the
    NDCG@10 and Recall@10 cells (`CI_COLUMNS`) that have one show it after the point value,
    `0.1275 [0.118, 0.137]` (`CI_DIGITS`); bold still marks the best point value only.
    """
    cols = report_columns(results)
    models = list(results)
    header = "| Model | " + " | ".join(h for _, _, h in cols) + " |"
    sep = "|---|" + "|".join("---:" for _ in cols) + "|"
    best = []
    for proto, key, _ in cols:
        vals = [v for m in models if (v := _value(results, m, proto, key)) is not None]
        best.append(round(max(vals), digits) if vals else None)
    lines = [header, sep]
    for m in models:
        cells = []
        for (proto, key, _), b in zip(cols, best):
            v = _value(results, m, proto, key)
            if v is None:
                cells.append("—")
                continue
            text = f"{v:.{digits}f}"
            text = f"**{text}**" if b is not None and round(v, digits) == b else text
            iv = _interval(ci, m, proto, key)
            cells.append(text if iv is None else f"{text} [{iv[0]:.{CI_DIGITS}f}, {iv[1]:.{CI_DIGITS}f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> null, numpy scalars/arrays -> Python, Paths -> str (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_results(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, float]]]]:
    """Read an `evaluation.json` back: (meta, results), null metrics as NaN."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    results = {m: {p: {k: (float("nan") if v is None else v) for k, v in metrics.items()}
                   for p, metrics in protos.items()}
               for m, protos in data["results"].items()}
    return data.get("meta", {}), results


def plot_results(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> Path:
    """Grouped bar chart: per model NDCG@10 and Recall@10 (test) and Recall@10 of the other protocols."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = _protocols(results)
    series: list[tuple[str, str, str]] = []
    if protos:
        first = protos[0]
        pre = "" if first == PRIMARY_PROTOCOL else f"{first} "
        series += [(first, "ndcg10", f"{pre}NDCG@10"), (first, "recall10", f"{pre}Recall@10")]
        series += [(p, "recall10", f"{p.capitalize()} Recall@10") for p in protos[1:]]
    models = list(results)
    x = np.arange(len(models))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(models) + 2), 4.2))
    for j, (proto, key, label) in enumerate(series):
        vals = [_value(results, m, proto, key) or 0.0 for m in models]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(x, models, rotation=15 if len(models) > 4 else 0)
    ax.set_ylabel("metric @10")
    ax.set_title("Offline evaluation (leave-one-out, all-item ranking)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_report(out_dir: Path, results: Mapping[str, Mapping[str, Mapping[str, float]]], *,
                meta: Mapping[str, Any],
                ci: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]] | None = None) -> dict[str, Path]:
    """Write evaluation.json ({"meta", "results"}, NaN as null; with `ci` also "ci95":
    ci[model][protocol][metric] = [lo, hi]), evaluation.md (the table, intervals shown when `ci`
    is given, see `results_table_markdown`) and evaluation.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md", "png": out_dir / "evaluation.png"}
    doc: dict[str, Any] = {"meta": dict(meta), "results": results}
    if ci is not None:
        doc["ci95"] = ci
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    lines = ["# Offline evaluation", ""]
    for key, value in _jsonable(dict(meta)).items():
        lines.append(f"- {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if meta:
        lines.append("")
    lines.append(results_table_markdown(results, ci=ci))
    counts = _case_counts(results)
    if counts:
        lines.append("Cases: " + ", ".join(f"{p} n={n}" for p, n in counts.items()) + ".")
    if ci is not None:
        lines.append("[lo, hi]: 95% bootstrap interval over users (training/bootstrap.py).")
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_results(results, paths["png"])
    return paths


def _case_counts(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for proto in _protocols(results):
        for per_model in results.values():
            n = (per_model.get(proto) or {}).get("n")
            if n is not None:
                counts[proto] = int(n)
                break
    return counts


__all__ = [
    "CI_COLUMNS", "CI_DIGITS", "METRIC_KEYS", "Scorer", "candidate_mask", "case_metrics", "evaluate", "evaluate_models", "intra_list_diversity", "load_results",
    "plot_results", "report_columns", "results_table_markdown", "save_report", "target_ranks", "top_k",
]

