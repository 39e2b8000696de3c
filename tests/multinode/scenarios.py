"""Multi-node scenarios: each builds a two-node Ray cluster on this machine, runs one part of the
pipeline across it, tears it down and writes what it observed to a JSON file.

    python -m tests.multinode.scenarios {train,data,serve} --json out.json

Run as a subprocess by tests/multinode/test_multinode.py, never inside the pytest process: the
test session already holds a local Ray runtime (`ray_local`), and one process can be the driver of
one Ray cluster only.

The cluster: `ray.cluster_utils.Cluster` (Ray's documented way to run several nodes on one
machine), chosen over `ray start --address=...` because every process it starts (GCS, raylets,
workers, the dashboard) is a child of this process, `remove_node` stops exactly one node's
processes, and `shutdown` stops only this cluster's -- where `ray stop` would kill every Ray process
on the machine, the pytest session's included. `RAY_TMPDIR` points at a private temporary
directory, so this cluster's session files and its `ray_current_cluster` address file never touch
/tmp/ray, which other Ray instances on the machine use.

Each node gets one CPU (the CI machine has two cores; the data scenario's nodes two, see
`DATA_NODE_CPUS`) and a custom resource naming it (`HEAD_RESOURCE`, `NODE_B_RESOURCE`: labels in
`ray.cluster_resources()`, requested by nothing). The spread is forced where the code allows it, and
always verified from Ray's state API (`ray.util.state.list_actors` / `list_tasks`, `node_id`) or from
the API's own answers, never assumed:

* train: `fit` asks one CPU per worker, so its two workers cannot share a one-CPU node; the worker
  SIGKILLed (its pid from the fault-injection pid files) is the one the state API places on node B;
* data: Ray Data runs the feature job's tasks with its default "SPREAD" strategy (6 log files: 6 read
  tasks); catalog embedding gets small batches and public `DataContext` settings so that a 40-item
  catalog is shared by both pool actors (`scenario_data` says why each is needed);
* serve: two replicas with `max_replicas_per_node=1`, the HTTP proxy on the head only, and the proxy's
  preference for replicas on its own node off (`CLUSTER_ENV`), so node B's replica takes traffic;
  /v1/models answers name the replica that answered, which the state API places on a node.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

HEAD_RESOURCE = "node_head"
NODE_B_RESOURCE = "node_b"
NODE_CPUS = 1  # per node: the CI machine has two cores
# With 1 CPU per node, catalog embedding used to deadlock (its pool actors held the CPUs a `repartition`
# task then needed; training/embed.py now cuts the blocks itself): the data scenario runs on 1 CPU too.
DATA_NODE_CPUS = 1
NODE_OBJECT_STORE_BYTES = 150 * 2**20  # Cluster's own default, spelled out: two stores on a small machine
NODE_START_TIMEOUT_S = 60.0
STATE_LIMIT = 10_000  # rows asked of the state API (its default, 100, can cut a list short)
POLL_S = 0.05
STATE_SETTLE_S = 20.0  # the most a scenario waits for the state API to show tasks on both nodes
STATE_FLUSH_S = 1.5  # > Ray's task-event report interval (1 s)

# train
TRAIN_EPOCHS = 4
KILL_AFTER_EPOCH = 1  # SIGKILL node B's worker once epoch KILL_AFTER_EPOCH runs and a checkpoint is registered
TRAIN_WAIT_S = 300.0

# data
DATA_LOG_CHUNKS = 3  # the event log is written in this many flushes x 2 partitions = 6 files (6 read tasks)
DATA_EVENTS = 6000
EMBED_ITEMS = 40
EMBED_ACTORS = 2  # one pool actor per node (ACTOR_CPUS = 0.5 each: both would fit on one node)
EMBED_ACTORS_START_S = 120  # the most the pool waits for its actors (each loads MiniLM) before it dispatches

# serve
SERVE_ITEMS = 40
SERVE_APP = "streamrec-mn"
REPLICA_CLASS = f"ServeReplica:{SERVE_APP}:Api"  # Serve's class name for the app's `Api` replicas, whose actor
# names end in "#<replica id>", the id /v1/models answers with
SERVE_READY_S = 120.0
CLIENT_INTERVAL_S = 0.1  # a low request rate: ~10 requests/s
CLIENT_TIMEOUT_S = 10.0
ANSWERED_BEFORE_STOP = 20  # answers before node B is stopped (and both replicas among those answering)
MODELS_EVERY = 3  # every third request is GET /v1/models, whose answer names the answering replica
ANSWERED_AFTER_STOP = 50  # answers after the stop before the client ends
SERVE_AFTER_S = 60.0  # the most the client waits for ANSWERED_AFTER_STOP answers


def _log(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class TwoNodes:
    cluster: Any  # ray.cluster_utils.Cluster
    head: Any  # ray._private.node.Node
    node_b: Any
    head_id: str
    node_b_id: str
    started_s: float

    def name_of(self, node_id: str | None) -> str:
        return {self.head_id: "head", self.node_b_id: "node_b"}.get(node_id or "", f"other:{node_id}")


@contextlib.contextmanager
def two_node_cluster(cpus: int = NODE_CPUS) -> Iterator[TwoNodes]:
    """A head (the driver's node) and node B, `cpus` CPUs each; the driver (this process) connected."""
    temp = tempfile.mkdtemp(prefix="srmn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    os.environ["RAY_TMPDIR"] = temp
    ray_temp = os.path.join(temp, "ray")  # where Ray looks under RAY_TMPDIR (its address file included)
    os.makedirs(ray_temp)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from streaming.ray_runtime import RAY_WORKER_NICENESS_ENV

    for name, value in RAY_WORKER_NICENESS_ENV.items():  # as ensure_ray starts a local instance
        os.environ.setdefault(name, value)
    import ray
    from ray.cluster_utils import Cluster

    from services.processes import free_port

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "resources": {HEAD_RESOURCE: 1}, "object_store_memory": NODE_OBJECT_STORE_BYTES,
        # the state API (list_actors / list_tasks) is served by the dashboard
        "include_dashboard": True, "dashboard_port": free_port(), "temp_dir": ray_temp})
    try:
        node_b = cluster.add_node(num_cpus=cpus, resources={NODE_B_RESOURCE: 1},
                                  object_store_memory=NODE_OBJECT_STORE_BYTES, temp_dir=ray_temp)
        cluster.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = TwoNodes(cluster, cluster.head_node, node_b, cluster.head_node.node_id, node_b.node_id,
                         time.perf_counter() - t0)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if alive != {nodes.head_id, nodes.node_b_id}:
            raise RuntimeError(f"expected two live nodes {nodes.head_id}, {nodes.node_b_id}; Ray lists {alive}")
        _log(f"two nodes up in {nodes.started_s:.1f} s: head {nodes.head_id[:8]}, node_b {nodes.node_b_id[:8]}")
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def actors_by_class(nodes: TwoNodes, contains: str) -> list[dict]:
    """Every actor (alive or dead) whose class name contains `contains`: class, state, pid, node."""
    from ray.util.state import list_actors

    return [{"class": a.class_name, "name": a.name, "state": a.state, "pid": a.pid, "node": nodes.name_of(a.node_id)}
            for a in list_actors(limit=STATE_LIMIT, detail=True) if contains in (a.class_name or "")]


def tasks_per_node(nodes: TwoNodes, keep: Callable[[Any], bool]) -> dict[str, Counter]:
    """Finished-or-running task attempts per node, by task name, for the tasks `keep` selects."""
    from ray.util.state import list_tasks

    out: dict[str, Counter] = {}
    for t in list_tasks(limit=STATE_LIMIT, detail=True):
        if t.node_id and keep(t):
            out.setdefault(nodes.name_of(t.node_id), Counter())[t.name] += 1
    return out


def settled_tasks(nodes: TwoNodes, keep: Callable[[Any], bool]) -> dict[str, Counter]:
    """`tasks_per_node` once it shows both nodes and two reads one report interval apart agree, or as it
    is after STATE_SETTLE_S: Ray reports task events to the state API asynchronously."""
    deadline, last = time.monotonic() + STATE_SETTLE_S, None
    while True:
        now = tasks_per_node(nodes, keep)
        if (len(now) >= 2 and now == last) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(STATE_FLUSH_S)  # one report interval between the two reads compared


# --- train ------------------------------------------------------------------------------------------

def scenario_train(nodes: TwoNodes, work: Path) -> dict:
    """Ray Train DDP, one worker per node; node B's worker SIGKILLed once a checkpoint exists."""
    from streaming.datasets import load_dataset
    from tests.training.test_training import QUICK, SMALL_MODEL, SPEC
    from training.corpus import Corpus, leave_one_out, training_windows
    from training.fault_injection import FAULT_ENV, WORKER_PIDS, worker_pid_file
    from training.lm import resolve_base_model
    from training.model import ModelConfig
    from training.ray_trainer import PROGRESS_FILE, fit

    corpus = Corpus.from_dataset(load_dataset(SPEC, work / "unused"))
    split = leave_one_out(corpus)
    cfg = ModelConfig(base_model=resolve_base_model(None), **SMALL_MODEL)
    tcfg = dataclasses.replace(QUICK, epochs=TRAIN_EPOCHS)
    windows = training_windows(split.train_items, split.train_ts, cfg.max_len)
    run_dir = work / "train"
    os.environ[FAULT_ENV] = WORKER_PIDS  # the workers write their pids (training/fault_injection.py)
    box: dict = {}

    def run() -> None:
        try:
            # threads_per_worker=1: one CPU per node; max_failures=2 as the single-node kill test
            box["result"] = fit(windows=windows, item_ids=corpus.catalog.item_ids, item_texts=corpus.catalog.texts,
                                warm=split.train_counts() > 0, model_config=cfg, train_config=tcfg, run_dir=run_dir,
                                workers=2, max_failures=2, progress=False, threads_per_worker=1)
        except BaseException as e:  # reported in the JSON, not lost in a thread
            box["error"] = repr(e)

    t0 = time.perf_counter()
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + TRAIN_WAIT_S
    placement, killed, kill_at = None, None, None
    while time.monotonic() < deadline and runner.is_alive():
        try:
            progress = json.loads((run_dir / PROGRESS_FILE).read_text())
            ready = progress["epoch"] >= KILL_AFTER_EPOCH and progress["steps"] > 0 and checkpoint_registered(run_dir)
            pids = {r: int(worker_pid_file(run_dir, r).read_text()) for r in (0, 1)} if ready else None
        except (OSError, ValueError, KeyError):
            pids = None
        if pids:
            # which rank runs on node B: the pid files name the ranks, the state API the actors' nodes
            workers = {a["pid"]: a["node"] for a in actors_by_class(nodes, "RayTrainWorker") if a["state"] == "ALIVE"}
            if set(pids.values()) <= set(workers):
                placement = {str(r): workers[pid] for r, pid in pids.items()}
                victim = next((r for r, node in placement.items() if node == "node_b"), None)
                if victim is None:
                    break  # no worker on node B: reported, the test fails on the placement
                killed = {"rank": int(victim), "pid": pids[int(victim)], "during_epoch": progress["epoch"],
                          "registered_checkpoint": checkpoint_registered(run_dir)}
                kill_at = time.perf_counter() - t0
                _log(f"epoch {progress['epoch']} running; SIGKILL rank {victim} (pid {killed['pid']}) on node_b")
                os.kill(killed["pid"], signal.SIGKILL)
                break
        time.sleep(POLL_S)
    runner.join(timeout=TRAIN_WAIT_S)
    seconds = time.perf_counter() - t0
    result = box.get("result")
    all_workers = actors_by_class(nodes, "RayTrainWorker")
    return {
        "placement_at_kill": placement, "killed": killed, "kill_at_s": kill_at,
        "error": box.get("error") or (None if not runner.is_alive() else "fit still running"),
        "epochs": [h["epoch"] for h in result.history] if result else None,
        "world": [h.get("world") for h in result.history] if result else None,
        "losses": [h["loss"] for h in result.history] if result else None,
        "restored_from_epoch": result.restored_from_epoch if result else None,
        "train_seconds": seconds,
        # every worker actor of the run, the killed group's and the restarted one's
        "worker_actors": all_workers,
        "worker_nodes": dict(Counter(a["node"] for a in all_workers)),
    }


def checkpoint_registered(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train's controller has registered for the run (from its checkpoint
    manager snapshot), or None. A worker killed before that restarts the group from scratch:
    reported checkpoints are registered asynchronously, after `ray.train.report` returns."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    try:
        # "ray": the RunConfig name training/ray_trainer.py's fit gives the run, under run_dir
        snapshot = json.loads((run_dir / "ray" / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return str(latest.get("checkpoint_dir_name") if isinstance(latest, dict) else latest) if latest else None


# --- data -------------------------------------------------------------------------------------------

def scenario_data(nodes: TwoNodes, work: Path) -> dict:
    """The Ray Data feature job on a generated event log, then catalog embedding, on both nodes."""
    from streaming.datasets import load_dataset
    from streaming.features import run_features
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter, synthetic_catalog
    from tests.streaming.test_features import write
    from tests.training.test_training import SPEC, log_rows, settings_for
    from training.adapter import ADAPTER_FILE, EMBEDDINGS_FILE, read_embeddings
    from training.embed import embed_catalog
    from training.registry import Registry

    import numpy as np

    settings = settings_for(work / "data")
    ds = load_dataset(SPEC, work / "unused")
    offsets = {0: 0, 1: 0}
    write(settings, "items", [{**r, "deleted": False, "partition": 0, "offset": i, "ingest_ts": 0}
                              for i, r in enumerate(ds.items.to_pylist())])
    # Several log files, as several consumer flushes leave them: one read task per file, so Ray Data
    # has more than one task to spread (one file would be one block on one node).
    step = DATA_EVENTS // DATA_LOG_CHUNKS
    for start in range(0, DATA_EVENTS, step):
        write(settings, "events", log_rows(ds, start, start + step, offsets))
    t0 = time.perf_counter()
    features = run_features(settings, progress=False)
    features_s = time.perf_counter() - t0
    # Task events reach the state API asynchronously (about once a second): wait until both nodes show up.
    feature_tasks = settled_tasks(nodes, lambda t: t.type == "NORMAL_TASK")

    registry = Registry(str(work / "registry"))
    publish_synthetic_adapter(registry, work / "staging", n_items=EMBED_ITEMS, seed=1)
    ids, _, texts = synthetic_catalog(EMBED_ITEMS)
    t1 = time.perf_counter()
    # A 40-item catalog is too small to need two actors, so Ray Data, left to its defaults, gives all of
    # it to one: with 256-row batches the catalog is one bundle; with smaller ones, every bundle still
    # goes to the first actor that is up (actors start asynchronously, the bundles' data is on the head,
    # and an actor takes several bundles at a time). So, for this run only: batches of a quarter of the
    # catalog, the pool waits for both its actors, dispatch ignores locality and an actor holds one
    # bundle at a time (public DataContext fields, read when embed_catalog builds its dataset).
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = int(EMBED_ACTORS_START_S)
    ctx.execution_options.actor_locality_enabled = False
    ctx.max_tasks_in_flight_per_actor = 1
    # A whole CPU per pool actor for this run: two actors of training/embed.py's 0.5 CPU both fit on the
    # head's one CPU (Ray places them where they fit first), and the point here is one per node.
    import training.embed as embed_module

    embed_module.ACTOR_CPUS = 1.0
    emb = embed_catalog(registry.open("default") / ADAPTER_FILE, ids, texts, np.ones(EMBED_ITEMS, dtype=bool),
                        actors=EMBED_ACTORS, batch_rows=EMBED_ITEMS // (2 * EMBED_ACTORS),
                        in_process_max_items=0)  # the pool, not the small-catalog path: the point is the two nodes
    embed_s = time.perf_counter() - t1
    # the same catalog embedded in one process when the adapter was published (the fixture's item table)
    _, _, published = read_embeddings(registry.open("default") / EMBEDDINGS_FILE)

    def pool_task(kind: str) -> Callable[[Any], bool]:
        return lambda t: t.type == "ACTOR_TASK" and (t.name or "").startswith("MapWorker(") and t.name.endswith(kind)

    embed_calls = settled_tasks(nodes, pool_task(".submit"))  # a batch embedded, on the node of its actor
    pool_actors = settled_tasks(nodes, pool_task(".get_location"))  # each pool actor asked once where it is
    return {
        "features": {"version": features.version, "new_files": features.new_files, "new_events": features.new_events,
                     "users_touched": features.users_touched, "seconds": features_s},
        "feature_tasks_per_node": {n: sum(c.values()) for n, c in feature_tasks.items()},
        "feature_task_names": {n: dict(c) for n, c in feature_tasks.items()},
        "embed": {"shape": list(emb.shape), "max_norm_error": float(np.abs(np.linalg.norm(emb, axis=1) - 1).max()),
                  "max_abs_diff_vs_published": float(np.abs(emb - published).max()),
                  "seconds": embed_s},
        "embed_actor_nodes": {n: sum(c.values()) for n, c in pool_actors.items()},
        "embed_calls_per_node": {n: sum(c.values()) for n, c in embed_calls.items()},
    }


# --- serve ------------------------------------------------------------------------------------------

def scenario_serve(nodes: TwoNodes, work: Path) -> dict:
    """Two API replicas, one per node; node B stopped while a client keeps asking."""
    import redis
    import requests
    from ray import serve

    from services.processes import free_port
    from services.serve_app import build_app
    from streaming.settings import load_settings, settings_env
    from tests.fixtures.redis_server import RedisServer
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter, seed_serving_store
    from training.registry import Registry

    redis_proc = RedisServer(work / "redis", appendfsync=None).start()
    try:
        prefix, port = "mn:", free_port()
        settings = load_settings(redis_url=redis_proc.url, redis_prefix=prefix, data_dir=work / "serve",
                                 registry_root=str(work / "registry"), api_keys=("k1",), serve_port=port,
                                 impressions_enabled=False)
        r = redis.Redis.from_url(redis_proc.url)
        seed_serving_store(r, settings, SERVE_ITEMS)
        version = publish_synthetic_adapter(Registry(settings.registry_uri), work / "staging", n_items=SERVE_ITEMS,
                                            seed=1)
        # The proxy on the head only: every node of this cluster has the same IP, so a proxy per node
        # would fight over one port; and the client's entry point must outlive node B.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        app = build_app(settings_env(settings), replicas=2, max_replicas_per_node=1)
        t0 = time.perf_counter()
        serve.run(app, name=SERVE_APP, route_prefix="/")
        base, headers = f"http://127.0.0.1:{port}", {"X-API-Key": "k1"}
        deadline = time.monotonic() + SERVE_READY_S
        while time.monotonic() < deadline:
            try:
                resp = requests.get(f"{base}/readyz", timeout=2)
                if resp.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        replicas_before = actors_by_class(nodes, REPLICA_CLASS)
        proxies = actors_by_class(nodes, "ProxyActor")

        log: list[dict] = []  # one entry per request: t (s since t0), ok, status or error
        stop_client = threading.Event()

        def client() -> None:
            session = requests.Session()
            while not stop_client.is_set():
                t = time.perf_counter() - t0
                which = len(log) % MODELS_EVERY == 0  # then ask /v1/models: its answer names the replica
                try:
                    if which:
                        resp = session.get(f"{base}/v1/models", headers=headers, timeout=CLIENT_TIMEOUT_S)
                    else:
                        resp = session.get(f"{base}/v1/recommendations", params={"user_id": "u1", "k": 5},
                                           headers=headers, timeout=CLIENT_TIMEOUT_S)
                    body = resp.json() if resp.status_code == 200 else None
                    if which:
                        ok = resp.status_code == 200 and body["scenes"]["default"]["version"] == version
                    else:
                        ok = resp.status_code == 200 and body["version"] == version and len(body["items"]) == 5
                    log.append({"t": t, "ok": ok, "status": resp.status_code, "replica": body.get("replica") if which
                                and body else None, "error": None if ok else resp.text[:300]})
                except (requests.RequestException, ValueError, KeyError) as e:
                    log.append({"t": t, "ok": False, "status": None, "error": repr(e)[:300]})
                stop_client.wait(CLIENT_INTERVAL_S)

        def answered_since(t: float) -> int:
            return sum(1 for e in list(log) if e["ok"] and e["t"] >= t)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        replica_node = {r: a["node"] for a in replicas_before for r in [a["name"].rsplit("#", 1)[-1]]}

        def answered_by(since: float, until: float = float("inf")) -> dict[str, int]:
            return dict(Counter(replica_node.get(e["replica"], f"replica:{e['replica']}") for e in list(log)
                                if e["ok"] and e.get("replica") and since <= e["t"] < until))

        # Serve records no task events for its requests: the answering replica comes from /v1/models.
        # Node B stops once both replicas have answered.
        wait_until(lambda: set(answered_by(0)) >= {"head", "node_b"} and answered_since(0) >= ANSWERED_BEFORE_STOP,
                   SERVE_READY_S)
        stop_from = time.perf_counter() - t0
        _log("stopping node_b under traffic")
        # node B's raylet, workers and its replica stop: SIGTERM, then SIGKILL what is left (as `ray stop` on it)
        nodes.cluster.remove_node(nodes.node_b, allow_graceful=True)
        stop_to = time.perf_counter() - t0
        answered = wait_until(lambda: answered_since(stop_to) >= ANSWERED_AFTER_STOP, SERVE_AFTER_S)
        stop_client.set()
        thread.join(timeout=2 * CLIENT_TIMEOUT_S)
        replicas_after = actors_by_class(nodes, REPLICA_CLASS)
        status = serve.status().applications[SERVE_APP]
        failed = [e for e in log if not e["ok"]]
        serve.delete(SERVE_APP)
        serve.shutdown()
    finally:
        redis_proc.stop()
    return {
        "version": version, "ready_s": ready_s,
        "replicas_before": replicas_before, "replica_nodes_before": sorted(a["node"] for a in replicas_before
                                                                             if a["state"] == "ALIVE"),
        "proxy_nodes": sorted(a["node"] for a in proxies if a["state"] == "ALIVE"),
        "replicas_after": replicas_after,
        "answered_by_node_before_stop": answered_by(0, stop_from),
        "answered_by_node_after_stop": answered_by(stop_to),
        "stop_window_s": [stop_from, stop_to], "answered_after_stop_in_time": answered,
        "requests": len(log),
        "requests_before_stop": sum(1 for e in log if e["t"] < stop_from),
        "requests_during_stop": sum(1 for e in log if stop_from <= e["t"] < stop_to),
        "requests_after_stop": sum(1 for e in log if e["t"] >= stop_to),
        "failed_before_stop": sum(1 for e in failed if e["t"] < stop_from),
        "failed_during_stop": sum(1 for e in failed if stop_from <= e["t"] < stop_to),
        "failed_after_stop": sum(1 for e in failed if e["t"] >= stop_to),
        "failures": failed[:20],
        "last_request_t": log[-1]["t"] if log else None,
        "app_status": str(status.status),
        "deployment_status": {name: str(d.status) for name, d in status.deployments.items()},
    }


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL_S)
    return condition()


SCENARIOS = {"train": scenario_train, "data": scenario_data, "serve": scenario_serve}
# Environment a scenario's cluster starts with (its raylets' workers, Serve's proxy among them, inherit it).
# serve: Serve's proxy sends a request to a replica on its own node while that one has room, so at a
# low rate node B's replica would never get one, and stopping node B would test nothing. On a real
# cluster every node's proxy takes traffic; here the one proxy picks among all replicas instead.
CLUSTER_ENV = {"serve": {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--json", type=Path, required=True, help="where to write what the scenario observed")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t0 = time.perf_counter()
    os.environ.update(CLUSTER_ENV.get(args.scenario, {}))
    work = Path(tempfile.mkdtemp(prefix=f"streamrec-multinode-{args.scenario}-"))
    try:
        with two_node_cluster(DATA_NODE_CPUS if args.scenario == "data" else NODE_CPUS) as nodes:
            observed = SCENARIOS[args.scenario](nodes, work)
            observed["cluster_start_s"] = nodes.started_s
            observed["node_ids"] = {"head": nodes.head_id, "node_b": nodes.node_b_id}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    observed["scenario"] = args.scenario
    observed["wall_s"] = time.perf_counter() - t0
    args.json.write_text(json.dumps(observed, indent=2, default=str))
    _log(f"{args.scenario}: {observed['wall_s']:.1f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
