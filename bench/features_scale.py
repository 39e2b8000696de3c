"""Feature job at scale: a full run over N events, then the cost of each 100k new events at two history sizes.

    python bench/features_scale.py --events 1000000 --users 100000 --items 20000 --json bench/results/features.json

What it does (all under `<data_dir>/features-scale/`, emptied first, removed after unless kept; an ingest log in
`data_dir` is left alone):

1. writes a synthetic event log straight into ingest's Parquet layout (`streaming.offline_log`:
   `log/<events topic>/date=.../<topic>+<partition>+<first>+<last>.parquet`, `EVENT_LOG_SCHEMA`), in
   chunks of `CHUNK_EVENTS` (one file per partition per chunk, like one consumer flush), generated with
   numpy and written with pyarrow: never N events in Python lists. Users are uniform, items follow a
   power law (`ITEM_POPULARITY_EXPONENT`), timestamps grow with the offset (the usual append case);
   a catalog record per item goes to the items topic;
2. for each checkpoint -- 1,000,000 events and N, or N/10 and N when N <= 1,000,000 -- on a fresh log
   of exactly that many events (same seed, so the same first events): runs the job over all of it (the
   same `run_features` `streamrec features` runs, on local Ray), then appends `INCREMENT_EVENTS` new
   events and times an incremental run over them, `INCREMENT_REPEATS` times (the fastest counts: the
   machine is shared). The run over all N events is `features_full_s`; the co-visitation figures come
   from it.

Returns / prints (JSON): `features_full_s`, `features_incremental_s_per_100k` ({str(total events before the
increment): seconds per 100k new events}), `covisit_rows` (pair rows, both directions), `covisit_bytes`
(bytes of the `covisit_counts` files after the full run: per bucket its id file and the base's int64 pair
keys and counts, 16 bytes a pair, uncompressed so that they can be memory-mapped), `covisit_build_s`
(the full run's co-visitation stage, from the job's own `last_run.stage_s`), and `features_details`
(every run's wall and CPU seconds, stage timings, sizes -- the sequences' rows apart from their index,
`sequences_state` + `sequences_hashes`; `covisit_counts` with the delta segments an incremental run
left --, the buckets each run compacted and the most segments a bucket holds, for the sequences
(`segments_max`) and the co-visitation counts (`covisit_segments_max`), settings; `incremental_cpu_s_per_100k`:
the same map in CPU seconds of this process and the local Ray it started -- steadier than wall seconds on a
shared machine; psutil, when installed; `incremental_spread_per_100k`: mean and max over the repeats, wall
and CPU, since a run that compacts sequence segments costs more than one that only appends -- the mean over
many repeats, `--repeats`, is the amortized cost).
`bench/ingest.py` calls `measure_feature_job(settings, events=, users=, items=)` and merges the dict.

Flat means: the seconds per 100k at N are about those at the first checkpoint (incremental work
proportional to the new data). Compare checkpoints where users already hold at least `covisit_window`
events each (1M events over 100k users: 10): below that, each new event pairs with fewer stored ones,
so the co-visitation deltas per new event (`pair_deltas` per run) grow with the history until then --
new-data work, not history work. Every run's `stage_s` (the job's own timings: sequences, covisit,
popularity, items, attribution) says which part grows. Redis is not involved (no popularity
push): the job's own work only. N = 10,000,000 needs about 1.5 GB of disk (log + three kept versions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

from streaming.events import EVENT_LOG_SCHEMA, ITEM_LOG_SCHEMA  # noqa: E402
from streaming.features import read_manifest, run_features  # noqa: E402
from streaming.features.tables import entry_files  # noqa: E402
from streaming.offline_log import OfflineLog  # noqa: E402
from streaming.settings import Settings, load_settings  # noqa: E402

CHUNK_EVENTS = 100_000  # events generated and written per chunk (one log file per partition each)
INCREMENT_EVENTS = 100_000  # new events per timed incremental run
INCREMENT_REPEATS = 2  # timed incremental runs per checkpoint (the fastest is reported)
FIRST_CHECKPOINT_EVENTS = 1_000_000  # history size of the first incremental measurement when N > this
SMALL_CHECKPOINT_DIVISOR = 10  # ...else N / this
ITEM_POPULARITY_EXPONENT = 0.9  # item k (1-based rank) is drawn with weight k^-exponent
TS0_MS = 1_700_000_000_000  # first event time, epoch ms
TS_STEP_MS = 50  # event time grows this much per offset (20 events/s in every partition)
EVENT_TYPES = ("view", "click", "purchase")
EVENT_TYPE_WEIGHTS = (0.7, 0.25, 0.05)
SCENES = ("home", "search")
SUBDIR = "features-scale"


class SyntheticLog:
    """Appends synthetic events to the offline log, chunk by chunk, in ingest's layout."""

    def __init__(self, settings: Settings, *, users: int, items: int, seed: int = 0):
        if users < 1 or items < 2:
            raise ValueError(f"need users >= 1 and items >= 2, got users={users} items={items}")
        self.settings, self.users, self.items = settings, users, items
        self.log = OfflineLog(settings.log_dir)
        self.partitions = settings.topic_partitions
        self.rng = np.random.default_rng(seed)
        weights = np.arange(1, items + 1, dtype=np.float64) ** -ITEM_POPULARITY_EXPONENT
        self.item_cdf = np.cumsum(weights / weights.sum())
        self.next_offset = np.zeros(self.partitions, dtype=np.int64)
        self.written = 0

    def write_catalog(self) -> None:
        ids = _ids("i", np.arange(self.items))
        n = self.items
        table = pa.table({
            "item_id": ids, "title": ids, "text": pa.nulls(n, pa.string()), "attributes": pa.nulls(n, pa.string()),
            "ts": pa.array(np.full(n, TS0_MS), pa.int64()), "deleted": pa.array(np.zeros(n, bool)),
            "partition": pa.array(np.zeros(n, np.int32)), "offset": pa.array(np.arange(n), pa.int64()),
            "ingest_ts": pa.array(np.zeros(n, np.int64)),
        }, schema=ITEM_LOG_SCHEMA)
        self.log.write(self.settings.items_topic, 0, table)

    def append(self, n_events: int) -> None:
        """`n_events` more events, written in chunks of `CHUNK_EVENTS`."""
        left = n_events
        while left > 0:
            n = min(CHUNK_EVENTS, left)
            self._chunk(n)
            left -= n

    def _chunk(self, n: int) -> None:
        rng = self.rng
        user = rng.integers(0, self.users, n)
        item = np.minimum(np.searchsorted(self.item_cdf, rng.random(n)), self.items - 1)
        kind = rng.choice(len(EVENT_TYPES), n, p=EVENT_TYPE_WEIGHTS)
        scene = rng.integers(-1, len(SCENES), n)  # -1: no scene
        part = (user % self.partitions).astype(np.int32)
        seq = np.arange(self.written, self.written + n)
        for p in range(self.partitions):
            rows = np.flatnonzero(part == p)
            if not len(rows):
                continue
            k = len(rows)
            offsets = self.next_offset[p] + np.arange(k)
            self.next_offset[p] += k
            scenes = pa.array(np.array(SCENES, dtype=object)[np.maximum(scene[rows], 0)], pa.string())
            scenes = pc.if_else(pa.array(scene[rows] < 0), pa.nulls(k, pa.string()), scenes)
            table = pa.table({
                "event_id": _ids("e", seq[rows]), "user_id": _ids("u", user[rows]), "item_id": _ids("i", item[rows]),
                "type": pa.array(np.array(EVENT_TYPES, dtype=object)[kind[rows]], pa.string()),
                "ts": pa.array(TS0_MS + seq[rows] * TS_STEP_MS, pa.int64()), "scene": scenes,
                "context": pa.nulls(k, pa.string()), "request_id": pa.nulls(k, pa.string()),
                "position": pa.nulls(k, pa.int64()), "partition": pa.array(np.full(k, p, np.int32)),
                "offset": pa.array(offsets, pa.int64()), "ingest_ts": pa.array(np.zeros(k, np.int64)),
            }, schema=EVENT_LOG_SCHEMA)
            self.log.write(self.settings.events_topic, p, table)
        self.written += n


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(prefix, numbers.astype(np.int64).astype(str)).astype(object), pa.string())


def _tree_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process and its descendants -- the local Ray
    instance and its workers, which this process started -- or None without psutil. On a shared machine
    a run's CPU seconds move much less with the load than its wall seconds."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


def _run(settings: Settings, *, full: bool = False) -> dict[str, Any]:
    """One feature run, timed (wall and CPU); its manifest's `last_run` and sizes."""
    cpu0, t0 = _tree_cpu_s(), time.monotonic()
    result = run_features(settings, full=full)
    wall = time.monotonic() - t0
    cpu1 = _tree_cpu_s()
    cpu = round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None
    manifest = read_manifest(settings) or {}
    last = manifest.get("last_run", {})
    root = Path(settings.features_dir)
    tables = manifest.get("tables", {})

    def nbytes(files: list[str]) -> int:
        return sum((root / f).stat().st_size for f in files)

    size = {name: nbytes([f for e in tables.get(name, []) for f in entry_files(name, e)])
            for name in ("covisit_counts", "covisit_topk")}
    seq = tables.get("sequences", [])
    # The sequences' rows (base + segments) and their index (per-user state + event-id hashes), apart:
    # the index is what an incremental run reads instead of the rows.
    size["sequences"] = nbytes([e["path"] for e in seq] + [g["path"] for e in seq for g in e.get("segments", [])])
    size["sequences_state"] = nbytes([e["state"] for e in seq if e.get("state")])
    size["sequences_hashes"] = nbytes([h for e in seq for h in [e.get("hashes"), *(g.get("hashes") for g in
                                                                                 e.get("segments", []))] if h])
    return {"wall_s": round(wall, 3), "cpu_s": cpu, "full": bool(last.get("full")), "new_events": result.new_events,
            "users_touched": result.users_touched, "pair_deltas": last.get("pair_deltas"),
            "stage_s": last.get("stage_s", {}), "compactions": last.get("compactions", {}),
            "segments_max": max((len(e.get("segments", [])) for e in seq), default=0),
            "covisit_segments_max": max((len(e.get("segments", [])) for e in tables.get("covisit_counts", [])),
                                        default=0),
            "counts": manifest.get("counts", {}), "bytes": size}


def checkpoints_for(events: int) -> list[int]:
    """History sizes (events) at which increments are timed: 1,000,000 and N, or N/10 and N."""
    first = FIRST_CHECKPOINT_EVENTS if events > FIRST_CHECKPOINT_EVENTS else events // SMALL_CHECKPOINT_DIVISOR
    return [first, events] if 0 < first < events else [events]


def measure_feature_job(settings: Settings, *, events: int, users: int, items: int,
                        checkpoints: list[int] | None = None, seed: int = 0, keep: bool = False,
                        repeats: int | None = None) -> dict[str, Any]:
    """The feature job's figures over a synthetic log of `events` events (see the module docstring).
    Works in `<settings.data_dir>/features-scale/` (emptied first; removed after unless `keep`)."""
    if events < 1:
        raise ValueError(f"events must be >= 1, got {events}")
    points = sorted(checkpoints or checkpoints_for(events))
    if points[-1] != events or points[0] < 1:
        raise ValueError(f"checkpoints must lie in 1..{events} and end at events={events}, got {points}")
    data_dir = Path(settings.data_dir) / SUBDIR
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        return _measure(settings.model_copy(update={"data_dir": data_dir}), events, users, items, points, seed,
                        INCREMENT_REPEATS if repeats is None else repeats)
    finally:
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def _measure(s: Settings, events: int, users: int, items: int, points: list[int], seed: int,
             repeats: int) -> dict[str, Any]:
    from streaming.ray_runtime import ensure_ray

    ensure_ray(s.ray_address)  # started before any timing
    runs: list[dict[str, Any]] = []
    per_100k: dict[str, float] = {}
    cpu_per_100k: dict[str, float | None] = {}
    spread: dict[str, dict[str, float]] = {}
    full: dict[str, Any] = {}
    t_gen = 0.0
    for point in points:
        # Each checkpoint on a log of exactly `point` events (the same seed: the same first events), built
        # from scratch, so the last build is THE full run over N and increments never pile into a history.
        shutil.rmtree(s.data_dir, ignore_errors=True)
        log = SyntheticLog(s, users=users, items=items, seed=seed)
        t0 = time.monotonic()
        log.write_catalog()
        log.append(point)
        t_gen += time.monotonic() - t0
        full = _run(s, full=True)
        full.update(label=f"full over {point}")
        runs.append(full)
        times, cpus = [], []
        for _ in range(repeats):
            before = log.written
            t0 = time.monotonic()
            log.append(INCREMENT_EVENTS)
            t_gen += time.monotonic() - t0
            r = _run(s)
            r.update(label=f"+{INCREMENT_EVENTS} over {before}")
            runs.append(r)
            times.append(r["wall_s"])
            cpus.append(r["cpu_s"])
        per_100k[str(point)] = round(min(times) * 100_000 / INCREMENT_EVENTS, 3)
        cpu_per_100k[str(point)] = None if None in cpus else round(min(cpus) * 100_000 / INCREMENT_EVENTS, 3)
        # A run that compacts costs more than one that appends: the mean and the max over the repeats too.
        spread[str(point)] = {"wall_mean": round(float(np.mean(times)) * 100_000 / INCREMENT_EVENTS, 3),
                              "wall_max": round(max(times) * 100_000 / INCREMENT_EVENTS, 3),
                              **({} if None in cpus else {
                                  "cpu_mean": round(float(np.mean(cpus)) * 100_000 / INCREMENT_EVENTS, 3),
                                  "cpu_max": round(max(cpus) * 100_000 / INCREMENT_EVENTS, 3)})}

    return {
        "features_full_s": full["wall_s"],
        "features_incremental_s_per_100k": per_100k,
        "covisit_rows": int(full["counts"].get("covisit_pairs", 0)),
        "covisit_bytes": int(full["bytes"]["covisit_counts"]),
        "covisit_build_s": float(full["stage_s"].get("covisit", 0.0)),
        "features_details": {
            "events": events, "users": users, "items": items, "increment_events": INCREMENT_EVENTS,
            "increment_repeats": repeats, "checkpoints": points,
            "incremental_cpu_s_per_100k": cpu_per_100k, "incremental_spread_per_100k": spread,
            "full_cpu_s": full["cpu_s"], "generate_s": round(t_gen, 3),
            "user_buckets": s.user_buckets, "covisit_buckets": getattr(s, "covisit_buckets", None),
            "covisit_window": s.covisit_window, "partitions": s.topic_partitions, "cpus": os.cpu_count(),
            "runs": runs,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="N: events in the log for the full run")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--checkpoints", type=str, default=None,
                    help="comma-separated history sizes for the increments (default: 1000000,N or N/10,N)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="work in <data-dir>/features-scale/ and keep it (default: a temporary directory, removed)")
    ap.add_argument("--repeats", type=int, default=INCREMENT_REPEATS,
                    help="timed incremental runs per checkpoint (more shows segment compaction: mean and max)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args()
    tmp = None
    if a.data_dir is None:
        tmp = tempfile.mkdtemp(prefix="streamrec-features-scale-")
    settings = load_settings(data_dir=a.data_dir or Path(tmp))
    points = [int(x) for x in a.checkpoints.split(",")] if a.checkpoints else None
    try:
        out = measure_feature_job(settings, events=a.events, users=a.users, items=a.items, checkpoints=points,
                                  keep=a.data_dir is not None, repeats=a.repeats)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    emit(out, a.json, indent=2)


if __name__ == "__main__":
    main()
