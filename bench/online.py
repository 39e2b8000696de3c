"""Online bench (issue 17): the closed loop measured with simulated users -- does streamrec learn online,
do its experiments find the truth, do hard negatives help?

    python bench/online.py --json bench/results/online.json   # the full run (the lead's; CPU quiet)
    python bench/online.py --quick --json -                   # a small smoke run, JSON on stdout

One run starts the whole stack in a temporary data dir, as `streamrec up --no-train` does (services/up.py:
embedded broker + Redis, a local Ray head, ingest, and the Serve API once an adapter exists), publishes
a synthetic dataset's catalog and first events, and drives it with `services/simulate.py`'s users (their
true tastes are the dataset's planted truth; clicks go to Kafka with the answer's `request_id` and the
item's `position`). Training runs are explicit (preset quick, always published: `force`, so that every run
is measured online, not gated offline), each a child process with the parts' environment (like the demo's
steps: this process never connects to Ray). Three results:

(a) learning online -- `ctr_popular`: the popularity fallback (the feature job's snapshot in Redis that the
    API serves as `fallback: popular`, minus each user's seen items), before any adapter exists: the API
    only starts with one, so these answers are made here from that snapshot, with the same click model;
    `ctr_first_adapter`: the adapter trained on the dataset's first events; `ctr_after_incremental`: after
    each incremental run (`run_training(incremental=True)`) on everything since, the simulator's own clicks
    included. Each CTR is the simulator's over `--measure` requests, counted for the answers of the version
    under test (services/simulate.py: an impression is clicked when it got >= 1 click).
(b) an experiment that finds the truth -- a copy of the live adapter with its item embeddings shuffled and
    without its ranker and co-visitation prior (`degraded`; shuffled embeddings alone cost only ~4 CTR
    points in a smoke run: the ranker's other features carry the list), published not live, starts as a canary (training.experiments.start(kind="canary"), at
    `EXPERIMENT_PERCENT` % of users so that both arms fill at the same pace); traffic comes in chunks of
    `LOOK_EVERY` requests, and after each chunk the impressions and clicks are waited into the log
    (`settle`: read_attribution until it holds every answer and click the simulator saw -- conditions, no
    sleeps) and the canary review runs (training.canary.review_canary with the settings'
    canary_min_impressions M, alpha and margin). `degraded_rolled_back` and `degraded_decision_impressions`
    (the canary's impressions at the decision; it must come before M).
    A/A: `--aa-runs` (20) runs, each against a fresh identical copy of the live version with its own
    experiment id (a new user split) and simulator seed. `false_alarms` counts the runs in which the
    sequential test declared a difference at any look -- its always-valid confidence sequence for the
    CTR difference excluded 0 (training/experiment_stats.py), the same inputs the review reads; the runs
    whose copy was rolled back (the sequence below -margin x control's CTR) are `details.aa.rollbacks`. Each A/A run is cheap on purpose: M = `AA_MIN_IMPRESSIONS` (300)
    candidate impressions at a 50 % split is about 600 answers a run, 12k for the 20 runs -- minutes
    rather than the hour that the default M (2000) would take, and the confidence sequence's false-alarm
    guarantee (at most alpha over every look) does not depend on M; with fewer looks it only gets more
    conservative.
(c) hard negatives -- two adapters trained from scratch on the same feature version (everything above,
    impressions included): `TrainConfig.hard_negatives` off and on (preset `quick` / `quick+hard-negatives`);
    both published, then measured at the same time in a 50/50 manual experiment (the simulator's CTR per
    answering version), so that time and the users' growing histories weigh on both alike.

`--json [PATH]` writes the keys ctr_popular, ctr_first_adapter, ctr_after_incremental (list),
degraded_rolled_back, degraded_decision_impressions, false_alarms, false_alarm_runs, ctr_hard_negatives_on,
ctr_hard_negatives_off, and `details` (every figure behind them); `-` or no path: stdout. `--quick`: a
smaller dataset, fewer requests, 3 incremental runs and 3 A/A runs (false_alarm_runs says how many).
Progress goes to stderr. Exit 1 when the stack does not come up or a phase fails (the JSON then holds what was
measured before, and `details.error` says what failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCENE = "default"
PRESET, PRESET_HARD_NEGATIVES = "quick", "quick+hard-negatives"


@dataclass(frozen=True)
class Size:
    dataset: str
    first_events: int  # of the dataset's events, published before the first adapter
    measure: int  # requests per CTR measurement
    incremental_runs: int
    aa_runs: int
    degraded_max_requests: int  # the degraded canary's traffic budget (it should be rolled back long before)


# The first adapter sees few events per user (4), so that what the loop adds can show; topics outnumber the
# vocabularies (synthetic: past 10 topics they repeat with a suffix), so an item's text alone cannot tell
# its topic from two others and the item side must be learned from clicks; the catalog is large (30 items
# per topic) so that users do not run out of items they like as their clicks pile up (answers exclude
# what a user has seen). With 8 topics of distinct words the first adapter already answered within ~15%
# of the click model's ceiling and incremental runs had nothing left to show (0.484 -> 0.471, --quick).
FULL = Size("synthetic:n_users=400,n_items=1200,n_events=1600,n_topics=30,seed=11,p_follow=0.6",
            first_events=1600, measure=1500, incremental_runs=3, aa_runs=20, degraded_max_requests=8000)
QUICK = Size("synthetic:n_users=150,n_items=720,n_events=600,n_topics=24,seed=11,p_follow=0.6",
             first_events=600, measure=800, incremental_runs=3, aa_runs=3, degraded_max_requests=2000)
RESULT_KEYS = ("ctr_popular", "ctr_first_adapter", "ctr_after_incremental", "degraded_rolled_back",
               "degraded_decision_impressions", "false_alarms", "false_alarm_runs", "ctr_hard_negatives_on",
               "ctr_hard_negatives_off")  # the issue's keys; `details` comes after them
EXPERIMENT_PERCENT = 50.0  # of the users in the candidate arm: both arms fill at the same pace
AA_MIN_IMPRESSIONS = 300  # M of the A/A runs (the module docstring says why it is small)
AA_MAX_REQUESTS_FACTOR = 3  # an A/A run's traffic budget: this x M / the candidate's share
LOOK_EVERY = 100  # requests between two looks of the canary review
CONCURRENCY = 4
READY_TIMEOUT_S = 900.0  # the API serving a newly published version (the first one loads the model)
INGEST_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 120.0  # impressions and clicks reaching the log's attribution
TRAIN_TIMEOUT_S = 3600.0
POLL_S = 0.5


def progress(msg: str) -> None:
    print(f"[online {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


class WaitTimeout(BenchError):
    pass


# --- the training step (a child process with the parts' environment) -----------------------------
def train_step(args: argparse.Namespace) -> int:
    """`--train-step RESULT`: the feature job (unless --no-features), then a training run (unless
    --features-only), always published; the outcome as JSON in RESULT."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from streaming.settings import load_settings
    from streaming.versioned_store import atomic_write_json

    settings = load_settings()
    out: dict = {"published": None}
    if args.features:
        from streaming.features import run_features
        from streaming.redis_io import make_redis

        client = make_redis(settings)
        try:
            res = run_features(settings, redis_client=client, progress=False)
        finally:
            client.close()
        out["features_version"] = res.version
    if not args.features_only:
        from training.presets import get_preset
        from training.train_run import TrainRequest, run_training

        preset = get_preset(args.preset)
        t0 = time.monotonic()
        got = run_training(settings, TrainRequest(
            incremental=args.incremental, model_config=preset.model, train_config=preset.train_config(args.incremental),
            progress=False, force=True, force_reason="bench/online: every run is measured online"))
        out.update(published=got.published.version if got.published is not None else None, kind=got.kind,
                   detail=got.detail, metrics=dict(got.metrics), seconds=round(time.monotonic() - t0, 1))
    atomic_write_json(Path(args.train_step), out, durable=False)
    return 0


# --- the bench -------------------------------------------------------------------------------
class Bench:
    def __init__(self, size: Size, workdir: Path, seed: int) -> None:
        from streaming.datasets import load_dataset

        self.size, self.workdir, self.seed = size, workdir, seed
        self.ds = load_dataset(size.dataset, workdir / "datasets", progress=False)
        self.events = list(self.ds.event_dicts())[: size.first_events]
        self.seen: dict[str, set[str]] = {}
        for ev in self.events:
            self.seen.setdefault(ev["user_id"], set()).add(ev["item_id"])
        self.up = None
        self.api_answers = 0  # answers of the API the simulator saw (each is one impression)
        self.api_clicked = 0  # of them clicked (>= 1 click carrying its request_id)
        self.api_clicks = 0
        self.events_acked = 0  # click events Kafka acknowledged (ingest must log them all)
        self.settle_timeouts = 0
        self.steps = 0
        self._stop = threading.Event()

    # --- plumbing -------------------------------------------------------------------------------
    def start(self) -> None:
        from services.processes import free_port
        from services.up import Up, UpOptions
        from streaming.settings import load_settings

        data_dir = self.workdir / "data"
        port = free_port()
        settings = load_settings(
            data_dir=data_dir, features_interval_s=0.0, canary_percent=0.0, log_flush_interval_s=1.0,
            max_poll_interval_ms=3000, session_timeout_ms=3000, ingest_metrics_port=free_port(),
            kafka_bootstrap_servers=None, redis_url=None, ray_address=None)
        self.log = open(self.workdir / "up.log", "a", buffering=1)  # noqa: SIM115 - closed by stop()
        self.up = Up(settings, UpOptions(port=port, train=False), echo=lambda line: self.log.write(line + "\n"))
        self.base = f"http://127.0.0.1:{port}"
        progress(f"starting the stack in {data_dir} (API port {port}; parts' logs in {self.up.dir / 'logs'})")
        self.up.start()
        self.settings = self.up.settings
        threading.Thread(target=self._poll_up, name="up-poll", daemon=True).start()

    def _poll_up(self) -> None:
        from services.up import POLL_INTERVAL_S

        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.up.poll()
            self._stop.wait(POLL_INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()
        if self.up is not None:
            self.up.stop()
            self.log.close()

    def wait(self, cond, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            failed = self.up.failed()
            if failed:
                raise BenchError("; ".join(f"{st.part.name} failed: {st.reason}" for st in failed))
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise WaitTimeout(f"timed out after {timeout_s:.0f} s waiting for {what} (logs: {self.up.dir / 'logs'})")
            time.sleep(POLL_S)

    def registry(self):
        from training.registry import Registry

        return Registry(self.settings.registry_uri)

    def live(self) -> str | None:
        cur = self.registry().current(SCENE)
        return cur.version if cur else None

    def train(self, *, incremental: bool = False, preset: str = PRESET, features: bool = True,
              features_only: bool = False) -> dict:
        from services.demo_training import step_env

        self.steps += 1
        result = self.workdir / f"step-{self.steps}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--train-step", str(result), "--preset", preset,
                *(["--incremental"] if incremental else []), *([] if features else ["--no-features"]),
                *(["--features-only"] if features_only else [])]
        what = "features" if features_only else f"{'incremental' if incremental else 'full'} training ({preset})"
        progress(f"step {self.steps}: {what}")
        with open(self.workdir / f"step-{self.steps}.log", "wb") as out:
            code = subprocess.run(argv, env=step_env(self.up.env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=TRAIN_TIMEOUT_S, check=False).returncode
        if code != 0:
            tail = (self.workdir / f"step-{self.steps}.log").read_text(errors="replace")[-3000:]
            raise BenchError(f"step {self.steps} ({what}) exited with {code}:\n{tail}")
        got = json.loads(result.read_text())
        if not features_only:
            if got.get("published") is None:
                raise BenchError(f"step {self.steps} ({what}) published nothing: {got.get('detail')}")
            progress(f"  published {got['published']} in {got['seconds']} s ({got['kind']})")
        return got

    def served(self, version: str) -> None:
        from services.api_client import ApiClient, ApiError

        api = ApiClient(self.base, timeout_s=5)

        def serving() -> bool:
            with contextlib.suppress(ApiError):
                return api.served_version(SCENE) == version
            return False

        try:
            self.wait(serving, READY_TIMEOUT_S, f"the API to serve {version}")
        finally:
            api.close()

    def await_candidate(self, exp_id: str, candidate: str) -> None:
        """Wait until the API has loaded the experiment's candidate (`/v1/models`): until then its users
        get control, which would tilt the arms' user mix in the simulator's per-version CTR."""
        import requests

        def ready() -> bool:
            with contextlib.suppress(requests.RequestException, ValueError):
                view = (requests.get(f"{self.base}/v1/models", timeout=5).json().get("experiments") or {}).get(SCENE)
                if view and view.get("id") == exp_id:
                    if candidate in (view.get("failed") or {}):
                        raise BenchError(f"the API cannot load {candidate}: {view['failed'][candidate]}")
                    return candidate in (view.get("ready") or [])
            return False

        self.wait(ready, READY_TIMEOUT_S, f"the API to load the candidate {candidate} of {exp_id}")

    def await_ingest(self) -> None:
        from streaming.offline_log import OfflineLog

        s, n = self.settings, len(self.events) + self.events_acked
        log = OfflineLog(s.log_dir)
        self.wait(lambda: sum(f.end - f.start + 1 for f in log.list_files(s.events_topic)) >= n, INGEST_TIMEOUT_S,
                  f"{n:,} events in the offline log")

    # --- traffic --------------------------------------------------------------------------------
    def simulate(self, requests: int, seed: int, *, answer=None):
        """`requests` simulated requests (to the API, or to `answer`); the report. Counts what the log's
        attribution must come to hold."""
        from services.simulate import (
            DEFAULT_BUCKET,
            KafkaClicks,
            SimConfig,
            Simulator,
            run_simulation,
            summarize,
        )

        cfg = SimConfig(requests=requests, seed=seed, scene=SCENE, concurrency=CONCURRENCY, bucket=DEFAULT_BUCKET)
        if answer is None:
            rep = run_simulation(self.settings, self.ds, cfg, self.base, progress=False, check=False)
            self.api_answers += rep.impressions
            self.api_clicked += rep.attributable_clicked
            self.api_clicks += rep.clicks
        else:
            clicks = KafkaClicks(self.settings)

            def send(ev: dict) -> None:
                self.seen.setdefault(ev["user_id"], set()).add(ev["item_id"])
                clicks(ev)

            t0 = time.monotonic()
            try:
                outs = Simulator(self.ds, cfg, answer, send).run()
            finally:
                clicks.close()
            rep = summarize(outs, cfg.bucket, time.monotonic() - t0, 0, (clicks.sent, clicks.failed))
        self.events_acked += rep.events_sent - rep.events_failed
        return rep

    def popular_answer(self):
        """The API's popularity fallback, made here (no adapter, so no API yet): the feature job's
        snapshot in Redis, minus the user's seen items."""
        from services.api_schema import MAX_K
        from services.simulate import DEFAULT_K
        from streaming.online_store import popular_key
        from streaming.redis_io import make_redis

        client = make_redis(self.settings)
        try:
            snapshot = [m.decode() for m in client.zrevrange(popular_key(self.settings.redis_prefix), 0, MAX_K * 4)]
        finally:
            client.close()
        if not snapshot:
            raise BenchError("the feature job pushed no popularity snapshot to Redis")

        def answer(user: str):
            seen = self.seen.get(user, set())
            items = [{"item_id": i, "score": 0.0} for i in snapshot if i not in seen][:DEFAULT_K]
            return 200, {"items": items, "version": None, "fallback": "popular", "request_id": None}

        return answer

    def settle(self) -> None:
        """Wait until the log's attribution holds every answer and clicked answer the simulator saw."""
        from streaming.features.attribution import read_attribution

        def caught_up() -> bool:
            arms = read_attribution(self.settings, scene=SCENE).arms.values()
            return (sum(a.impressions for a in arms) >= self.api_answers
                    and sum(a.clicked for a in arms) >= self.api_clicked)

        try:
            self.wait(caught_up, SETTLE_TIMEOUT_S, "impressions and clicks in the log")
        except WaitTimeout as exc:  # impressions dropped (counted by the API): go on with what is there
            self.settle_timeouts += 1
            progress(f"  {exc}; going on")

    def arms(self, exp) -> tuple:
        from streaming.features.attribution import read_attribution
        from training.experiment_stats import Arm
        from training.experiments import CONTROL

        counts = {CONTROL: [0, 0], "candidate": [0, 0]}
        att = read_attribution(self.settings, scene=SCENE, experiment=exp.id, since_ms=exp.started_ms)
        for key, c in att.arms.items():
            variant = getattr(key, "variant", None) or key[2]
            side = CONTROL if variant == CONTROL else "candidate" if variant in exp.candidates else None
            if side:
                counts[side][0] += c.impressions
                counts[side][1] += c.clicked
        return Arm(*counts[CONTROL]), Arm(*counts["candidate"])

    # --- adapters -------------------------------------------------------------------------------
    def copy_version(self, version: str, *, degrade: bool) -> str:
        """Publish the files of `version` again, not live; `degrade`: item embeddings shuffled."""
        from training.adapter import (
            ADAPTER_FILE,
            COVIS_KEY,
            EMBEDDINGS_FILE,
            RANKER_KEY,
            load_adapter,
            read_embeddings,
            save_adapter,
            write_embeddings,
        )
        from training.registry import RESERVED_KEYS
        from training.registry_storage import MANIFEST

        reg = self.registry()
        src = Path(reg.open(SCENE, version))
        staged = Path(tempfile.mkdtemp(prefix="copy-", dir=self.workdir))
        for f in src.iterdir():
            if f.is_file() and f.name != MANIFEST:  # the registry writes the copy's own
                shutil.copy2(f, staged / f.name)
        if degrade:  # item embeddings shuffled; without the ranker and co-visitation prior, which alone rank well
            ids, warm, emb = read_embeddings(staged / EMBEDDINGS_FILE)
            perm = np.random.default_rng(self.seed).permutation(len(ids))
            write_embeddings(staged / EMBEDDINGS_FILE, ids, warm, emb[perm])
            adapter = load_adapter(staged / ADAPTER_FILE)
            adapter.pop(COVIS_KEY, None)
            adapter.pop(RANKER_KEY, None)
            save_adapter(adapter, staged / ADAPTER_FILE)
        manifest = {k: v for k, v in reg.get(SCENE, version).manifest.items() if k not in RESERVED_KEYS}
        manifest["note"] = f"bench/online: {'degraded (item embeddings shuffled, no ranker, no co-visitation)' if degrade else 'identical'} copy of {version}"
        info = reg.publish(SCENE, staged, manifest, make_live=False)
        shutil.rmtree(staged, ignore_errors=True)
        return info.version

    # --- an experiment under traffic ------------------------------------------------------------
    def experiment(self, candidate: str, *, min_impressions: int, seed: int, max_requests: int) -> dict:
        """A canary of `candidate` at EXPERIMENT_PERCENT under simulated traffic, reviewed after every
        LOOK_EVERY requests until it is promoted or rolled back (or the budget is spent)."""
        from training import experiments
        from training.canary import review_canary
        from training.experiment_stats import confidence_sequence

        reg = self.registry()
        exp = experiments.start(reg, SCENE, {candidate: EXPERIMENT_PERCENT}, kind="canary")
        self.await_candidate(exp.id, candidate)
        s = self.settings.model_copy(update={"canary_min_impressions": min_impressions,
                                             "canary_percent": EXPERIMENT_PERCENT})
        declared, looks, sent, action = False, [], 0, None
        ctrl = cand = None
        while sent < max_requests and action is None:
            self.simulate(LOOK_EVERY, seed=seed * 100_000 + len(looks))
            sent += LOOK_EVERY
            self.settle()
            ctrl, cand = self.arms(exp)
            diff, lo, hi = confidence_sequence(ctrl, cand, s.canary_alpha)
            declared = declared or lo > 0 or hi < 0
            looks.append({"control": [ctrl.impressions, ctrl.clicked], "candidate": [cand.impressions, cand.clicked],
                          "diff": round(diff, 5), "cs": [round(lo, 5), round(hi, 5)]})
            review_canary(s, reg, SCENE)  # what the continuous trainer does at every check
            state = experiments.read(reg, SCENE)
            if state.active is None or state.active.id != exp.id:
                entry = next((e for e in state.log if e.get("id") == exp.id and e.get("action") != "start"), {})
                action = entry.get("action", "ended")
        if action is None:
            experiments.end(reg, SCENE, "stop", "bench/online: traffic budget spent")
            action = "none"
        return {"candidate": candidate, "experiment": exp.id, "action": action, "declared_difference": declared,
                "candidate_impressions": cand.impressions if cand else 0,
                "control_impressions": ctrl.impressions if ctrl else 0, "requests": sent, "looks": looks}

    # --- the three results ----------------------------------------------------------------------
    def learning(self, out: dict) -> None:
        from streaming.producer import EventProducer

        with EventProducer(self.settings) as producer:
            for item in self.ds.item_dicts():
                producer.send_item(item)
            for ev in self.events:
                producer.send_event(ev)
            producer.flush(60)
        self.await_ingest()
        self.train(features_only=True)
        rep = self.simulate(self.size.measure, seed=self.seed, answer=self.popular_answer())
        out["ctr_popular"] = round(rep.ctr, 4)
        progress(f"popular fallback: CTR {rep.ctr:.4f}")
        first = self.train(features=False)["published"]  # the first adapter: the dataset's events only
        self.served(first)
        out["ctr_first_adapter"] = self._measure(first, self.seed + 1)
        out["ctr_after_incremental"] = []
        for run in range(self.size.incremental_runs):
            self.await_ingest()
            version = self.train(incremental=True)["published"]
            self.served(version)
            out["ctr_after_incremental"].append(self._measure(version, self.seed + 2 + run))

    def _measure(self, version: str, seed: int) -> float:
        rep = self.simulate(self.size.measure, seed=seed)
        got = rep.by_version.get(version)
        ctr = got["ctr"] if got else rep.ctr
        progress(f"{version}: CTR {ctr:.4f} ({rep.impressions} answers, by version {rep.by_version})")
        return round(ctr, 4)

    def degraded(self, out: dict, details: dict) -> None:
        good = self.live()
        bad = self.copy_version(good, degrade=True)
        m = self.settings.canary_min_impressions
        progress(f"experiment: {good} (control) vs {bad} (item embeddings shuffled), canary M={m}")
        res = self.experiment(bad, min_impressions=m, seed=self.seed + 50, max_requests=self.size.degraded_max_requests)
        if res["action"] == "promote":  # the test missed it: put the good adapter back for what follows
            self.registry().promote(SCENE, good, "bench/online: the degraded canary was promoted; restored")
            self.served(good)
        out["degraded_rolled_back"] = res["action"] == "rollback"
        out["degraded_decision_impressions"] = res["candidate_impressions"]
        details["degraded"] = {**res, "control_version": good, "min_impressions": m}
        progress(f"  {res['action']} at {res['candidate_impressions']} candidate impressions")

    def aa(self, out: dict, details: dict, runs: int) -> None:
        per_run, alarms, margin = [], 0, 0
        for r in range(runs):
            live = self.live()
            copy = self.copy_version(live, degrade=False)
            budget = int(AA_MAX_REQUESTS_FACTOR * AA_MIN_IMPRESSIONS / (EXPERIMENT_PERCENT / 100))
            res = self.experiment(copy, min_impressions=AA_MIN_IMPRESSIONS, seed=self.seed + 1000 + r, max_requests=budget)
            alarms += res["declared_difference"]
            margin += res["action"] == "rollback"
            per_run.append({k: res[k] for k in ("candidate", "action", "declared_difference", "candidate_impressions")})
            progress(f"A/A run {r + 1}/{runs}: {res['action']}, difference declared: {res['declared_difference']}")
        out["false_alarms"], out["false_alarm_runs"] = alarms, runs
        details["aa"] = {"min_impressions": AA_MIN_IMPRESSIONS, "percent": EXPERIMENT_PERCENT, "runs": per_run,
                         "rollbacks": margin}

    def hard_negatives(self, out: dict, details: dict) -> None:
        from training import experiments

        self.settle()
        self.await_ingest()
        off = self.train(preset=PRESET)["published"]  # features fold in everything so far
        on = self.train(preset=PRESET_HARD_NEGATIVES, features=False)["published"]  # the same feature version
        self.served(on)
        exp = experiments.start(self.registry(), SCENE, {off: EXPERIMENT_PERCENT}, kind="manual")
        try:
            self.await_candidate(exp.id, off)
            rep = self.simulate(2 * self.size.measure, seed=self.seed + 5000)
        finally:
            experiments.end(self.registry(), SCENE, "stop", "bench/online: hard negatives measured")
        by = rep.by_version
        out["ctr_hard_negatives_off"] = by.get(off, {}).get("ctr")
        out["ctr_hard_negatives_on"] = by.get(on, {}).get("ctr")
        details["hard_negatives"] = {"off": off, "on": on, "experiment": exp.id, "by_version": by}
        progress(f"hard negatives: off {out['ctr_hard_negatives_off']} ({off}), on {out['ctr_hard_negatives_on']} ({on})")


def run(args: argparse.Namespace, workdir: Path) -> dict:
    size = QUICK if args.quick else FULL
    out: dict = {k: [] if k == "ctr_after_incremental" else None for k in RESULT_KEYS}
    details: dict = {"size": dataclasses.asdict(size), "quick": args.quick, "seed": args.seed}
    bench = Bench(size, workdir, args.seed)
    t0 = time.monotonic()
    try:
        bench.start()
        phases = [("learning", lambda: bench.learning(out)), ("degraded", lambda: bench.degraded(out, details)),
                  ("aa", lambda: bench.aa(out, details, args.aa_runs or size.aa_runs)),
                  ("hard_negatives", lambda: bench.hard_negatives(out, details))]
        for name, phase in phases:
            if args.only and name not in args.only:
                continue
            t = time.monotonic()
            phase()
            details.setdefault("seconds", {})[name] = round(time.monotonic() - t, 1)
    except BenchError as exc:  # what was measured so far is still reported
        details["error"] = str(exc)
        progress(f"failed: {exc}")
    finally:
        details.update(settle_timeouts=bench.settle_timeouts, total_s=round(time.monotonic() - t0, 1),
                       api_answers=bench.api_answers)
        bench.stop()
    out["details"] = details
    return out


def render(out: dict) -> str:
    inc = ", ".join(f"{c:.4f}" for c in out["ctr_after_incremental"]) or "-"
    f = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    return "\n".join([
        "online bench (simulated users; CTR = answers with >= 1 click / answers)",
        f"  learning online:  popular {f(out['ctr_popular'])} -> first adapter {f(out['ctr_first_adapter'])} "
        f"-> after incremental runs {inc}",
        f"  degraded canary:  rolled back {f(out['degraded_rolled_back'])} at "
        f"{f(out['degraded_decision_impressions'])} candidate impressions",
        f"  A/A:              {f(out['false_alarms'])} false alarm(s) in {f(out['false_alarm_runs'])} runs",
        f"  hard negatives:   on {f(out['ctr_hard_negatives_on'])}, off {f(out['ctr_hard_negatives_off'])}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="-", help="write the result as JSON to this path (`-` or none: stdout)")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (smaller data, fewer requests and runs)")
    ap.add_argument("--seed", type=int, default=0, help="the simulator's base seed (default %(default)s)")
    ap.add_argument("--aa-runs", type=int, help="A/A runs (default 20; --quick 3)")
    ap.add_argument("--only", nargs="+", choices=("learning", "degraded", "aa", "hard_negatives"),
                    help="run only these phases (learning first: the others need its adapters)")
    ap.add_argument("--workdir", type=Path, help="keep the data and logs here (default: a temp dir, removed)")
    # the training step, run as a child process by the bench itself
    ap.add_argument("--train-step", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=PRESET, help=argparse.SUPPRESS)
    ap.add_argument("--incremental", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-features", dest="features", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--features-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_step:
        return train_step(args)
    if args.only and "learning" not in args.only:
        ap.error("--only needs `learning` (the other phases use its adapters)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="streamrec-online-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        out = run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(out), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(out, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if "error" in out["details"] else 0


if __name__ == "__main__":
    sys.exit(main())
