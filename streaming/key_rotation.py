"""Rotating the pseudonym key: a migration, not a dual-key period (streaming.pseudonym says why).

    streamrec privacy rotate-key --yes              # stop ingest and the API first

Every stored pseudonym p becomes H(k_new, p), so the stores stay consistent with the new chain
without the raw ids:

1. a new key is drawn and kept in `<key file dir>/rotation.json` (mode 0600) with the files already
   migrated, so a rotation that dies at any step is finished by running the command again (same key);
2. every file of the offline event and impression logs is rewritten with its `user_id` column mapped (each file
   atomically, under its own name);
3. the new chain is written: to the key file, or -- when the keys come from STREAMREC_PSEUDONYM_KEYS
   (a Secret) -- to `--keys-out`, for the operator to put into the Secret before restarting;
4. the online store is rebuilt from the migrated log (`streamrec rebuild-online --force`'s code:
   recent items, popularity, catalog, watermarks), the only way to rename every user's key at once;
5. the feature tables are rebuilt from scratch (`streamrec features --full`'s code).

Forget tombstones need no migration: they carry the key generation they were made under, and ingest
checks an event's pseudonym at every generation of the chain (streaming.forget). Adapters hold no
user ids. The Kafka `events` topic keeps what producers sent (raw ids) for its retention; the DLQ
likewise (bad records are kept as sent, for debugging).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from streaming.offline_log import PARQUET_COMPRESSION, OfflineLog
from streaming.pseudonym import (
    KEY_FILE_MODE,
    Pseudonymizer,
    PseudonymKeyError,
    key_file_path,
    new_key_hex,
    pseudonym_step,
    write_key_file,
)
from streaming.versioned_store import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "rotation.json"


@dataclass
class RotationResult:
    generation: int  # the new chain's length
    files_rewritten: int
    users: int  # distinct pseudonyms migrated in the log
    keys_written_to: Path
    redis_keys_rebuilt: int  # users given a recent-items key by the rebuild


def state_path(settings: Any) -> Path:
    return key_file_path(settings).with_name(STATE_FILE)


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)  # holds the new key
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def migrate_file(log_: OfflineLog, path: str, new_key: bytes) -> int:
    """Rewrite one event (or impression) log file with every `user_id` p replaced by H(new_key, p) (an
    anonymous impression's null stays null); returns the users."""
    table = pq.read_table(path, filesystem=log_.fs)
    users = table.column("user_id")
    unique = pc.unique(users)
    mapped = pa.array([None if u is None else pseudonym_step(new_key, u) for u in unique.to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id",
                             mapped.take(pc.index_in(users, value_set=unique)))
    if isinstance(log_.fs, pafs.LocalFileSystem):
        atomic_write(path, lambda fh: pq.write_table(table, fh, compression=PARQUET_COMPRESSION))
    else:
        pq.write_table(table, path, filesystem=log_.fs, compression=PARQUET_COMPRESSION)
    return len(unique)


def rotate_key(settings: Any, *, keys_out: Path | None, rebuild_online: Callable[[], int],
               rebuild_features: Callable[[], Any], progress: Callable[[int, int], None] | None = None) -> RotationResult:
    """Steps 1-5 of the module docstring. `rebuild_online()` returns the users it wrote; both rebuilds
    are passed in so that the caller owns Redis and Ray."""
    from_env = settings.pseudonym_keys is not None
    if from_env and keys_out is None:
        raise PseudonymKeyError("the keys come from STREAMREC_PSEUDONYM_KEYS (a Secret): give --keys-out FILE for the "
                                "new chain, then put that file's keys into the Secret")
    old = Pseudonymizer.from_settings(settings, create=False)
    spath = state_path(settings)
    try:
        state = json.loads(spath.read_text())
    except FileNotFoundError:
        state = {"from_generation": old.generation, "new_key": new_key_hex(), "done": []}
    resumed_after_key = (state["from_generation"] == old.generation - 1 and old.keys[-1].hex() == state["new_key"])
    if resumed_after_key:  # the key file already holds the new chain: only the rebuilds were left
        old = Pseudonymizer(old.keys[:-1])
    elif state["from_generation"] != old.generation:
        raise PseudonymKeyError(f"{spath} belongs to a rotation from generation {state['from_generation']}, but the "
                                f"keys now have {old.generation}; finish it with the keys it started from, or delete "
                                f"it if the log was restored from before it")
    _write_state(spath, state)
    new_key = bytes.fromhex(state["new_key"])
    log_ = OfflineLog(settings.log_dir)
    # impressions hold pseudonyms too: attribution and hard negatives join them with the events by user
    files = [*log_.list_files(settings.events_topic), *log_.list_files(settings.impressions_topic)]
    done, users, rewritten = set(state["done"]), 0, 0
    for n, f in enumerate(files):
        if f.path not in done:
            users += migrate_file(log_, f.path, new_key)
            rewritten += 1
            state["done"].append(f.path)
            _write_state(spath, state)
        if progress is not None:
            progress(n + 1, len(files))
    chain = (*old.keys, new_key)
    target = keys_out if from_env else key_file_path(settings)
    write_key_file(Path(target), chain)
    log.info("pseudonym key rotated to generation %d: %d log files rewritten", len(chain), rewritten)
    redis_keys = rebuild_online()
    rebuild_features()
    spath.unlink()  # the log, the key, Redis and the features agree: nothing left to resume
    return RotationResult(len(chain), rewritten, users, Path(target), redis_keys)


__all__ = ["RotationResult", "migrate_file", "rotate_key", "state_path"]
