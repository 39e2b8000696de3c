"""`streamrec forget` and `streamrec privacy ...`: the commands around streaming.forget,
streaming.pseudonym and streaming.key_rotation.

    streamrec forget alice                       # right to be forgotten (exit 0 once the broker has it)
    streamrec privacy pseudonym alice            # what the stores hold for alice
    streamrec privacy rotate-key --yes           # new key, every stored pseudonym migrated

Exit 2 for what the user must fix first (no key, a bad id, a Secret-held key without --keys-out),
1 for a failure midway (rerun: every step is idempotent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from services.cli_common import EXIT_CONFIG, fail, guard, settings_or_exit, setup_logging, with_stack

privacy_app = typer.Typer(help="Pseudonymized user ids: look one up, rotate the key.", no_args_is_help=True)

USER_ID_HELP = "The user id as producers and API clients send it (it is hashed here; never stored raw)."


def _pseudonymizer(settings):
    from streaming.pseudonym import Pseudonymizer, PseudonymKeyError

    try:  # never create a key here: a new key would name a different person than ingest's
        return Pseudonymizer.from_settings(settings, create=False)
    except PseudonymKeyError as exc:
        raise fail(f"{exc}. `streamrec ingest` creates the key on its first start; on Kubernetes mount the "
                   "streamrec-pseudonym Secret", EXIT_CONFIG) from None


def _user_id(user_id: str) -> str:
    from streaming.events import ID_MAX_LEN

    if not user_id.strip() or len(user_id) > ID_MAX_LEN:
        raise fail(f"USER_ID {user_id[:40]!r}: must be 1..{ID_MAX_LEN} characters, not blank", EXIT_CONFIG)
    return user_id


def forget(user_id: str = typer.Argument(..., help=USER_ID_HELP)) -> None:
    """Forget a user: publish a tombstone to STREAMREC_FORGET_TOPIC (the right to be forgotten).

    Every `streamrec ingest` then deletes the user's online state and log rows and refuses their
    past events for good (a replay cannot bring them back); the next feature run drops them; the
    continuous trainer replaces adapters trained on them within STREAMREC_FORGET_RETRAIN_S, and the
    new adapter's manifest lists the tombstone id printed here."""
    setup_logging()
    from streaming.forget import new_tombstone, publish_tombstone

    settings = with_stack(settings_or_exit())
    tombstone = new_tombstone(_pseudonymizer(settings), _user_id(user_id))
    guard(lambda: publish_tombstone(settings, tombstone))
    typer.echo(f"tombstone {tombstone.tombstone_id} published to {settings.forget_topic!r} for pseudonym "
               f"{tombstone.pseudonym}: ingest erases the user's online state and log rows within seconds; "
               f"adapters trained on them are replaced within {settings.forget_retrain_s:g} s "
               f"(STREAMREC_FORGET_RETRAIN_S)")


@privacy_app.command("pseudonym")
def pseudonym(user_id: str = typer.Argument(..., help=USER_ID_HELP)) -> None:
    """Print the pseudonym the stores hold for USER_ID (for support lookups in Redis or the log)."""
    setup_logging()
    settings = settings_or_exit()
    typer.echo(_pseudonymizer(settings)(_user_id(user_id)))


@privacy_app.command("rotate-key")
def rotate_key(
    yes: bool = typer.Option(False, "--yes", help="Confirm that every `streamrec ingest` and the API are stopped."),
    keys_out: Optional[Path] = typer.Option(None, "--keys-out", help="Where to write the new key chain when the keys "
                                            "come from STREAMREC_PSEUDONYM_KEYS (then copy it into the Secret)."),
    kafka: bool = typer.Option(True, "--kafka/--no-kafka", help="Raise the rebuilt Redis watermarks to ingest's "
                               "committed offsets (as `streamrec rebuild-online` does)."),
) -> None:
    """Rotate the pseudonym key: a new key, and every stored pseudonym migrated to it.

    Stop ingest and the API first. Rewrites the offline log's user ids, writes the new key chain
    (key file, or --keys-out), rebuilds Redis from the log and the features from scratch. A run that
    dies midway is finished by running it again. See streaming/key_rotation.py."""
    setup_logging()
    from tqdm import tqdm

    from streaming.key_rotation import rotate_key as rotate
    from streaming.pseudonym import PseudonymKeyError

    if not yes:
        raise fail("rotate-key rewrites the log and rebuilds Redis: stop every `streamrec ingest` and the API "
                   "(`streamrec up`), then run it again with --yes", EXIT_CONFIG)
    settings = with_stack(settings_or_exit())
    _pseudonymizer(settings)  # a missing key: exit 2 before anything is touched
    bar = tqdm(unit="file", desc="migrating log files", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    def rebuild_redis() -> int:
        from services.rebuild_cli import committed_offsets_or_none
        from streaming.online_rebuild import rebuild_online
        from streaming.redis_io import make_redis

        committed = committed_offsets_or_none(settings) if kafka else None
        return rebuild_online(settings, make_redis(settings), force=True, committed=committed).users

    def rebuild_features() -> None:
        from streaming.features import run_features

        run_features(settings, full=True, progress=True)

    try:
        result = guard(lambda: rotate(settings, keys_out=keys_out, rebuild_online=rebuild_redis,
                                      rebuild_features=rebuild_features, progress=progress))
    except PseudonymKeyError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    finally:
        bar.close()
    typer.echo(f"rotated to key generation {result.generation}: {result.files_rewritten} log files rewritten "
               f"({result.users} pseudonyms), new key chain in {result.keys_written_to}, Redis rebuilt "
               f"({result.redis_keys_rebuilt} users' recent items), features rebuilt")
    if settings.pseudonym_keys is not None:
        typer.echo(f"next: put the keys of {result.keys_written_to} into the Secret (STREAMREC_PSEUDONYM_KEYS, "
                   "comma-separated), then restart ingest and the API")


__all__ = ["forget", "privacy_app"]
