"""The adapters one replica holds, keyed "scene@version": loaded on first use, one load per id at a time,
dropped as soon as nothing wants them.

Why not Serve's `@serve.multiplexed` (what held them before): its LRU keeps up to N versions whatever they
are, so after a swap the old version -- its index, vectors and catalog lists, ~1.6 KB per item -- stays in
memory until N newer ones push it out (at 10^6 items that is a second copy of the catalog per swap, README
"Retrieval at scale"); and every request paid its wrapper (a Ray metrics counter and the LRU move) to look
up an adapter that almost never changes. Here a lookup is a dict read, and the replica's sweep
(`services/serve_app.py`, every `ADAPTER_SWEEP_S`) calls `retain(wanted)` with the versions its followers
want: the live one of each scene, the one the registry follower is loading or pinned, the running
experiments' candidates. Everything else goes once it has been loaded for `grace_s` (a version the registry
follower has just loaded and not yet made active is still kept). A request already holding an adapter
finishes on it: Python frees it after the last holder lets go.

The cost of dropping at once: a rollback to the version just replaced loads it again (seconds, in the
background: the registry follower keeps serving the live one meanwhile).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Iterable

RETAIN_GRACE_S = 10.0  # a loaded adapter is kept at least this long, wanted or not (see the module docstring)


class AdapterCache:
    """`await cache.get(model_id)`: the loaded adapter (`load(model_id)` on a miss, whose exception -- a
    version that cannot serve -- propagates and caches nothing); `retain(wanted)`: drop the others."""

    def __init__(self, load: Callable[[str], Awaitable[Any]], *, grace_s: float = RETAIN_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load, self._grace_s, self._clock = load, grace_s, clock
        self._loaded: dict[str, tuple[Any, float]] = {}  # model id -> (adapter, when it finished loading)
        self._locks: dict[str, asyncio.Lock] = {}  # one load per id at a time; concurrent callers wait for it

    async def get(self, model_id: str) -> Any:
        hit = self._loaded.get(model_id)
        if hit is not None:
            return hit[0]
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            hit = self._loaded.get(model_id)  # loaded while this caller waited
            if hit is not None:
                return hit[0]
            adapter = await self._load(model_id)
            self._loaded[model_id] = (adapter, self._clock())
            return adapter

    def retain(self, wanted: Iterable[str]) -> list[str]:
        """Drop every adapter not in `wanted` that finished loading at least `grace_s` ago; the dropped ids."""
        keep, now = set(wanted), self._clock()
        dropped = sorted(m for m, (_, at) in self._loaded.items() if m not in keep and now - at >= self._grace_s)
        for model_id in dropped:
            del self._loaded[model_id]
            lock = self._locks.get(model_id)
            if lock is not None and not lock.locked():
                del self._locks[model_id]
        return dropped

    def loaded(self) -> list[str]:
        """The ids held now, sorted."""
        return sorted(self._loaded)


__all__ = ["AdapterCache", "RETAIN_GRACE_S"]
