"""Pseudonymized user ids: what every store holds instead of the id a producer or client sent.

    streamrec privacy pseudonym alice        # prints alice's pseudonym (support lookups)
    streamrec privacy rotate-key --yes       # a new key; every stored pseudonym is migrated

A user id is replaced by a keyed hash the moment it enters: ingest pseudonymizes every event
before Redis, the offline log, the feature tables, training data, adapter files or a log line see
it, and the API hashes the raw id of a request the same way before it reads Redis. Without the key
a pseudonym cannot be linked back to a person, nor a person's id to their pseudonym.

The hash: HMAC-SHA256 over the UTF-8 id, hex, truncated to `PSEUDONYM_HEX_CHARS` (32 hex = 128
bits: the chance that two of a billion users collide is about 1e-21).

Keys, oldest first, form a chain: pseudonym = H(k_n, ... H(k_2, H(k_1, user_id))). Rotation
(`rotate_key`, chosen over a dual-key period) appends a key and migrates every stored pseudonym p
to H(k_new, p) -- possible without the raw ids, because the new link only needs the old pseudonym.
A leaked old key alone no longer links anyone: the stores hold pseudonyms under the new one.
(A dual-key period would instead split every user's history in two until the old data aged out,
and a forget request in between would have to be honoured under both keys.)

Where the keys come from (`Pseudonymizer.from_settings`):
* `STREAMREC_PSEUDONYM_KEYS` (a Secret on Kubernetes): comma-separated hex keys, oldest first;
* else the key file `STREAMREC_PSEUDONYM_KEY_FILE` (default `<data_dir>/secrets/pseudonym.key`,
  one hex key per line). The embedded default creates it with one random key on first use, mode
  0600 in a 0700 directory, so the quick start needs no setup; processes starting together agree
  on one key (the file is created with O_EXCL and every loser reads the winner's).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

PSEUDONYM_HEX_CHARS = 32  # 128 bits of the HMAC-SHA256
KEY_BYTES = 32  # a new key: 256 random bits
MIN_KEY_BYTES = 16
KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
# Raw id -> pseudonym memo: ingest sees the same users again and again (an HMAC costs ~1 us in
# Python; a dict hit ~50 ns). Cleared when full, so memory stays bounded.
CACHE_MAX_ENTRIES = 200_000
# A forget tombstone names its user by a one-way marker of the pseudonym, so the durable tombstones
# (log/forget/) hold neither the raw id nor the pseudonym (streaming.forget).
MARKER_DOMAIN = b"streamrec-forget\0"
KEY_FILE_HEADER = "# streamrec pseudonym keys, oldest first (streaming/pseudonym.py). Secret: back it up, never share.\n"


class PseudonymKeyError(ValueError):
    """The pseudonym keys are missing, malformed or unreadable (a configuration error: exit 2)."""


def pseudonym_step(key: bytes, value: str) -> str:
    """One link of the chain: HMAC-SHA256(key, value), hex, truncated."""
    return hmac.digest(key, value.encode("utf-8", "surrogatepass"), "sha256").hex()[:PSEUDONYM_HEX_CHARS]


def forget_marker(pseudonym: str) -> str:
    """The one-way marker a tombstone stores for a pseudonym (sha256, truncated like a pseudonym)."""
    return hashlib.sha256(MARKER_DOMAIN + pseudonym.encode("ascii")).hexdigest()[:PSEUDONYM_HEX_CHARS]


def parse_keys(text: str, source: str) -> tuple[bytes, ...]:
    """Hex keys separated by commas or newlines (oldest first) -> bytes; `source` names where they came from."""
    keys = []
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for n, part in enumerate(p.strip() for p in ",".join(lines).split(",")):
        if not part:
            continue
        try:
            key = bytes.fromhex(part)
        except ValueError:
            raise PseudonymKeyError(f"{source}: key #{n + 1} is not hex (expected {2 * KEY_BYTES} hex characters, "
                                    f"e.g. from `python -c 'import secrets; print(secrets.token_hex({KEY_BYTES}))'`)") from None
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"{source}: key #{n + 1} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
        keys.append(key)
    if not keys:
        raise PseudonymKeyError(f"{source}: no key in it")
    return tuple(keys)


def new_key_hex() -> str:
    return secrets.token_hex(KEY_BYTES)


def key_file_path(settings: Any) -> Path:
    return Path(settings.pseudonym_key_file) if settings.pseudonym_key_file else \
        Path(settings.data_dir) / "secrets" / "pseudonym.key"


def write_key_file(path: Path, keys: tuple[bytes, ...], *, replace: bool = True) -> None:
    """Write the key file (mode 0600 from its first byte); `replace`: atomically over an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=KEY_DIR_MODE)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(KEY_FILE_HEADER)
        fh.write("".join(k.hex() + "\n" for k in keys))
        fh.flush()
        os.fsync(fh.fileno())
    if replace:
        os.replace(tmp, path)


def load_or_create_key_file(path: Path, *, create: bool) -> tuple[bytes, ...]:
    """The keys in `path`; with `create`, a new file with one random key when there is none."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=KEY_DIR_MODE)
        # Written whole under a private name, then hard-linked into place: link() fails when the
        # name exists, so of processes starting together exactly one key wins and nobody ever
        # reads a half-written file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
        write_key_file(tmp, (bytes.fromhex(new_key_hex()),), replace=False)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PseudonymKeyError(f"pseudonym key file {path} does not exist; set STREAMREC_PSEUDONYM_KEYS or "
                                f"STREAMREC_PSEUDONYM_KEY_FILE") from None
    except OSError as exc:
        raise PseudonymKeyError(f"pseudonym key file {path}: {exc.strerror}") from None
    return parse_keys(text, f"pseudonym key file {path}")


class Pseudonymizer:
    """Raw user id -> pseudonym under a key chain (see the module docstring). Thread-safe enough:
    the memo is a dict whose worst race is computing one HMAC twice."""

    def __init__(self, keys: tuple[bytes, ...]):
        if not keys:
            raise PseudonymKeyError("at least one pseudonym key is needed")
        self.keys = tuple(keys)
        self._memo: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Any, *, create: bool = True) -> "Pseudonymizer":
        if settings.pseudonym_keys is not None:
            return cls(parse_keys(settings.pseudonym_keys.get_secret_value(), "STREAMREC_PSEUDONYM_KEYS"))
        return cls(load_or_create_key_file(key_file_path(settings), create=create))

    @property
    def generation(self) -> int:
        """How many keys the chain has: the pseudonyms' generation (1 before any rotation)."""
        return len(self.keys)

    def __call__(self, user_id: str) -> str:
        p = self._memo.get(user_id)
        if p is None:
            p = user_id
            for key in self.keys:
                p = pseudonym_step(key, p)
            if len(self._memo) >= CACHE_MAX_ENTRIES:
                self._memo.clear()
            self._memo[user_id] = p
        return p

    def chain(self, user_id: str) -> list[str]:
        """The pseudonym after each key: [generation 1, ..., generation n] (the last is `self(user_id)`)."""
        out, p = [], user_id
        for key in self.keys:
            p = pseudonym_step(key, p)
            out.append(p)
        return out

    def rotated(self, new_key: bytes) -> "Pseudonymizer":
        return Pseudonymizer((*self.keys, new_key))


__all__ = ["KEY_BYTES", "PSEUDONYM_HEX_CHARS", "PseudonymKeyError", "Pseudonymizer", "forget_marker", "key_file_path",
           "load_or_create_key_file", "new_key_hex", "parse_keys", "pseudonym_step", "write_key_file"]
