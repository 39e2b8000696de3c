"""Ingest SIGKILLed N times with events flowing: every event counted exactly once.

Two `streamrec ingest` processes of one group split the partitions; the victim is SIGKILLed at a
random point of progress (its own Redis watermarks say how far it got) and restarted, `kills`
times, while a feeder keeps producing. Then both drain the topic and stop. Lost / duplicated
come from the offline log's event ids and from Redis's counts; `check_stores` also compares every
item's popularity and a sample of users' recent items with the events sent, checks that no two log
files of a partition overlap and that the survivor held partitions too (tests/test_chaos.py runs this
scenario as the suite's one ingest SIGKILL test). Recovery: from a SIGKILL until
the restarted consumer holds partitions again (the group back to two members)."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from bench.chaos_scenarios.common import (
    Feeder,
    ScenarioResult,
    count_loss,
    event,
    isolated_settings,
    log_tail,
    popularity_total,
    progress,
    spawn_cli,
    terminate,
    wait_for,
)
from streaming.online_store import OnlineStore
from streaming.redis_io import make_redis

NAME = "ingest-sigkill"
RECENT_USERS_CHECKED = 60  # users whose recent items are compared with the events sent (a seeded sample)
JOIN_TIMEOUT_S = 120.0  # a restarted consumer under CPU contention: interpreter start + group join
DRAIN_TIMEOUT_S = 240.0
PROGRESS_STEP = (200, 1200)  # events the victim's group applies between two kills (random in this range)


def run(kafka_bootstrap: str, redis_url: str, workdir: Path, *, kills: int = 5, rate: float = 600.0,
        seed: int = 3) -> ScenarioResult:
    result = ScenarioResult(NAME)
    settings = isolated_settings(kafka_bootstrap, redis_url, workdir / "data", max_poll_records=400,
                                 log_flush_records=1500, log_flush_interval_s=0.3)
    store = OnlineStore(make_redis(settings), settings.redis_prefix, settings.recent_items_max)

    def applied() -> int:
        return sum(max(store.watermark(settings.events_topic, p) + 1, 0) for p in range(settings.topic_partitions))

    feeder = Feeder(settings, rate, tag="k")
    feeder.start()
    rng = random.Random(seed)
    survivor = spawn_cli(settings, workdir / "ingest-0.log", "ingest", "--no-progress", "--features-every", "0")
    victim = spawn_cli(settings, workdir / "ingest-1.log", "ingest", "--no-progress", "--features-every", "0")
    recoveries: list[float] = []
    killed_at = time.monotonic()
    try:
        for k in range(1, kills + 1):
            log_path = victim.log_path
            wait_for(lambda: "assigned" in log_tail(log_path, 10**6), JOIN_TIMEOUT_S, f"consumer {k} to get partitions")
            if k > 1:
                recoveries.append(time.monotonic() - killed_at)
            target = applied() + rng.randint(*PROGRESS_STEP)
            wait_for(lambda: applied() >= target, JOIN_TIMEOUT_S, f"ingestion to pass {target} events")
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed_at = time.monotonic()
            progress(f"{NAME}: kill {k}/{kills} at {target} events applied")
            victim = spawn_cli(settings, workdir / f"ingest-{k + 1}.log", "ingest", "--no-progress",
                               "--features-every", "0")
        log_path = victim.log_path
        wait_for(lambda: "assigned" in log_tail(log_path, 10**6), JOIN_TIMEOUT_S, "the last restart to get partitions")
        recoveries.append(time.monotonic() - killed_at)
        n = feeder.stop()
        progress(f"{NAME}: {n} events sent, draining")
        try:
            wait_for(lambda: popularity_total(settings) >= n, DRAIN_TIMEOUT_S, "every event to be counted")
            wait_for(lambda: applied() >= n, DRAIN_TIMEOUT_S, "the watermarks to cover every event")
        except TimeoutError as exc:
            result.problems.append(str(exc))
    finally:
        if feeder.is_alive():
            feeder.stop()
        codes = [terminate(p) for p in (survivor, victim)]
    for proc, rc in zip((survivor, victim), codes):
        result.check(rc == 0, f"{' '.join(proc.args[2:])} exited {rc}: {log_tail(proc.log_path, 800)}")
    # The log is flushed on a clean stop; count from it and from Redis.
    count_loss(result, settings, {event("k", i)["event_id"] for i in range(feeder.sent)})
    check_stores(result, settings, store, [event("k", i) for i in range(feeder.sent)], survivor.log_path, rng)
    result.recovery_s = max(recoveries, default=0.0)
    result.notes.append(f"{kills} SIGKILLs; restarted consumer back in the group after "
                        f"{', '.join(f'{r:.1f}' for r in recoveries)} s")
    return result


def check_stores(result: ScenarioResult, settings, store: OnlineStore, events: list[dict], survivor_log: Path,
                 rng: random.Random) -> None:
    """Beyond the counts: every item's popularity and a sample of users' recent items (newest first) are
    exactly what the events sent make them, the log files of a partition never overlap (a restarted
    consumer's file starts past the last one written before the kill), and the survivor held partitions
    too (the group really split the work)."""
    from collections import Counter, defaultdict

    from streaming.offline_log import OfflineLog
    from streaming.pseudonym import Pseudonymizer

    expected_pop = Counter(ev["item_id"] for ev in events)
    got_pop = store.popularity(sorted(expected_pop))
    wrong = {item: (got_pop.get(item), n) for item, n in expected_pop.items() if got_pop.get(item) != n}
    result.check(not wrong, f"{len(wrong)} items' popularity (got, sent) differs: {dict(list(wrong.items())[:3])}")
    latest: dict[str, dict[str, int]] = defaultdict(dict)  # user -> item -> last ts
    for ev in events:
        seen = latest[ev["user_id"]]
        seen[ev["item_id"]] = max(ev["ts"], seen.get(ev["item_id"], 0))
    pseudonym = Pseudonymizer.from_settings(settings)
    for user in rng.sample(sorted(latest), min(RECENT_USERS_CHECKED, len(latest))):
        newest = sorted(latest[user], key=lambda item: -latest[user][item])[: settings.recent_items_max]
        got = store.recent_items(pseudonym(user))
        result.check(got == newest, f"user {user}'s recent items are {got}, the events sent make them {newest}")
    last_end: dict[int, int] = {}
    for f in OfflineLog(settings.log_dir).list_files(settings.events_topic):
        result.check(f.start > last_end.get(f.partition, -1), f"overlapping log files at {f}")
        last_end[f.partition] = f.end
    result.check("assigned" in log_tail(survivor_log, 10**6), "the surviving consumer never held partitions")
