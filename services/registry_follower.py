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

Readiness (`GET /readyz`, `scene_state`): every scene of the registry's live set (the scenes with
a CURRENT pointer, or a pin) is

* `loaded` -- a version of it is active (perhaps an older one, while a newer one loads);
* `loading` -- nothing active yet, a load under way or waiting for its retry: requests for it get
  503 with Retry-After, not 404 (a 404 is for a scene the registry does not have);
* `fallback` -- nothing active and nothing that can become active: its live version was refused (or
  its pointer is malformed) and this replica has no older version loaded. The replica has decided to
  answer it from the popular/trending fallback, flagged `"fallback"` in each answer, and says so
  here with the reason, until a new version is published.

A replica is ready once the scene list has been read and no live scene is `loading`. Ready latches:
a scene published later loads on every replica at once, and taking every replica out of service
for it would stop the scenes that do answer, so meanwhile only that scene's requests get 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

from services.api_schema import SceneState
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
        self.wanted: dict[str, str] = {}  # the live set at the last poll: scene -> version it should serve
        self.load_errors: dict[tuple[str, str], str] = {}  # (scene, version) -> why its last load failed
        self.pointer_errors: dict[str, tuple[bool, str]] = {}  # scene -> (permanent, why) its pointer is unreadable
        self.read_error: str | None = None  # why the scene list could not be read, until it first is
        self.listed = False  # the live set has been read (a scene not in it is unknown: 404)
        self.polled = False  # a poll has read the live set and tried every live scene
        self.ready = False  # latched once polled with no live scene loading (see the module docstring)

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
                if not self.listed:
                    self.read_error = f"{type(exc).__name__}: {exc}"
                self.metrics.survived("registry", exc, "registry poll failed; keeping the active versions")
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> None:
        """One pass: read the live set (every scene's pin, else CURRENT) first, so readiness knows all of
        it while the loads run; then every scene whose wanted version is not active gets it, unless that
        version is refused or waiting for its retry."""
        scenes = await asyncio.to_thread(self.registry.scenes)
        wanted: dict[str, str] = {}
        for scene in scenes:
            want = self.pins.get(scene)
            if want is None:
                try:
                    cur = await asyncio.to_thread(self.registry.current, scene)
                except POLL_ERRORS as exc:  # one scene's bad pointer does not hold up the others
                    self.metrics.survived("registry", exc, f"cannot read scene {scene!r}'s pointer; keeping "
                                                           f"{self.active.get(scene)}")
                    # a malformed pointer stays so until a publish fixes it; I/O trouble may pass
                    self.pointer_errors[scene] = (isinstance(exc, RegistryError),
                                                  f"its CURRENT pointer cannot be read ({type(exc).__name__}: {exc})")
                    if scene in self.wanted:
                        wanted[scene] = self.wanted[scene]  # what it was: keep loading or serving that
                    continue
                want = cur.version if cur else None
            self.pointer_errors.pop(scene, None)
            for key in [k for k in self.retries if k[0] == scene and k[1] != want]:
                del self.retries[key]  # no longer wanted: a later return starts afresh
            if want is not None:
                wanted[scene] = want
        self.wanted, self.listed, self.read_error = wanted, True, None
        for scene in [s for s in self.pointer_errors if s not in scenes]:
            del self.pointer_errors[scene]  # the scene is gone from the registry
        for scene, want in wanted.items():
            if want == self.active.get(scene) or want in self.refused.get(scene, set()):
                continue
            retry = self.retries.get((scene, want))
            if retry is not None and self.clock() < retry.at:
                continue
            await self.swap(scene, want)
        self.polled = True
        self._update_readiness()

    # readiness --------------------------------------------------------------------------------------
    def scene_state(self, scene: str) -> SceneState | None:
        """Where `scene` stands on this replica; None for a scene neither live nor served here."""
        active, want = self.active.get(scene), self.wanted.get(scene)
        if active is not None:
            if want is None or want == active:
                return SceneState(state="loaded", version=active)
            if want in self.refused.get(scene, set()):
                why = f"{want} was refused ({self.load_errors.get((scene, want), 'cannot serve')}); {active} serves"
            else:
                why = f"{active} serves while {want} loads"
            return SceneState(state="loaded", version=active, reason=why)
        if want is None:
            if scene not in self.pointer_errors:
                return None
            permanent, why = self.pointer_errors[scene]
            return SceneState(state="fallback" if permanent else "loading", version=None, reason=why)
        if want in self.refused.get(scene, set()):
            return SceneState(state="fallback", version=want,
                              reason=f"{want} was refused ({self.load_errors.get((scene, want), 'cannot serve')}) "
                                     "and no other version is loaded")
        retry = self.retries.get((scene, want))
        if retry is None:
            return SceneState(state="loading", version=want)
        return SceneState(state="loading", version=want,
                          reason=f"load attempt {retry.attempts} failed ({self.load_errors.get((scene, want))}); "
                                 f"next try in {max(0.0, retry.at - self.clock()):.0f} s")

    def scene_states(self) -> dict[str, SceneState]:
        """Every scene of the live set, or served here, or with an unreadable pointer."""
        names = sorted(set(self.wanted) | set(self.active) | set(self.pointer_errors))
        return {scene: st for scene in names if (st := self.scene_state(scene)) is not None}

    def _update_readiness(self) -> None:
        states = self.scene_states()
        if not self.ready and all(st.state != "loading" for st in states.values()):
            self.ready = True
            logger.info("ready: %s", ", ".join(f"{s}={st.state}" for s, st in states.items()) or "no scenes yet")
        self.metrics.ready.set(1 if self.ready else 0)
        for scene, st in states.items():
            self.metrics.scene_fallback.labels(scene).set(1 if st.state == "fallback" else 0)

    async def swap(self, scene: str, version: str) -> bool:
        """Load `version`, then make it the scene's active version; False if it did not load."""
        model_id = f"{scene}@{version}"
        try:
            adapter = await self.load(scene, version)
        except AdapterLoadError as exc:
            self.retries.pop((scene, version), None)
            self.load_errors[(scene, version)] = str(exc)
            self.refused.setdefault(scene, set()).add(version)
            self.metrics.reload_failures.labels(scene).inc()
            logger.error("refused %s: %s (still serving %s)", model_id, exc, self.active.get(scene))
            return False
        except TRANSIENT_ERRORS as exc:
            prev = self.retries.get((scene, version))
            attempts = (prev.attempts if prev else 0) + 1
            wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
            self.retries[(scene, version)] = Retry(attempts, self.clock() + wait)
            self.load_errors[(scene, version)] = f"{type(exc).__name__}: {exc}"
            self.metrics.survived("registry", exc, f"loading {model_id} failed (attempt {attempts}); retrying in "
                                                   f"{wait:.0f} s, still serving {self.active.get(scene)}")
            return False
        self.retries.pop((scene, version), None)
        self.load_errors.pop((scene, version), None)
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
