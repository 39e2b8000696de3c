"""Keeps each served adapter's item index in step with the online store's catalog.

The ingest consumer writes every catalog change to the store together with an entry of its change
log (`OnlineStore.catalog_changes`, a Redis stream), so a replica follows that log rather than
re-reading the whole live set every second: new items are embedded from their text with the
adapter's own text tower (the same recipe as training, `training.corpus.item_text`), deleted ones
leave the index. An adapter that never synced (just loaded) or whose position was trimmed off the
log reads the position first, then the live set, and diffs -- an item known only from training
(never published) stays.

A failed catch-up (Redis down) leaves the index as it is and the position where it was, so the
next poll resumes from there; it is logged (rate-limited) and counted in
`streamrec_background_errors_total{loop="catalog"}`. One item that cannot be added -- a malformed
record, a text the model fails on -- is skipped the same way instead of stalling every later change
(and, at a replica's start, every load).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, Iterable, Mapping

from redis.exceptions import RedisError

from services.loaded_adapter import AdapterLoadError
from services.metrics import ServeMetrics

logger = logging.getLogger(__name__)

CATALOG_POLL_S = 1.0  # how often a replica reads the catalog change log
UPSERT_BATCH = 1_024  # new items read, embedded and indexed together (10^4 at once: ~10 batches)

# a catch-up that fails with these is retried at the next poll: Redis or I/O down, or an adapter
# that cannot embed text (it keeps serving its trained catalog)
CATCH_UP_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, AdapterLoadError)
# one item that cannot be added -- a malformed record (bad attributes JSON, a missing field), a text
# the tokenizer or model fails on (ValueError, torch's RuntimeError) -- is skipped
ITEM_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, RuntimeError)


def store_item_text(item: Mapping[str, Any]) -> str:
    """The text the item tower reads for an item as `OnlineStore.item` returns it (training's recipe)."""
    from training.corpus import item_text

    return item_text(item["title"], item.get("text"), item.get("attributes") or {}, item["item_id"])


class CatalogFollower:
    """Applies the store's catalog to adapters (objects with `model_id`, `catalog_pos`, `index.row`,
    `upsert_items([(id, text, title), ...])`, `remove_item(id)`).

    `store`: an `OnlineStore` (blocking client: catch-ups run in threads); `active()`: the model ids
    to keep in step; `get_model(model_id)`: the adapter for one of them."""

    def __init__(self, store: Any, metrics: ServeMetrics, *, active: Callable[[], Iterable[str]],
                 get_model: Callable[[str], Awaitable[Any]], poll_s: float = CATALOG_POLL_S) -> None:
        self.store = store
        self.metrics = metrics
        self.active = active
        self.get_model = get_model
        self.poll_s = poll_s
        self._lock = threading.Lock()  # catch-ups run in threads (the loop, a load): one at a time

    async def run(self) -> None:
        """Catch every active adapter up, every `poll_s`, forever."""
        while True:
            await asyncio.sleep(self.poll_s)
            await self.poll()

    async def poll(self) -> None:
        """One pass over the active adapters; one that fails is left as it is until the next pass."""
        for model_id in list(self.active()):
            try:
                adapter = await self.get_model(model_id)
                await asyncio.to_thread(self.catch_up, adapter)
            except CATCH_UP_ERRORS as exc:
                self.metrics.survived("catalog", exc, f"catalog catch-up of {model_id} failed; its index stays "
                                                      "as it is until the next poll")
                continue
            self.metrics.index_size.labels(adapter.scene).set(adapter.index.size)

    def catch_up(self, adapter: Any) -> None:
        """Bring one adapter's index up to the online store's catalog (blocking: call it in a thread)."""
        with self._lock:
            store = self.store
            if adapter.catalog_pos is not None:
                got = store.catalog_changes(adapter.catalog_pos)
                if got is not None:
                    pos, changes = got
                    latest = dict(changes)  # last change of an item wins
                    self.apply(adapter, {i for i, d in latest.items() if not d}, {i for i, d in latest.items() if d})
                    adapter.catalog_pos = pos
                    return
                logger.warning("%s fell behind the catalog log: re-reading the live set", adapter.model_id)
            pos = store.catalog_position()
            live = store.live_items()
            known = set(adapter.index.row)
            self.apply(adapter, live - known, store.deleted_items(known - live))
            adapter.catalog_pos = pos

    def apply(self, adapter: Any, added: set[str], gone: set[str]) -> None:
        """Embed `added` items from their text (already indexed ones are left as they are) and add
        them in batches of `UPSERT_BATCH` (one store round trip, batched LM passes, one index add
        each); drop `gone` ones from the index. A batch the model fails on is retried item by item,
        so one bad text skips that item only."""
        todo = sorted(i for i in added if i not in adapter.index.row)
        for lo in range(0, len(todo), UPSERT_BATCH):
            ids = todo[lo:lo + UPSERT_BATCH]
            batch = []
            for item_id, item in self._records(adapter, ids):
                if item is None or item["deleted"]:
                    continue
                try:
                    batch.append((item_id, store_item_text(item), item["title"]))
                except ITEM_ERRORS as exc:
                    self._skipped(adapter, item_id, exc)
            try:
                self._added(adapter.upsert_items(batch), len(batch))
            except AdapterLoadError:
                raise  # the adapter embeds no text at all: the whole catch-up fails (CATCH_UP_ERRORS)
            except ITEM_ERRORS:
                for one in batch:  # find the item the model fails on; the others go in
                    try:
                        self._added(adapter.upsert_items([one]), 1)
                    except ITEM_ERRORS as exc:
                        self._skipped(adapter, one[0], exc)
        for item_id in gone:
            adapter.remove_item(item_id)

    def _added(self, seconds: Any, n: int) -> None:
        """Count `n` items added and the (embedding, indexing) seconds they took."""
        self.metrics.catalog_items_added.inc(n)
        if isinstance(seconds, tuple):
            self.metrics.catalog_upsert_seconds.labels("embed").inc(seconds[0])
            self.metrics.catalog_upsert_seconds.labels("index").inc(seconds[1])

    def _records(self, adapter: Any, ids: list[str]) -> list[tuple[str, Any]]:
        """(id, store record) of each id: one round trip, or one per item when a malformed record
        fails the batch (that one is skipped)."""
        try:
            return list(zip(ids, self.store.items(ids)))
        except ITEM_ERRORS:
            out = []
            for item_id in ids:
                try:
                    out.append((item_id, self.store.item(item_id)))
                except ITEM_ERRORS as exc:
                    self._skipped(adapter, item_id, exc)
            return out

    def _skipped(self, adapter: Any, item_id: str, exc: BaseException) -> None:
        self.metrics.survived("catalog", exc, f"{adapter.model_id} cannot add item {item_id!r} (a malformed "
                                              "record or a text the model fails on); skipped")


__all__ = ["CATALOG_POLL_S", "CATCH_UP_ERRORS", "CatalogFollower", "ITEM_ERRORS", "UPSERT_BATCH", "store_item_text"]
