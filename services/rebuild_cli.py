"""`streamrec rebuild-online`: the command around `streaming.online_rebuild` (exit statuses, the
embedded Redis, the progress bar, the summary line).

    streamrec rebuild-online            # into an empty Redis: refused when keys exist under the prefix
    streamrec rebuild-online --force    # delete every key under the prefix first, then rebuild

Exit 0 when rebuilt; 2 when it cannot start and the user must act first (no log, Redis not
answering, keys already under the prefix, a bad setting); 1 when Redis fails midway (the store
is then partial: rerun with --force).
"""

from __future__ import annotations

import typer

from services.cli_common import EXIT_CONFIG, fail, settings_or_exit, setup_logging

# A Redis address that does not answer (a firewall drops the packets) fails after this long,
# not after the system's TCP timeout of minutes.
REDIS_CONNECT_TIMEOUT_S = 10.0


def rebuild_online(
    force: bool = typer.Option(False, "--force", help="Delete every key under STREAMREC_REDIS_PREFIX in the target "
                               "Redis first (default: refuse a target that holds any)."),
    kafka: bool = typer.Option(True, "--kafka/--no-kafka", help="When Kafka is configured or the embedded broker runs, "
                               "raise the watermarks to the ingest group's committed offsets (over records that went "
                               "to the DLQ). --no-kafka: from the log alone."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (log files applied)."),
) -> None:
    """Rebuild the Redis online store from the Parquet offline log, when Redis is lost for good.

    Stop every `streamrec ingest` first. Rebuilds recent items per user (under STREAMREC_USER_TTL_S),
    popularity, the catalog, the feature push and the per-partition watermarks into
    STREAMREC_REDIS_URL (the embedded Redis when unset); then start ingest again."""
    setup_logging()
    import redis
    from tqdm import tqdm

    from streaming.online_rebuild import RebuildError, rebuild_online as rebuild

    settings = settings_or_exit()
    if settings.redis_url is None:
        from services.stack import StackError, start_stack

        try:
            settings = settings.model_copy(update={"redis_url": start_stack(settings.data_dir, kafka=False).redis_url})
        except StackError as exc:
            raise fail(str(exc), EXIT_CONFIG) from None
    committed = committed_offsets_or_none(settings) if kafka else None
    from streaming.redis_io import RedisRefused, RedisUnavailable, check_redis, make_redis, shown_url

    try:
        check_redis(settings, timeout_s=REDIS_CONNECT_TIMEOUT_S)
    except RedisRefused as exc:  # a refused password or ACL user: configuration
        raise fail(str(exc), EXIT_CONFIG) from None
    except RedisUnavailable:  # not answering: the rebuild's own check reports it (its exit status)
        pass
    client = make_redis(settings, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S)
    typer.echo(f"rebuilding {shown_url(settings)} (prefix {settings.redis_prefix!r}) from {settings.log_dir}", err=True)
    bars: list = []  # made once the checks passed and the number of files is known

    def show(stage: str, n: int) -> None:
        if stage == "total":
            bars.append(tqdm(total=n, desc="rebuild-online", unit=" file", disable=not progress))
        else:
            bars[0].update(n)

    try:
        result = rebuild(settings, client, force=force, committed=committed, progress=show)
    except RebuildError as exc:
        raise fail(str(exc), EXIT_CONFIG) from None
    except redis.RedisError as exc:
        raise fail(f"Redis at {shown_url(settings)} failed during the rebuild ({exc}); the store is partial: "
                   f"rerun `streamrec rebuild-online --force`") from None
    finally:
        for bar in bars:
            bar.close()
    marks = ", ".join(f"{t}: {len(p)} partition(s)" for t, p in sorted(result.watermarks.items())) or "none"
    feats = f"feature version {result.feature_version}" if result.feature_version is not None else "no feature version yet"
    cleared = f"; {result.deleted_keys} earlier key(s) deleted" if result.deleted_keys else ""
    typer.echo(
        f"rebuilt in {result.seconds:.1f} s: {result.events} events ({result.event_files} files), {result.items} "
        f"catalog records ({result.item_files} files), {result.users} user keys ({result.expired_users} expired "
        f"under the TTL), {feats} pushed, watermarks {marks}{cleared}. Start `streamrec ingest` again."
    )


def committed_offsets_or_none(settings):
    """The ingest group's committed offsets (`streaming.online_rebuild.committed_offsets`), or None (with a note) when
    no Kafka is configured and no embedded broker runs; an unreachable configured one exits 2."""
    from services.stack import stack_status
    from streaming.kafka_io import KafkaUnavailable
    from streaming.online_rebuild import committed_offsets

    if settings.kafka_bootstrap_servers is None:
        info = stack_status(settings.data_dir)
        if info is None or info.kafka_bootstrap is None:
            typer.echo("no Kafka configured and no embedded broker running: watermarks from the log alone (a "
                       "partition that ended in DLQ records sends them to the DLQ once more)", err=True)
            return None
        settings = settings.model_copy(update={"kafka_bootstrap_servers": info.kafka_bootstrap})
    try:
        committed = committed_offsets(settings)
    except KafkaUnavailable as exc:
        raise fail(f"{exc}; rerun with --no-kafka to take the watermarks from the log alone", EXIT_CONFIG) from None
    if not committed:
        # The log says nothing of its broker: no commits of the group on this one is the hint that it
        # is another (restarted empty, topics recreated), whose offsets ingest would skip as applied.
        typer.secho(f"warning: the consumer group {settings.consumer_group!r} committed nothing on "
                    f"{settings.kafka_bootstrap_servers}: if that broker was restarted empty or its topics recreated "
                    "since the log was written, do not start ingest on this store: use `streamrec ingest --fresh` "
                    "(it archives the log and starts over)", fg=typer.colors.YELLOW, err=True)
    return committed


__all__ = ["rebuild_online"]
