"""A client of the streamrec HTTP API for the demo and `up`'s readiness wait (`GET /readyz`).

One `requests.Session` per client (connections are reused between the many small requests of
the demo), one timeout for every request, and one error type: `ApiError`, for a server that is
not there yet, an error status or a body that is not JSON -- what a caller polling a starting
server treats as "not yet".
"""

from __future__ import annotations

from typing import Any

import requests

HTTP_TIMEOUT_S = 15.0
"""Longest wait for one answer."""


class ApiError(RuntimeError):
    """The API did not answer, answered with an error status, or not with JSON."""


class ApiClient:
    """`GET /healthz`, `GET /readyz`, `GET|POST /v1/recommendations` and `GET /v1/items/{id}/similar` at
    `base_url`."""

    def __init__(self, base_url: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self.session = requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, self.base_url + path, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as exc:
            raise ApiError(f"{method} {self.base_url}{path}: {exc}") from exc

    def _json(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> dict[str, Any]:
        resp = self._call(method, path, **kwargs)
        if resp.status_code not in ok:
            raise ApiError(f"{method} {self.base_url}{path}: HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ApiError(f"{method} {self.base_url}{path}: not JSON: {resp.text[:200]!r}") from exc

    def health(self) -> dict[str, Any]:
        """Liveness: the answering replica runs, with its scenes' versions."""
        return self._json("GET", "/healthz")

    def readiness(self) -> dict[str, Any]:
        """`GET /readyz` of the answering replica: `ready`, and each scene's `state` (loaded, loading,
        fallback). A 503 is an answer here too (not ready yet, same body); anything else is ApiError."""
        return self._json("GET", "/readyz", ok=(200, 503))

    def ready(self, scene: str | None = None) -> bool:
        """Whether the API can answer: ready, and `scene` (when given) loaded or on a declared fallback."""
        body = self.readiness()
        return body.get("ready") is True and (scene is None or scene in (body.get("scenes") or {}))

    def served_version(self, scene: str = "default") -> str | None:
        """The adapter version the API serves for `scene` (None: none yet)."""
        return (self.health().get("scenes") or {}).get(scene)

    def recommendations(self, user_id: str, k: int = 10, query: str | None = None) -> dict[str, Any]:
        """The top `k` for `user_id`: a GET, or with a text `query` a POST (the query blends in)."""
        if query is None:
            return self._json("GET", "/v1/recommendations", params={"user_id": user_id, "k": k})
        return self._json("POST", "/v1/recommendations", json={"user_id": user_id, "k": k, "query": query})

    def similar(self, item_id: str, k: int = 10) -> dict[str, Any]:
        return self._json("GET", f"/v1/items/{item_id}/similar", params={"k": k})

    def knows_item(self, item_id: str) -> bool:
        """Whether the index holds `item_id` (its similar-items route answers)."""
        return self._call("GET", f"/v1/items/{item_id}/similar", params={"k": 1}).status_code == 200

    def close(self) -> None:
        self.session.close()


__all__ = ["HTTP_TIMEOUT_S", "ApiClient", "ApiError"]
