"""What the tuned sequential baselines (`training/sasrec.py`, `training/gru4rec.py`) share: config
bounds, sequence batching, seeded training, the cold-item rule, early stopping on validation and
the grid search.

The selection rule both follow (the issue's, and the same budget our model gets): a small grid of
configurations, each trained for at most `max_epochs` epochs with early stopping on validation
NDCG@10 (`training.evaluation.evaluate` on the validation cases, every `eval_every` epochs, stop
after `patience` evaluations without a gain, keep the best epoch's weights); the configuration
with the best validation NDCG@10 wins. Nothing here receives the test cases.

Sequences: item index i is row i + 1 of every ID table (0 = padding). A user's training example
is the last `max_len` + 1 items of their training sequence: the first `max_len` are the inputs,
each one's target is the item after it (SASRec's reference sampler; GRU4Rec trains the same way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from training.corpus import EvalSet
from training.evaluation import Scorer, evaluate

COLD_SCORE = -1.0e4  # every item without training interactions gets exactly this: they rank last, by index
WARM_FLOOR = COLD_SCORE / 2  # warm items' scores are clipped above it, so none can sink below a cold one
SCORE_BATCH = 512  # histories per forward pass when scoring
# torch intra-op threads while fitting (restored after; None = leave torch's setting). These ops
# are small (128 sequences x <= 200 positions x <= 100 dims): on the shared 2-core machine two
# threads spun against each other and another process, 13.5 s per SASRec epoch on MovieLens-100K
# against 0.5 s with one.
FIT_THREADS = 1
LENGTH_JITTER = 0.25  # relative noise on the length key that groups examples into batches


# --- configs ------------------------------------------------------------------------------------


def check_bounds(cfg: Any) -> None:
    """Raise ValueError naming the field and value when a config field is outside the bounds in
    its metadata (`min`, `max` inclusive; `max_open`: exclusive upper bound)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        lo, hi, hi_open = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("max_open")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi) and (hi_open is None or value < hi_open)
        if not ok:
            upper = f"<= {hi}" if hi is not None else (f"< {hi_open}" if hi_open is not None else "")
            allowed = " and ".join(s for s in (f">= {lo}" if lo is not None else "", upper) if s)
            raise ValueError(f"{type(cfg).__name__}: {f.name}={value!r} is out of range: must be {allowed}")


def bounded(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            max_open: float | None = None) -> Any:
    """A dataclass field with help text and the bounds `check_bounds` enforces."""
    meta = {"help": help, "min": min, "max": max, "max_open": max_open}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def config_key(cfg: Any, names: Sequence[str]) -> str:
    """A grid point's name in the tuning record, e.g. 'dropout=0.2,max_len=50,hidden=50'."""
    return ",".join(f"{n}={getattr(cfg, n)}" for n in names)


def grid_configs(base: Any, grid: Mapping[str, Sequence[Any]]) -> list[Any]:
    """Every combination of the grid's values applied to `base` (grid order, last name fastest)."""
    names = list(grid)
    for n in names:
        if n not in {f.name for f in dataclasses.fields(base)}:
            raise ValueError(f"grid names {n!r}, which is not a field of {type(base).__name__}")
    return [dataclasses.replace(base, **dict(zip(names, combo))) for combo in itertools.product(*grid.values())]


# --- data ---------------------------------------------------------------------------------------


def pad_rows(seqs: Sequence[np.ndarray], max_len: int, pad: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_len) int64 of each sequence's last `max_len` values (already shifted to rows) and
    their lengths; `pad="left"` aligns the last value to the last column, "right" the first to 0."""
    if pad not in ("left", "right"):
        raise ValueError(f"pad={pad!r}: 'left' or 'right'")
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    lens = np.zeros(len(seqs), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-max_len:] if max_len else np.zeros(0, dtype=np.int64)
        lens[r] = len(s)
        if len(s):
            if pad == "left":
                out[r, -len(s):] = s
            else:
                out[r, :len(s)] = s
    return out, lens


@dataclass
class SequenceExamples:
    """One training example per user with >= 2 training items: `inputs`/`targets` (N, max_len),
    rows = item index + 1 (0 = padding), target j = the item after input j; `users` indexes
    `train_items` (for SASRec's negatives, which avoid the user's whole training sequence)."""

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


def sequence_examples(train_items: Sequence[np.ndarray], max_len: int, pad: str) -> SequenceExamples:
    users = [u for u, s in enumerate(train_items) if len(s) >= 2]
    if not users:
        raise ValueError("no user has 2 or more training items: nothing to train a sequential baseline on")
    tails = [np.asarray(train_items[u], dtype=np.int64)[-(max_len + 1):] + 1 for u in users]
    inputs, lens = pad_rows([t[:-1] for t in tails], max_len, pad)
    targets, _ = pad_rows([t[1:] for t in tails], max_len, pad)
    return SequenceExamples(inputs, targets, lens, np.asarray(users, dtype=np.int64))


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch's batches: every example once, batches of similar length (sorted by length times a
    random factor in [1 - LENGTH_JITTER, 1 + LENGTH_JITTER], so batches differ between epochs),
    in random order. Similar lengths let `trim_batch` drop most padding: on MovieLens-100K at
    max_len 200 that is less than half the tokens and a third of the attention of random batches."""
    lengths = np.asarray(lengths, dtype=np.float64)
    key = lengths * rng.uniform(1.0 - LENGTH_JITTER, 1.0 + LENGTH_JITTER, size=len(lengths))
    order = np.argsort(key, kind="stable")
    batches = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    for b in rng.permutation(len(batches)):
        yield batches[b]


def trim_batch(rows: np.ndarray, lengths: np.ndarray, pad: str) -> np.ndarray:
    """Drop the columns that are padding in every row of the batch (the leading ones for left
    padding, the trailing ones for right padding); at least one column is kept."""
    width = max(1, int(lengths.max())) if len(lengths) else 1
    return rows[:, -width:] if pad == "left" else rows[:, :width]


def train_counts(train_items: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    flat = [np.asarray(s, dtype=np.int64) for s in train_items if len(s)]
    if not flat:
        return np.zeros(n_items, dtype=np.int64)
    return np.bincount(np.concatenate(flat), minlength=n_items).astype(np.int64)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to `threads` inside (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed: int, threads: int | None = FIT_THREADS) -> Iterator[None]:
    """Inside: torch's global RNG (initialization, dropout) seeded and the intra-op threads set
    (`torch_threads`); both restored after, so the same seed gives the same model without
    disturbing the caller's random state or thread setting."""
    with torch.random.fork_rng(devices=[]), torch_threads(threads):
        torch.manual_seed(int(seed))
        yield


# --- scoring ------------------------------------------------------------------------------------


class SequenceScorer:
    """Scorer protocol over a trained network: `user_states(inputs, lengths)` -> (B, d) and the item
    table (rows 1..n) give dot-product scores; items without training interactions get
    `COLD_SCORE` (content-free: such a model knows nothing about them), every warm item more."""

    name = "sequence"
    content_free = True
    pad = "left"

    def __init__(self, net: nn.Module, config: Any, warm: np.ndarray) -> None:
        self.net, self.config = net, config
        self.warm = np.asarray(warm, dtype=bool)

    def score(self, histories: list[np.ndarray], history_ts: list[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        was_training = self.net.training
        self.net.eval()
        out = np.empty((len(histories), len(self.warm)), dtype=np.float32)
        try:
            with torch.no_grad(), torch_threads(FIT_THREADS):
                for lo in range(0, len(histories), SCORE_BATCH):
                    rows = [np.asarray(h, dtype=np.int64) + 1 for h in histories[lo:lo + SCORE_BATCH]]
                    inputs, lens = pad_rows(rows, self.config.max_len, self.pad)
                    inputs = trim_batch(inputs, lens, self.pad)
                    users = self.net.user_states(torch.from_numpy(inputs), torch.from_numpy(lens))
                    out[lo:lo + len(rows)] = (users @ self.net.item_emb.weight[1:].T).numpy()
        finally:
            self.net.train(was_training)
        np.maximum(out, WARM_FLOOR, out=out)
        out[:, ~self.warm] = COLD_SCORE
        return out


# --- early stopping and the grid ----------------------------------------------------------------


@dataclass
class FitResult:
    """One early-stopped training run: the best validation NDCG@10 and the epoch it was reached."""

    best_ndcg10: float
    best_epoch: int
    epochs_run: int
    seconds: float
    curve: list[tuple[int, float]]


def fit_early_stopping(net: nn.Module, train_epoch: Callable[[], float], scorer: Scorer, valid: EvalSet,
                       live: np.ndarray, *, max_epochs: int, eval_every: int, patience: int,
                       label: str = "", progress: bool = False) -> FitResult:
    """Train `net` with `train_epoch` (one epoch per call), evaluate `scorer` (which reads `net`) on
    `valid` every `eval_every` epochs; stop after `patience` evaluations without a gain or at
    `max_epochs`. `net` ends with the best evaluation's weights."""
    for name, v, lo in (("max_epochs", max_epochs, 1), ("eval_every", eval_every, 1), ("patience", patience, 1)):
        if v < lo:
            raise ValueError(f"{name}={v}: must be >= {lo}")
    start = time.perf_counter()
    best, best_epoch, best_state, bad, epoch = -1.0, 0, None, 0, 0
    curve: list[tuple[int, float]] = []
    for epoch in range(1, max_epochs + 1):
        net.train()
        loss = train_epoch()
        if epoch % eval_every and epoch != max_epochs:
            continue
        ndcg = float(evaluate(scorer, valid, live=live)["ndcg10"])
        curve.append((epoch, ndcg))
        if progress:
            print(f"  {label} epoch {epoch}: loss {loss:.4f} valid ndcg10 {ndcg:.4f}", flush=True)
        if ndcg > best:
            best, best_epoch, bad = ndcg, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return FitResult(best, best_epoch, epoch, time.perf_counter() - start, curve)


Build = Callable[[Sequence[np.ndarray], int, Any, int], tuple[nn.Module, Callable[[], float], "SequenceScorer"]]
"""(train_items, n_items, config, seed) -> (network, one-epoch training step returning the mean loss, its scorer)."""


def fit_fixed(build: Build, train_items: Sequence[np.ndarray], n_items: int, config: Any, epochs: int,
              seed: int, threads: int | None = FIT_THREADS) -> SequenceScorer:
    """Train one configuration for exactly `epochs` epochs (no validation): e.g. the cold-start
    protocol's model, with the configuration and epoch count tuned on the main protocol."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: must be >= 1")
    with seeded(seed, threads):
        net, train_epoch, scorer = build(train_items, n_items, config, seed)
        net.train()
        for _ in range(epochs):
            train_epoch()
        net.eval()
    return scorer


def tune_grid(model: str, build: Build, base: Any, grid: Mapping[str, Sequence[Any]],
              train_items: Sequence[np.ndarray], valid: EvalSet, live: np.ndarray, n_items: int, *,
              max_epochs: int, eval_every: int, patience: int, seed: int = 0,
              threads: int | None = FIT_THREADS, progress: bool = False) -> tuple[SequenceScorer, dict[str, Any]]:
    """Fit every grid point (same seed) with early stopping on `valid`; return the best validation
    NDCG@10's scorer (first in grid order on a tie) and a JSON-able record of every point and the
    choice (`chosen`, `chosen_config`, `chosen_epochs` = the best epoch, for `fit_fixed`)."""
    configs = grid_configs(base, grid)
    if not configs:
        raise ValueError(f"the {model} grid is empty: give every grid name at least one value")
    if len(live) != n_items:
        raise ValueError(f"live has {len(live)} entries, the catalog n_items={n_items}")
    names = list(grid)
    budget = {"max_epochs": max_epochs, "eval_every": eval_every, "patience": patience, "seed": seed,
              "threads": threads}
    record: dict[str, Any] = {"model": model, "selection": "validation ndcg10 only (the test split is never read)",
                              "grid": {n: list(v) for n, v in grid.items()}, "budget": budget, "configs": {}}
    best_scorer, best_key, best_val = None, "", -1.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for cfg in configs:
        key = config_key(cfg, names)
        started, cpu_started = time.perf_counter(), time.process_time()
        with seeded(seed, threads):
            net, train_epoch, scorer = build(train_items, n_items, cfg, seed)
            res = fit_early_stopping(net, train_epoch, scorer, valid, live, max_epochs=max_epochs,
                                     eval_every=eval_every, patience=patience, label=key, progress=progress)
        record["configs"][key] = {"valid_ndcg10": res.best_ndcg10, "best_epoch": res.best_epoch,
                                  "epochs_run": res.epochs_run, "seconds": round(time.perf_counter() - started, 2),
                                  "cpu_seconds": round(time.process_time() - cpu_started, 2),
                                  "curve": [list(point) for point in res.curve]}
        if progress:
            print(f"{model} {key}: valid ndcg10 {res.best_ndcg10:.4f} at epoch {res.best_epoch} "
                  f"({res.epochs_run} epochs, {record['configs'][key]['seconds']:.1f} s)", flush=True)
        if res.best_ndcg10 > best_val:
            best_scorer, best_key, best_val = scorer, key, res.best_ndcg10
    record["chosen"] = best_key
    record["chosen_config"] = dataclasses.asdict(best_scorer.config)
    record["chosen_epochs"] = record["configs"][best_key]["best_epoch"]
    # wall seconds depend on what else runs; CPU seconds (one thread) are what a quiet machine takes
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    return best_scorer, record


__all__ = [
    "COLD_SCORE",
    "FIT_THREADS",
    "LENGTH_JITTER",
    "SCORE_BATCH",
    "WARM_FLOOR",
    "Build",
    "FitResult",
    "SequenceExamples",
    "SequenceScorer",
    "bounded",
    "check_bounds",
    "config_key",
    "epoch_batches",
    "fit_early_stopping",
    "fit_fixed",
    "grid_configs",
    "pad_rows",
    "seeded",
    "sequence_examples",
    "torch_threads",
    "train_counts",
    "trim_batch",
    "tune_grid",
]
