"""Two-stage recommendation: retrieve candidates, rank them with the learned ranker, calibrate new items.

    rank_request(...)          one request (serving calls this; so does evaluation, per case)
    TwoStageScorer             the `training.evaluation.Scorer` of the full model (`finetuned`)
    fit_two_stage(split, base) the ranker trained on `split.valid`, the query weight chosen there

The order of a request, the same offline and online:

1. retrieval (`training/ranking_features.py`): the union of the towers' top-N, the co-visitation
   neighbours of the recent items, the trending items, the best new items, the query's top-N;
2. features of every candidate (`candidate_features`), scored by the ranker (`training/ranker.py`);
3. with a query: the query blend (`blend_query`; with no history the query alone decides);
4. new-item calibration (`training/calibration.py`): the user's recent share of new items becomes
   their share of the top k -- applied to the candidates, which always include the best new items.

Without a ranker (an adapter trained before it, or a corpus too small to train one) step 2 is the
first stage's own score: tower + beta x co-visitation prior, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from training.calibration import HISTORY_ITEMS, TOP_K, new_item_lift, new_item_slots
from training.corpus import EvalSet, Split
from training.covis import CovisPrior, SparseCovis
from training.inference import ModelScorer
from training.ranker import DEFAULT_QUERY_WEIGHT, Ranker, RankingData, blend_query, choose_query_weight, fit_ranker
from training.ranking_features import (
    Candidates,
    RetrievalSizes,
    TrendingClock,
    candidate_features,
    top_rows,
    trend_feature,
    union_candidates,
)

logger = logging.getLogger(__name__)

QUERY_WEIGHT_USERS = 200  # held-out histories on which the default query weight is chosen
RANKER_CASE_BATCH = 128


@dataclass
class RankInputs:
    """What one request brings: the user vector and the per-catalog-row signals (see rank_request)."""

    user: np.ndarray  # (dim,) user tower vector
    history: np.ndarray  # catalog rows, oldest first
    history_ts: np.ndarray  # epoch ms (<= 0: unknown)
    now_ts: int
    excluded: np.ndarray  # bool per row: seen, filtered or not live
    covis: np.ndarray | SparseCovis | None  # CovisPrior.feature over the catalog (dense or sparse), or None
    trend: np.ndarray  # trend_feature over the catalog
    query: np.ndarray | None = None  # query vector
    query_weight: float | None = None  # None: the ranker's default
    tower_top: np.ndarray | None = None  # the towers' top-N rows when an index found them (else computed here)
    trend_order: np.ndarray | None = None  # rows with trend > 0, trend desc then row asc, when the caller has it


@dataclass
class RankCatalog:
    """What does not change between requests: item vectors, popularity, newness, the prior, the ranker."""

    item_vectors: np.ndarray
    log_pop: np.ndarray
    is_new: np.ndarray
    prior: CovisPrior | None
    ranker: Ranker | None
    sizes: RetrievalSizes
    calibrate: bool = True
    new_rows: np.ndarray | None = None  # flatnonzero(is_new), derived when not given

    def __post_init__(self) -> None:
        if self.new_rows is None:
            self.new_rows = np.flatnonzero(self.is_new)

    @classmethod
    def build(cls, item_vectors: np.ndarray, counts: np.ndarray, is_new: np.ndarray, prior: CovisPrior | None,
              ranker: Ranker | None, sizes: RetrievalSizes, calibrate: bool = True) -> "RankCatalog":
        return cls(np.asarray(item_vectors, dtype=np.float32), np.log1p(np.asarray(counts, dtype=np.float64)),
                   np.asarray(is_new, dtype=bool), prior, ranker, sizes, calibrate)


def retrieve(cat: RankCatalog, r: RankInputs) -> tuple[Candidates, np.ndarray]:
    """The candidate set of one request and the towers' score of each candidate (candidate order).

    With `r.tower_top` (an approximate index found the towers' top-N) no source passes over the
    whole catalog's vectors: the new items are scored among themselves, the candidates alone get a
    tower score -- at 10^6 items one matrix-vector product over the catalog is ~20 ms. Without it
    (an exact index, evaluation) the tower scores every row once and the sources read that."""
    allowed = ~r.excluded
    sz = cat.sizes
    tower_all = None if r.tower_top is not None else cat.item_vectors @ r.user
    sources: dict[str, np.ndarray] = {}
    sources["tower"] = r.tower_top if tower_all is None else top_rows(tower_all, sz.tower, allowed)
    if r.covis is not None and len(r.history):
        if isinstance(r.covis, SparseCovis):
            sources["covis"] = r.covis.top(sz.covis, allowed)
        else:
            sources["covis"] = top_rows(r.covis, sz.covis, allowed & (r.covis > 0))
    sources["trending"] = trending_rows(r, sz.trending, allowed)
    if len(cat.new_rows):
        new = cat.new_rows[allowed[cat.new_rows]]  # ascending rows: top_rows' row tie-break is kept
        new_scores = tower_all[new] if tower_all is not None else cat.item_vectors[new] @ r.user
        sources["new"] = new[top_rows(new_scores, sz.new)]
    if r.query is not None:
        sources["query"] = top_rows(cat.item_vectors @ r.query, sz.query, allowed)
    cand = union_candidates(sources, r.excluded)
    tower = tower_all[cand.rows] if tower_all is not None else cat.item_vectors[cand.rows] @ r.user
    return cand, tower


TREND_PREFIX_MIN = 256  # trending rows tried before the whole order when the caller precomputed it


def trending_rows(r: RankInputs, n: int, allowed: np.ndarray) -> np.ndarray:
    """`top_rows(r.trend, n, allowed & (r.trend > 0))`, from `r.trend_order` when given: the first
    allowed rows of a prefix of it (the whole order only when the prefix has too few)."""
    if r.trend_order is None:
        return top_rows(r.trend, n, allowed & (r.trend > 0))
    order = r.trend_order
    head = order[:max(4 * n, TREND_PREFIX_MIN)]
    got = head[allowed[head]][:n]
    if len(got) < n and len(head) < len(order):
        got = order[allowed[order]][:n]
    return got


def trend_order(trend: np.ndarray) -> np.ndarray:
    """Rows with trend > 0, trend desc then row asc (what `trending_rows` reads)."""
    rows = np.flatnonzero(np.asarray(trend) > 0)
    return rows[np.lexsort((rows, -np.asarray(trend, dtype=np.float64)[rows]))]


def request_features(cat: RankCatalog, r: RankInputs, cand: Candidates) -> np.ndarray:
    return candidate_features(cand, user=r.user, item_vectors=cat.item_vectors, covis=r.covis,
                              knn=cat.prior.knn if cat.prior is not None else None, history=r.history,
                              history_ts=r.history_ts, now_ts=r.now_ts, log_pop=cat.log_pop, trend=r.trend,
                              is_new=cat.is_new, query=r.query)


def first_stage_scores(cat: RankCatalog, r: RankInputs, cand: Candidates, tower: np.ndarray) -> np.ndarray:
    """Tower (`tower`: the candidates' scores, as `retrieve` returns them) + beta x co-visitation."""
    s = np.asarray(tower, dtype=np.float64)
    if cat.prior is not None and cat.prior.beta > 0 and r.covis is not None:
        s = s + cat.prior.beta * r.covis[cand.rows]
    return s


def rank_request(cat: RankCatalog, r: RankInputs, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """(candidate rows, final scores) of one request, in candidate order (the caller sorts)."""
    return rank_requests(cat, [r], k)[0]


def rank_requests(cat: RankCatalog, requests: Sequence[RankInputs], k: int = TOP_K
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`rank_request` for a batch: the same per request, with one ranker call for the whole batch
    (a LightGBM predict costs ~0.5 ms however few its rows: per request it was most of the cost)."""
    staged = []
    for r in requests:
        cand, tower = retrieve(cat, r)
        first = first_stage_scores(cat, r, cand, tower) if len(cand) else np.zeros(0)
        x = request_features(cat, r, cand) if (cat.ranker is not None and len(cand)) else None
        staged.append((cand, first, x))
    xs = [x for _, _, x in staged if x is not None]
    if xs:
        ranked = cat.ranker.predict(np.concatenate(xs), np.concatenate([f for _, f, x in staged if x is not None]))
        ends = np.cumsum([len(x) for x in xs])
        pieces = iter(np.split(ranked, ends[:-1]))
    out = []
    for r, (cand, first, x) in zip(requests, staged):
        scores = next(pieces) if x is not None else first
        if not len(cand):
            out.append((cand.rows, scores))
            continue
        if r.query is not None:
            w = cat.ranker.query_weight if (r.query_weight is None and cat.ranker is not None) else r.query_weight
            w = DEFAULT_QUERY_WEIGHT if w is None else w
            scores = blend_query(scores, cat.item_vectors[cand.rows] @ r.query, w, has_history=len(r.history) > 0)
        if cat.calibrate:
            scores = calibrated(scores, cand.rows, cat.is_new, r.history, k)
        out.append((cand.rows, scores))
    return out


def calibrated(scores: np.ndarray, rows: np.ndarray, is_new: np.ndarray, history: np.ndarray, k: int) -> np.ndarray:
    """training/calibration.py over the candidates: the best m new candidates lifted into the top k."""
    new = is_new[rows]
    if not new.any() or new.all():
        return scores
    m = new_item_slots(is_new[np.asarray(history, dtype=np.int64)[-HISTORY_ITEMS:]], k)
    if m == 0:
        return scores
    lift = new_item_lift(scores[~new], scores[new], m, k)
    return scores + lift * new if lift > 0 else scores


class TwoStageScorer:
    """`Scorer` of the full model: per case `rank_request`; non-candidates score -inf (rank last)."""

    content_free = False

    def __init__(self, name: str, base: ModelScorer, cat: RankCatalog, trending: TrendingClock, live: np.ndarray
                 ) -> None:
        self.name, self.base, self.cat, self.trending = name, base, cat, trending
        self.live = np.asarray(live, dtype=bool)

    def requests(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray], now_ts: np.ndarray,
                 queries: Sequence[np.ndarray | None] | None = None) -> list[RankInputs]:
        users = self.base.user_vectors(histories, history_ts, now_ts)
        prior = self.cat.prior
        covis = prior.feature(histories, history_ts, now_ts) if prior is not None else None
        trend = trend_feature(self.trending.at(now_ts))
        out = []
        for b, (h, ts) in enumerate(zip(histories, history_ts)):
            excluded = ~self.live.copy()
            excluded[np.asarray(h, dtype=np.int64)] = True
            out.append(RankInputs(users[b], np.asarray(h, dtype=np.int64), np.asarray(ts, dtype=np.int64),
                                  int(now_ts[b]), excluded, covis[b] if covis is not None else None, trend[b],
                                  query=None if queries is None else queries[b]))
        return out

    def score(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray], now_ts: np.ndarray
              ) -> np.ndarray:
        out = np.full((len(histories), len(self.live)), -np.inf, dtype=np.float32)
        for b, (rows, s) in enumerate(rank_requests(self.cat, self.requests(histories, history_ts, now_ts))):
            out[b, rows] = s
        return out

    def case_requests(self, cases: EvalSet):
        """(request, target) per case, in batches of RANKER_CASE_BATCH users."""
        for lo in range(0, len(cases), RANKER_CASE_BATCH):
            hi = min(lo + RANKER_CASE_BATCH, len(cases))
            reqs = self.requests(cases.histories[lo:hi], cases.history_ts[lo:hi], cases.target_ts[lo:hi])
            yield from zip(reqs, (int(t) for t in cases.targets[lo:hi]))

    def training_groups(self, cases: EvalSet) -> tuple[RankingData, dict[str, float]]:
        """Features and labels of every case's candidates, and the retrieval's recall per source."""
        blocks, hits = [], _no_hits()
        for r, target in self.case_requests(cases):
            cand, tower = retrieve(self.cat, r)
            _count_hits(hits, cand, target)
            blocks.append((request_features(self.cat, r, cand), first_stage_scores(self.cat, r, cand, tower),
                           (cand.rows == target).astype(np.float32)))
        return RankingData.stack(blocks), _recall(hits, len(cases))

    def candidate_recall(self, cases: EvalSet) -> dict[str, float]:
        """How often the held-out item is among the candidates: per source and in total."""
        hits = _no_hits()
        for r, target in self.case_requests(cases):
            _count_hits(hits, retrieve(self.cat, r)[0], target)
        return _recall(hits, len(cases))


def _no_hits() -> dict[str, int]:
    return {s: 0 for s in ("tower", "covis", "trending", "new", "total")}


def _recall(hits: dict[str, int], n: int) -> dict[str, float]:
    return {s: v / max(n, 1) for s, v in hits.items()}


def _count_hits(hits: dict[str, int], cand: Candidates, target: int) -> None:
    at = np.flatnonzero(cand.rows == target)
    if len(at):
        hits["total"] += 1
        for s, rank in cand.ranks.items():
            if s in hits:
                hits[s] += int(np.isfinite(rank[at[0]]))


def fit_two_stage(split: Split, base: ModelScorer, *, sizes: RetrievalSizes, half_life_ms: float, seed: int = 0,
                  name: str = "finetuned") -> tuple[TwoStageScorer, dict[str, Any]]:
    """Train the ranker on `split.valid` (never `split.test`) over `base`'s retrieval, choose the
    default query weight on held-out histories; returns the scorer and a JSON-able record."""
    n = split.n_items
    counts = split.train_counts()
    cat = RankCatalog.build(base.items, counts, base.new_items, base.prior, None, sizes,
                            calibrate=bool(base.model.text is not None and base.model.cfg.new_item_calibration))
    trending = TrendingClock.from_sequences(split.train_items, split.train_ts, n, half_life_ms)
    scorer = TwoStageScorer(name, base, cat, trending, split.corpus.catalog.live)
    data, valid_recall = scorer.training_groups(split.valid)
    ranker = fit_ranker(data, seed=seed)
    cat.ranker = ranker
    if base.model.text is not None:
        ranker.query_weight, record = choose_query_weight(moved_share_at(scorer, split, seed))
        ranker.tuning["query_weight_moved_share"] = record
    logger.info("ranker trained on %d validation groups; validation candidate recall %s; query weight %.2f",
                len(data.groups), {k: round(v, 3) for k, v in valid_recall.items()}, ranker.query_weight)
    return scorer, {"valid_candidate_recall": valid_recall, "ranker": ranker.tuning,
                    "query_weight": ranker.query_weight}


def ranker_payload(scorer: TwoStageScorer, corpus: Any) -> dict[str, Any]:
    """What `training/adapter.py` stores under RANKER_KEY: the ranker, the retrieval sizes and the
    trending snapshot of the whole corpus as of its last event (serving's `trend` feature)."""
    assert scorer.cat.ranker is not None
    items = [np.asarray(s, dtype=np.int64) for s in corpus.items]
    stamps = [np.asarray(t, dtype=np.int64) for t in corpus.ts]
    at_ms = int(max((int(t.max()) for t in stamps if len(t)), default=0)) + 1
    clock = TrendingClock.from_sequences(items, stamps, len(corpus.catalog), scorer.trending.half_life_ms)
    return {**scorer.cat.ranker.to_dict(), "retrieval": scorer.cat.sizes.to_dict(),
            "trending": {"half_life_s": scorer.trending.half_life_ms / 1000.0, "at_ms": at_ms,
                         "decayed": clock.at(np.array([at_ms]))[0]}}


def moved_share(scorer: TwoStageScorer, split: Split, weight: float, seed: int = 0) -> float:
    """Mean share of the top 10 that a foreign query (the text of an item from outside the user's
    history, far from it by the towers) replaces at `weight`, on held-out validation histories."""
    return moved_share_at(scorer, split, seed)(weight)


def moved_share_at(scorer: TwoStageScorer, split: Split, seed: int = 0) -> Callable[[float], float]:
    """`moved_share` as a function of the weight: the requests, their queries (an LM pass) and the top 10
    without a query are computed once, so a sweep over the weights ranks only (what
    `choose_query_weight` calls, up to len(QUERY_WEIGHT_GRID) times)."""
    reqs, queries = _foreign_query_requests(scorer, split, seed)
    before = [set(rows[np.argsort(-s, kind="stable")[:TOP_K]].tolist()) for rows, s in rank_requests(scorer.cat, reqs)]

    def share(weight: float) -> float:
        for r, q in zip(reqs, queries):
            r.query, r.query_weight = q, weight
        shares = []
        for b, (rows, s) in zip(before, rank_requests(scorer.cat, reqs)):
            after = set(rows[np.argsort(-s, kind="stable")[:TOP_K]].tolist())
            shares.append(len(after - b) / max(len(after), 1))
        return float(np.mean(shares)) if shares else 0.0

    return share


def _foreign_query_requests(scorer: TwoStageScorer, split: Split, seed: int) -> tuple[list[RankInputs], np.ndarray]:
    """QUERY_WEIGHT_USERS validation requests (seeded) and, for each, the encoded text of an item from
    the user's least likely tenth of the catalog."""
    valid = split.valid
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(valid), size=min(QUERY_WEIGHT_USERS, len(valid)), replace=False)
    cases = valid.subset(np.isin(np.arange(len(valid)), pick))
    reqs = scorer.requests(cases.histories, cases.history_ts, cases.target_ts)
    texts = split.corpus.catalog.texts
    queries = []
    for r in reqs:
        far = np.argsort(scorer.cat.item_vectors @ r.user)[: max(10, len(texts) // 10)]
        queries.append(texts[int(rng.choice(far))])
    return reqs, scorer.base.model.text_vectors(queries).detach().cpu().numpy()


__all__ = ["QUERY_WEIGHT_USERS", "RankCatalog", "RankInputs", "TwoStageScorer", "calibrated", "fit_two_stage",
           "first_stage_scores", "moved_share", "moved_share_at", "ranker_payload", "rank_request", "rank_requests", "request_features", "retrieve",
           "trend_order", "trending_rows"]
