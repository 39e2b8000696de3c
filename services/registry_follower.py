"""Which adapter version each scene serves on one replica: the registry's CURRENT pointers, or a pin.

A new version is loaded in the background (`load`, the replica's multiplexed loader: requests
keep being served meanwhile), and only once it is ready does the scene switch to it, with one
dict write; requests in flight finish on the version they hold.

A version that fails to load is handled by why it failed:

* permanently (`AdapterLoadError`: checksum mismatch, missing file, wrong shapes, a malformed
  adapter -- a published version never changes, so it would fail again) -> refused for the
  replica's lifetime, logged at ERROR, counted in `streamrec_adapter_reload_failures_total`;
* transiently (`TRANSIENT_ERRORS`: an unreachable remote registry, a timeout, Redis) -> retried
  after `RETRY_FIRST_S`, doubling up to `RETRY_MAX_S`, each failure logged and counted in
  `streamrec_background_errors_total{loop="registry"}`.

Either way the old version keeps serving. Anything else is a bug: it ends the follower, and the
replica's health check (`Api.check_health`) reports it, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

from services.loaded_adapter import AdapterLoadError
from services.metrics import ServeMetrics
from training.registry import RegistryError

logger = logging.getLogger(__name__)

RELOAD_POLL_S = 1.0  # how often a replica looks at the registry's CURRENT pointers
RETRY_FIRST_S = 2.0  # wait after a version's first transient load failure
RETRY_MAX_S = 60.0  # the wait doubles per failure up to this

# worth another try later: I/O (remote registry, file systems; TimeoutError is an OSError) and Redis
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, RedisError)
# what reading the pointers can raise: the above, or a malformed pointer/manifest (fixed by a publish)
POLL_ERRORS: tuple[type[BaseException], ...] = TRANSIENT_ERRORS + (RegistryError,)


@dataclass
class Retry:
    """A version whose load failed transiently: tried `attempts` times, next not before `at` (clock s)."""

    attempts: int
    at: float


class RegistryFollower:
    """Follows the registry (`scenes()`, `current(scene)`) for one replica.

    `load(scene, version)` returns a ready adapter (with `index.size`, `index.recall`, `loaded_s`)
    or raises; `clock` is monotonic seconds (injected so tests need not wait)."""

    def __init__(self, registry: Any, load: Callable[[str, str], Awaitable[Any]], metrics: ServeMetrics, *,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = RELOAD_POLL_S) -> None:
        self.registry = registry
        self.load = load
        self.metrics = metrics
        self.clock = clock
        self.poll_s = poll_s
        self.active: dict[str, str] = {}  # scene -> version serving now
        self.refused: dict[str, set[str]] = {}  # scene -> versions that can never serve
        self.retries: dict[tuple[str, str], Retry] = {}  # (scene, version) -> when to try again
        self.pins: dict[str, str] = {}

    def set_pins(self, pins: dict[str, str]) -> None:
        """Scene -> version to serve instead of the registry's CURRENT (user_config `pins`)."""
        pins = dict(pins or {})
        for scene, version in pins.items():
            if not isinstance(version, str) or not version:
                raise ValueError(f"user_config.pins[{scene!r}]={version!r}: expected a version name")
        self.pins = pins

    async def run(self) -> None:
        """Poll forever; a registry that cannot be read this time is tried again at the next poll."""
        while True:
            try:
                await self.poll()
            except POLL_ERRORS as exc:
                self.metrics.survived("registry", exc, "registry poll failed; keeping the active versions")
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> None:
        """One pass: every scene whose wanted version (pin, else CURRENT) is not active gets it, unless
        that version is refused or waiting for its retry."""
        scenes = await asyncio.to_thread(self.registry.scenes)
        for scene in scenes:
            want = self.pins.get(scene)
            if want is None:
                try:
                    cur = await asyncio.to_thread(self.registry.current, scene)
                except POLL_ERRORS as exc:  # one scene's bad pointer does not hold up the others
                    self.metrics.survived("registry", exc, f"cannot read scene {scene!r}'s pointer; keeping "
                                                           f"{self.active.get(scene)}")
                    continue
                want = cur.version if cur else None
            for key in [k for k in self.retries if k[0] == scene and k[1] != want]:
                del self.retries[key]  # no longer wanted: a later return starts afresh
            if want is None or want == self.active.get(scene) or want in self.refused.get(scene, set()):
                continue
            retry = self.retries.get((scene, want))
            if retry is not None and self.clock() < retry.at:
                continue
            await self.swap(scene, want)

    async def swap(self, scene: str, version: str) -> bool:
        """Load `version`, then make it the scene's active version; False if it did not load."""
        model_id = f"{scene}@{version}"
        try:
            adapter = await self.load(scene, version)
        except AdapterLoadError as exc:
            self.retries.pop((scene, version), None)
            self.refused.setdefault(scene, set()).add(version)
            self.metrics.reload_failures.labels(scene).inc()
            logger.error("refused %s: %s (still serving %s)", model_id, exc, self.active.get(scene))
            return False
        except TRANSIENT_ERRORS as exc:
            prev = self.retries.get((scene, version))
            attempts = (prev.attempts if prev else 0) + 1
            wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
            self.retries[(scene, version)] = Retry(attempts, self.clock() + wait)
            self.metrics.survived("registry", exc, f"loading {model_id} failed (attempt {attempts}); retrying in "
                                                   f"{wait:.0f} s, still serving {self.active.get(scene)}")
            return False
        self.retries.pop((scene, version), None)
        old = self.active.get(scene)
        self.active[scene] = version
        if old:
            self.metrics.version.labels(scene, old).set(0)
        self.metrics.version.labels(scene, version).set(1)
        self.metrics.reloads.labels(scene).inc()
        self.metrics.index_size.labels(scene).set(adapter.index.size)
        self.metrics.index_recall.labels(scene).set(adapter.index.recall)
        logger.info("scene %s: now serving %s (was %s; load %.2f s)", scene, version, old, adapter.loaded_s)
        return True


__all__ = ["POLL_ERRORS", "RELOAD_POLL_S", "RETRY_FIRST_S", "RETRY_MAX_S", "RegistryFollower", "Retry",
           "TRANSIENT_ERRORS"]
