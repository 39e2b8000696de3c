"""Natural-language intent, measured where the answer is known: the synthetic catalog's topics.

    query_intent_metrics(scorer, item_topic, vocabularies)   # bench/quality.py runs it

Two behaviours a client of `POST /v1/recommendations` with a `query` expects, each a number:

* `query_only_topic_precision10` -- a query alone (no user, no items): for every topic, a query
  of `QUERY_WORDS` words drawn from the topic's vocabulary (never the topic's name, which items
  carry in their attributes) should return that topic's items: the mean share of the top 10 in
  the queried topic.
* `query_blend_topic_share10` -- a history of `BLEND_HISTORY` items of topic A (the topic's most
  popular, a minute apart, the last a minute before now) plus a query for topic B: the mean share
  of the top 10 in B over ordered pairs of distinct topics, at the adapter's default query weight
  (chosen on held-out histories, `training/ranker.py`); `by_weight` gives it for other weights.

Both go through `training.two_stage.rank_request`, the code serving runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from training.calibration import TOP_K
from training.two_stage import TwoStageScorer, rank_request

QUERY_WORDS = 3
BLEND_HISTORY = 5
MAX_PAIRS = 60  # ordered (history topic, query topic) pairs sampled for the blend
MS_PER_MIN = 60_000
REPORT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def topic_query(vocabulary: Sequence[str], rng: np.random.Generator) -> str:
    return " ".join(rng.choice(list(vocabulary), size=min(QUERY_WORDS, len(vocabulary)), replace=False))


def _top(scorer: TwoStageScorer, history: np.ndarray, now: int, query: np.ndarray, weight: float | None) -> np.ndarray:
    ts = now - MS_PER_MIN * np.arange(len(history), 0, -1, dtype=np.int64)
    r = scorer.requests([history], [ts], np.array([now]), queries=[query])[0]
    r.query_weight = weight
    rows, s = rank_request(scorer.cat, r)
    return rows[np.argsort(-s, kind="stable")[:TOP_K]]


def query_intent_metrics(scorer: TwoStageScorer, item_topic: np.ndarray, vocabularies: Sequence[Sequence[str]], *,
                         popularity: np.ndarray, now_ts: int, seed: int = 0) -> dict[str, Any]:
    """The two metrics above. `item_topic[row]`: the topic of each catalog row (-1: unknown);
    `vocabularies[t]`: topic t's words; `popularity[row]`: training interactions (picks each topic's
    history items); `now_ts`: the requests' time."""
    rng = np.random.default_rng(seed)
    topics = [t for t in range(len(vocabularies)) if np.count_nonzero(item_topic == t) >= TOP_K + BLEND_HISTORY]
    texts = [topic_query(vocabularies[t], rng) for t in topics]
    qv = dict(zip(topics, scorer.base.model.text_vectors(texts).detach().cpu().numpy()))
    empty = np.zeros(0, dtype=np.int64)
    precision = {}
    for t in topics:
        top = _top(scorer, empty, now_ts, qv[t], None)
        precision[vocabularies[t][0]] = float(np.mean(item_topic[top] == t)) if len(top) else 0.0
    pairs = [(a, b) for a in topics for b in topics if a != b]
    if len(pairs) > MAX_PAIRS:
        pairs = [pairs[i] for i in rng.choice(len(pairs), size=MAX_PAIRS, replace=False)]
    histories = {a: np.flatnonzero(item_topic == a)[np.argsort(-popularity[item_topic == a], kind="stable")]
                 [:BLEND_HISTORY][::-1] for a in topics}
    default = scorer.cat.ranker.query_weight if scorer.cat.ranker is not None else None
    by_weight: dict[str, float] = {}
    for w in (default, *REPORT_WEIGHTS):
        shares, keep = [], []
        for a, b in pairs:
            top = _top(scorer, histories[a], now_ts, qv[b], w)
            shares.append(float(np.mean(item_topic[top] == b)) if len(top) else 0.0)
            keep.append(float(np.mean(item_topic[top] == a)) if len(top) else 0.0)
        by_weight["default" if w is default else f"{w:g}"] = round(float(np.mean(shares)), 4)
        if w is default:
            history_share = float(np.mean(keep))
    return {
        "query_only_topic_precision10": float(np.mean(list(precision.values()))),
        "query_only_by_topic": precision,
        "query_blend_topic_share10": by_weight["default"],
        "query_blend_history_share10": history_share,
        "query_blend_by_weight": by_weight,
        "query_weight_default": default,
        "topics": len(topics), "pairs": len(pairs), "query_words": QUERY_WORDS,
        "example_queries": dict(zip((vocabularies[t][0] for t in topics[:3]), texts[:3])),
    }


__all__ = ["BLEND_HISTORY", "QUERY_WORDS", "query_intent_metrics", "topic_query"]
