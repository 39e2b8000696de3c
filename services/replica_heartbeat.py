"""Each API replica's heartbeat in Redis, and the other replicas' views for `GET /v1/models`.

Every `HEARTBEAT_S` a replica writes what it serves (versions, pins, experiments) into one Redis hash
field; `/v1/models` reads the hash and leaves out (and deletes) replicas silent for `REPLICA_STALE_S`.
Redis down: the heartbeat is skipped and /v1/models shows the answering replica only.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from redis.exceptions import RedisError

from services.api_schema import ReplicaView
from services.metrics import ServeMetrics

HEARTBEAT_S = 1.0  # how often a replica writes its active versions for /v1/models
REPLICA_STALE_S = 10.0  # a replica silent this long is left out of /v1/models
# What the Redis clients raise when Redis is down or slow (their ConnectionError and TimeoutError are
# RedisErrors; a socket error may surface as OSError).
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)
# A heartbeat entry another replica (or an older release) wrote that does not parse.
HEARTBEAT_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError)


class ReplicaHeartbeat:
    """`view()` is this replica's ReplicaView (its age is ignored)."""

    def __init__(self, aredis: Any, prefix: str, replica: str, metrics: ServeMetrics,
                 view: Callable[[], ReplicaView]) -> None:
        self.aredis, self.replica, self.metrics, self.view = aredis, replica, metrics, view
        self.key = f"{prefix}serve:replicas"

    async def run(self) -> None:
        while True:
            state = {**self.view().model_dump(mode="json", exclude={"age_s"}), "ts": time.time()}
            try:
                await self.aredis.hset(self.key, self.replica, json.dumps(state))
            except STORE_ERRORS as exc:
                self.metrics.survived("heartbeat", exc, "Redis unavailable: /v1/models of other replicas will "
                                                        "not list this one")
            await asyncio.sleep(HEARTBEAT_S)

    async def others(self, now: float) -> dict[str, ReplicaView]:
        """Every other replica's heartbeat younger than REPLICA_STALE_S (older ones are deleted)."""
        views: dict[str, ReplicaView] = {}
        try:
            raw = await self.aredis.hgetall(self.key)
            stale = []
            for rid, state in raw.items():
                try:
                    st = json.loads(state)
                    if now - st["ts"] > REPLICA_STALE_S:
                        stale.append(rid)
                        continue
                    view = ReplicaView(scenes=st["scenes"], pins=st.get("pins", {}),
                                       experiments=st.get("experiments", {}), age_s=round(now - st["ts"], 3))
                except HEARTBEAT_ERRORS as exc:
                    self.metrics.survived("replicas", exc, f"heartbeat of replica {rid!r} does not parse; left out")
                    continue
                views[rid.decode()] = view
            if stale:
                await self.aredis.hdel(self.key, *stale)
        except STORE_ERRORS as exc:
            self.metrics.survived("replicas", exc, "Redis unavailable: /v1/models shows the answering replica only")
        return views


__all__ = ["HEARTBEAT_ERRORS", "HEARTBEAT_S", "REPLICA_STALE_S", "STORE_ERRORS", "ReplicaHeartbeat"]
