"""The impression of one recommendation answer, as the request path learns it.

`Shown` is filled in while a request runs (its id first, then the user's pseudonym, then the
variant the experiment follower chose) and turned into the `impressions` record (the contract:
`streaming.events.Impression`) once the answer is built: positions are the items' order, 1-based.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.api_schema import RecommendResponse


@dataclass
class Shown:
    """One answer's impression as the request path learns it (streaming/events.py `Impression`)."""

    request_id: str
    user: str | None  # the pseudonym (never the raw id)
    scene: str
    variant: str
    experiment: str | None

    def record(self, answer: RecommendResponse) -> dict:
        return {"request_id": self.request_id, "user_id": self.user, "scene": self.scene, "version": answer.version,
                "variant": self.variant, "experiment": self.experiment,
                "item_ids": [i.item_id for i in answer.items], "scores": [i.score for i in answer.items],
                "fallback": answer.fallback, "ts": int(time.time() * 1000)}


__all__ = ["Shown"]
