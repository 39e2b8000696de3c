"""The API keys a replica accepts, compared in constant time, and the pseudonym each key's rate limit
is kept under.

A presented key is hashed (SHA-256) and its digest compared with every configured key's digest by
`hmac.compare_digest`, all of them, with no early exit: the time an answer takes says neither how
much of a key was right (digests of equal length, compared in constant time) nor which key of the
list matched (every comparison always runs). The raw keys are not kept.

The key's rate-limit bucket is a different hash (`bucket_id`: SHA-256 under a fixed label, 32 hex
digits), so what Redis holds (`<prefix>rl:<bucket>`) is neither the key nor the digest compared here.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

BUCKET_LABEL = b"streamrec:rate-limit:"  # domain separation: the bucket id is not the digest compared
BUCKET_HEX_CHARS = 32  # 128 bits: no two configured keys share a bucket


def bucket_id(key: str) -> str:
    """The name a key's rate-limit bucket has in Redis: a hash, never the key."""
    return hashlib.sha256(BUCKET_LABEL + key.encode()).hexdigest()[:BUCKET_HEX_CHARS]


class ApiKeys:
    """`match(presented)` -> the key's bucket id, or None when no configured key is `presented`."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._entries = [(hashlib.sha256(k.encode()).digest(), bucket_id(k)) for k in dict.fromkeys(keys)]

    def __bool__(self) -> bool:
        """False when no key is configured: the API is open."""
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for expected, bucket in self._entries:  # no break: every key is compared, whichever matches
            if hmac.compare_digest(digest, expected):
                found = bucket
        return found


__all__ = ["ApiKeys", "BUCKET_HEX_CHARS", "BUCKET_LABEL", "bucket_id"]
