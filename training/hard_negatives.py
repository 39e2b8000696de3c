"""Hard negatives: the items a user was shown and did not click, as extra negatives for training.

Off by default; `TrainConfig.hard_negatives` turns it on (`streamrec train --hard-negatives`, or a preset name
ending in `+hard-negatives`, training/presets.py). The loss term is `Recommender.next_item_loss`'s (see
`declined_penalty` in training/model.py); this module finds the items and hands them to training.

What counts as shown-but-not-clicked (`shown_not_clicked`, a pure function of two tables):

* **shown**: an item at positions 1..`SHOWN_TOP_POSITIONS` of an impression (`log/<impressions_topic>/`,
  `streaming.events.IMPRESSION_LOG_SCHEMA`). Lower positions are left out: with position bias, not clicking
  an item far down the list says more about the list than about the item.
* **whose**: the impression's `user_id` (the pseudonym). An impression without one (a request by recent
  items only) belongs to the user of a click that carries its `request_id`; with no such click it is skipped.
* **settled**: only impressions whose attribution window has closed, `ts + attribution_window_s <= now`:
  a younger one may still be clicked. `now` is the data's own clock -- the latest `ts` in the two logs -- so a
  replayed or restored log gives the same hard negatives whatever day it is read.
* **never clicked**: left out are the items the user interacted with *ever* (any event type, any time,
  with or without a `request_id`: a late click or a later purchase of the item still says it was wanted), and
  the item of any click carrying the impression's `request_id` (whoever made it). Training also leaves out
  the items of the user's whole sequence in the corpus, validation and test targets included
  (`per_user_indices`), so a hard negative is never an item the model is evaluated on for that user.
* **where**: a scene's adapter (`streamrec train --scene S`) takes the impressions of scene S only -- what it
  learns to predict are that scene's clicks; `default` takes every scene's. Interactions exclude in any scene.
* **which**: per user, each item once, most recently shown first; training keeps the first
  `TrainConfig.hard_negative_max`.

Old event log files have no `request_id` column: they are read with the contract's schema, which fills nulls.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.events import EVENT_LOG_SCHEMA
from streaming.features.attribution import read_impressions, window_ms_of
from streaming.offline_log import OfflineLog, read_table
from training.corpus import Corpus

logger = logging.getLogger(__name__)

SHOWN_TOP_POSITIONS = 10  # positions 1..10 of an answer count as shown (streamrec's default k is 10)
IMPRESSION_COLUMNS = ("request_id", "user_id", "scene", "item_ids", "ts")
EVENT_COLUMNS = ("user_id", "item_id", "request_id", "ts")


def shown_not_clicked(impressions: pa.Table, events: pa.Table, *, window_ms: int, now_ms: int | None = None,
                      top_positions: int = SHOWN_TOP_POSITIONS, scene: str | None = None) -> dict[str, list[str]]:
    """Per user pseudonym, the items shown and never clicked (the rules in the module docstring), most
    recently shown first. `impressions` needs `IMPRESSION_COLUMNS`, `events` `EVENT_COLUMNS` (a null
    `request_id` is a click from no answer). `now_ms` defaults to the latest `ts` of either table; `scene`
    (None: all) keeps that scene's impressions only."""
    if window_ms < 0 or top_positions < 1:
        raise ValueError(f"window_ms={window_ms!r}, top_positions={top_positions!r}: need >= 0 and >= 1")
    if impressions.num_rows == 0:
        return {}
    if now_ms is None:
        now_ms = max(pc.max(t.column("ts")).as_py() or 0 for t in (impressions, events) if t.num_rows)
    settled = pc.less_equal(pc.add(impressions.column("ts"), window_ms), now_ms)
    if scene is not None:
        settled = pc.and_(settled, pc.equal(impressions.column("scene"), scene))
    imp = impressions.filter(settled)
    if imp.num_rows == 0:
        return {}
    ev_user = events.column("user_id").to_pylist()
    ev_item = events.column("item_id").to_pylist()
    ev_req = events.column("request_id").to_pylist()
    clicked_in = {(r, i) for r, i in zip(ev_req, ev_item) if r is not None}
    clicker = {r: u for r, u in zip(ev_req, ev_user) if r is not None and u is not None}
    interacted = {(u, i) for u, i in zip(ev_user, ev_item)}

    # One row per shown (impression, position): the item lists flattened with their parents and positions.
    lists = imp.column("item_ids").combine_chunks()
    parents = pc.list_parent_indices(lists).to_numpy()
    firsts = lists.offsets.to_numpy()[:-1] - lists.offsets[0].as_py()
    position = np.arange(len(parents)) - firsts[parents]  # 0-based
    keep = position < top_positions
    parents = parents[keep]
    shown_items = np.asarray(pc.list_flatten(lists).to_pylist(), dtype=object)[keep]
    req = imp.column("request_id").to_pylist()
    users = [u if u is not None else clicker.get(r) for u, r in zip(imp.column("user_id").to_pylist(), req)]
    ts = imp.column("ts").to_numpy()

    # A click through any of the user's answers excludes the item, even from another answer showing it.
    excluded = interacted | {(users[int(row)], item) for row, item in zip(parents, shown_items)
                             if (req[int(row)], item) in clicked_in}
    # Most recent first; ties by impression then position order (stable), so the result is deterministic.
    order = np.argsort(-ts[parents], kind="stable")
    out: dict[str, list[str]] = {}
    for k in order:
        user, item = users[int(parents[k])], shown_items[k]
        if user is None or (user, item) in excluded:
            continue
        excluded.add((user, item))  # each item once per user
        out.setdefault(user, []).append(item)
    return out


def _subschema(schema: pa.Schema, names: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(n) for n in names])


def read_shown_not_clicked(settings: Any, *, now_ms: int | None = None, top_positions: int = SHOWN_TOP_POSITIONS,
                           scene: str | None = None) -> dict[str, list[str]]:
    """`shown_not_clicked` over the offline log: `log/<impressions_topic>/` and `log/<events_topic>/`, the
    window `settings.attribution_window_s`. A corrupt file raises `streaming.offline_log.CorruptLogFile`."""
    impressions = read_impressions(settings, IMPRESSION_COLUMNS)  # the attribution job's reader
    if impressions.num_rows == 0:
        return {}
    # Every event type, not only clicks: an item the user ever interacted with is no hard negative. The
    # contract's schema fills a null `request_id` into files written before the field existed.
    log = OfflineLog(settings.log_dir)
    events = read_table(log, log.list_files(settings.events_topic), _subschema(EVENT_LOG_SCHEMA, EVENT_COLUMNS))
    return shown_not_clicked(impressions, events, window_ms=window_ms_of(settings), now_ms=now_ms,
                             top_positions=top_positions, scene=scene)


def per_user_indices(corpus: Corpus, shown: dict[str, list[str]], max_per_user: int) -> list[np.ndarray]:
    """Per corpus user, up to `max_per_user` catalog indices (int32) of `shown`'s items, in its order;
    items outside the catalog and items anywhere in the user's corpus sequence are left out."""
    if max_per_user < 1:
        raise ValueError(f"hard_negative_max={max_per_user!r}: must be at least 1")
    index = corpus.catalog.index
    out = []
    for user, seq in zip(corpus.user_ids, corpus.items):
        items = shown.get(user)
        if not items:
            out.append(np.zeros(0, dtype=np.int32))
            continue
        had = set(seq.tolist())
        picked = [index[i] for i in items if i in index and index[i] not in had][:max_per_user]
        out.append(np.asarray(picked, dtype=np.int32))
    return out


def with_hard_negatives(corpus: Corpus, settings: Any, max_per_user: int, *, scene: str | None = None,
                        now_ms: int | None = None) -> Corpus:
    """A copy of `corpus` whose `hard_negatives` are read from the log (`read_shown_not_clicked`)."""
    per_user = per_user_indices(corpus, read_shown_not_clicked(settings, now_ms=now_ms, scene=scene), max_per_user)
    n_users = sum(1 for h in per_user if len(h))
    if n_users == 0:
        logger.warning("hard negatives: no user of the corpus has a settled impression with an item they did not "
                       "click (impressions in %s/%s, window %gs): training without them", settings.log_dir,
                       settings.impressions_topic, settings.attribution_window_s)
    else:
        logger.info("hard negatives: %d items for %d of %d users", sum(len(h) for h in per_user), n_users,
                    len(per_user))
    return dataclasses.replace(corpus, hard_negatives=per_user)


__all__ = ["EVENT_COLUMNS", "IMPRESSION_COLUMNS", "SHOWN_TOP_POSITIONS", "per_user_indices",
           "read_shown_not_clicked", "shown_not_clicked", "with_hard_negatives"]
