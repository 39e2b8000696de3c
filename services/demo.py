"""`streamrec demo`: the whole system on one machine, narrated step by step.

    streamrec demo            # MovieLens-100K; about 10-15 minutes on two CPU cores
    streamrec demo --quick    # small synthetic data and the quick preset; a few minutes
    streamrec demo --stay     # keep the API running after the tour (Ctrl-C stops)

The tour runs on the same parts as `streamrec up` (embedded broker + Redis, a local Ray head, the
ingest consumer, the Serve API) in a directory of its own, `<data dir>/demo`, which it clears
first -- so a demo never mixes with your data, and every run starts from the same place. The
continuous trainer is replaced by two explicit training runs, so that each change can be shown:

1. publish the catalog and the first part of the events to Kafka; the consumer ingests them
2. the Ray Data feature job; Ray Train fine-tunes the first LoRA adapter; it is published and served
3. a few users and their recommendations (and what their history says they like)
4. one of them clicks items of another taste: their next answer changes (Redis is read per request)
5. the rest of the events arrive; an incremental run trains the next adapter from the live one and
   publishes it through the gate; the answers move to the new version without a restart
6. brand-new catalog items, published with a text description only, become searchable within
   seconds, and a user who clicks a new item gets the new item that matches their taste
7. a natural-language query blended with a user's history
8. the evaluation table of the last run and where its plots are
9. (`--quick`: the simulator needs the synthetic data's true tastes) an experiment between the two adapters
   under simulated users (services/demo_experiment.py), ending with `streamrec experiment status`

Everything it shows comes from the HTTP API (`/v1/recommendations`, `/v1/items/{id}/similar`), through
`services.api_client`. The tour's own process never connects to Ray: each training step runs in a
child process started with the parts' environment (`services.demo_training`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from services import demo_training
from services.api_client import ApiClient, ApiError
from services.demo_experiment import run_experiment_step
from services.demo_training import TrainStep
from services.stack import stop_stack
from services.up import POLL_INTERVAL_S, Up, UpError, UpOptions
from streaming.settings import Settings, redact_url

READY_TIMEOUT_S = 600.0  # parts starting, the API answering with a version
INGEST_TIMEOUT_S = 300.0
NEW_ITEM_TIMEOUT_S = 30.0  # the serving target is 5 s; the demo reports what it measured
SHOW_K = 5
USERS_SHOWN = 3


@dataclass(frozen=True)
class NewItem:
    item_id: str
    title: str
    text: str
    theme: str
    attributes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What the tour runs on: a dataset, how much of it comes first, the themes it contrasts."""

    dataset: str
    preset: str
    first_share: float  # events before the first adapter; the rest arrive before the second
    themes: tuple[str, str]  # two tastes to contrast (genres of MovieLens, topics of the synthetic data)
    new_items: tuple[NewItem, ...]  # two per theme
    query: str
    theme_of: Callable[[dict], set[str]]


def _attrs(item: dict) -> dict:
    raw = item.get("attributes")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            return json.loads(raw) or {}
        return {}
    return raw or {}


def _genres(item: dict) -> set[str]:
    return set(_attrs(item).get("genres") or [])


def _topic(item: dict) -> set[str]:
    topic = _attrs(item).get("topic")
    return {topic} if topic else set()


ML_PLAN = Plan(
    dataset="ml-100k", preset="demo", first_share=0.8, themes=("Sci-Fi", "Romance"),
    new_items=(
        NewItem("new-1", "Starfall Legion", "Starfall Legion (2026). Genres: Action, Adventure, Sci-Fi. Rebel "
                "starships fight a galactic empire among alien worlds.", "Sci-Fi",
                {"genres": ["Action", "Adventure", "Sci-Fi"], "year": 2026}),
        NewItem("new-2", "Orbit of Machines", "Orbit of Machines (2026). Genres: Sci-Fi, Thriller. A space station "
                "crew is hunted by a rogue robot in orbit around Mars.", "Sci-Fi",
                {"genres": ["Sci-Fi", "Thriller"], "year": 2026}),
        NewItem("new-3", "Letters from Verona", "Letters from Verona (2026). Genres: Drama, Romance. Two strangers "
                "fall in love through letters one summer in Italy.", "Romance",
                {"genres": ["Drama", "Romance"], "year": 2026}),
        NewItem("new-4", "A Wedding in June", "A Wedding in June (2026). Genres: Comedy, Romance. A best man and a "
                "bridesmaid fall for each other the week of the wedding.", "Romance",
                {"genres": ["Comedy", "Romance"], "year": 2026}),
    ),
    query="a light-hearted romantic comedy", theme_of=_genres,
)

# --quick: about 40 events per user as before, on fewer users and items -- each training step, evaluation
# and embedding pass is proportionally shorter, and the tour shows the same things
QUICK_PLAN = Plan(
    dataset="synthetic:n_users=200,n_items=320,n_events=8000,n_topics=6,seed=11,p_follow=0.6",
    preset="quick", first_share=0.6, themes=("space", "cooking"),
    new_items=(
        NewItem("new-1", "Nebula Starship", "Nebula Starship: all about galaxy, rocket, astronaut, orbit and comet.",
                "space", {"topic": "space"}),
        NewItem("new-2", "Lunar Telescope", "Lunar Telescope: all about planet, satellite, cosmos, meteor and gravity.",
                "space", {"topic": "space"}),
        NewItem("new-3", "Garlic Skillet", "Garlic Skillet: all about recipe, kitchen, spice, simmer and herb.",
                "cooking", {"topic": "cooking"}),
        NewItem("new-4", "Pastry Oven", "Pastry Oven: all about baking, dough, chef, flavor and roast.",
                "cooking", {"topic": "cooking"}),
    ),
    query="baking bread and pastry in the kitchen", theme_of=_topic,
)


class DemoError(RuntimeError):
    pass


class Tour:
    """The steps of the demo; `say` prints (a Rich console in the terminal)."""

    def __init__(self, settings: Settings, plan: Plan, *, port: int | None, say: Callable[..., None],
                 table: Callable[..., None], stay: bool = False) -> None:
        self.plan, self.say, self.table, self.stay = plan, say, table, stay
        self.root = Path(settings.data_dir).expanduser().resolve()
        self.dir = self.root / "demo"
        updates: dict[str, Any] = {"data_dir": self.dir, "features_interval_s": 0.0}  # the tour runs the feature job
        if settings.kafka_bootstrap_servers or settings.redis_url:  # shared servers: names of this run's own
            tag = uuid.uuid4().hex[:6]
            updates.update(events_topic=f"demo-{tag}-events", items_topic=f"demo-{tag}-items",
                           dlq_topic=f"demo-{tag}-events.dlq", redis_prefix=f"demo{tag}:",
                           consumer_group=f"demo-{tag}")
        self.settings = settings.model_copy(update=updates)
        self.port = port or settings.serve_port
        self.up: Up | None = None
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = ApiClient(self.base)
        self.t0 = time.monotonic()
        self.step_no = 0
        self.titles: dict[str, str] = {}
        self.themes: dict[str, set[str]] = {}
        self.history: dict[str, list[str]] = {}
        self.outcomes: list[TrainStep] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # --- plumbing -------------------------------------------------------------------------------
    def step(self, title: str) -> None:
        self.step_no += 1
        self.say(f"\n[bold cyan]{self.step_no}. {title}[/]  [dim]({time.monotonic() - self.t0:.0f} s)[/]")

    def _poll_up(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.up.poll()
            self._stop.wait(POLL_INTERVAL_S)

    def _check_parts(self) -> None:
        failed = self.up.failed() if self.up else []
        if failed:
            raise DemoError("; ".join(f"{st.part.name} failed: {st.reason}" for st in failed))

    def _wait(self, cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_parts()
            with contextlib.suppress(ApiError):
                value = cond()
                if value:
                    return value
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what} (logs: {self.up.dir / 'logs'})")
            time.sleep(0.2)

    def _producer(self):
        from streaming.producer import EventProducer

        return EventProducer(self.up.settings)

    # --- the tour -------------------------------------------------------------------------------
    def run(self) -> int:
        from streaming.datasets import load_dataset

        s = self.settings
        self.say(f"[bold]streamrec demo[/] on {self.plan.dataset} (preset {self.plan.preset}); working directory "
                 f"{self.dir} (cleared first)")
        if self.dir.exists():
            stop_stack(self.dir)  # an earlier demo's embedded stack, if one was left running
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        ds = load_dataset(self.plan.dataset, self.root / "datasets")
        items = list(ds.item_dicts())
        events = list(ds.event_dicts())
        for it in items:
            self.titles[it["item_id"]] = it.get("title") or it["item_id"]
            self.themes[it["item_id"]] = self.plan.theme_of(it)
        n_first = int(len(events) * self.plan.first_share)
        first, rest = events[:n_first], events[n_first:]

        self.step("Start the stack: Kafka-compatible broker, Redis, a Ray head, the ingest consumer")
        log_path = self.dir / "up.log"
        log_file = open(log_path, "a", buffering=1)
        self.up = Up(s, UpOptions(port=self.port, train=False), echo=lambda line: log_file.write(line + "\n"))
        try:
            self.up.start()
            self._poller = threading.Thread(target=self._poll_up, name="up-poll", daemon=True)
            self._poller.start()
            self.say(f"  broker {self.up.settings.kafka_bootstrap_servers}, Redis {redact_url(self.up.settings.redis_url)}, "
                     f"Ray {self.up.settings.ray_address}; part logs in {self.up.dir / 'logs'}")
            self._tour(items, first, rest)
            if self.stay:
                self.say(f"\n[bold green]The API stays up[/]: {self.base}/docs -- Ctrl-C stops everything.")
                while True:
                    self._check_parts()
                    time.sleep(1.0)
            return 0
        finally:
            self._stop.set()
            if self._poller is not None:
                self._poller.join(timeout=5)
            self.say("\nstopping the parts ...")
            self.up.stop()
            self.api.close()
            log_file.close()
            self.say(f"stopped; nothing left running. Total {time.monotonic() - self.t0:.0f} s.")

    def _tour(self, items: list[dict], first: list[dict], rest: list[dict]) -> None:
        self.step(f"Publish the catalog ({len(items):,} items) and the first {len(first):,} events to Kafka")
        with self._producer() as producer:
            for it in items:
                producer.send_item(it)
            for ev in first:
                producer.send_event(ev)
            producer.flush(60)
        self._await_ingest(len(first))
        for ev in first:
            self.history.setdefault(ev["user_id"], []).append(ev["item_id"])

        self.step(f"Features (Ray Data) and the first LoRA adapter (Ray Train, preset {self.plan.preset})")
        v1 = self._train(incremental=False)
        if v1 is None:
            raise DemoError("the first adapter was not published: " + self.outcomes[-1].gate_message)
        self._wait(lambda: self._served() == v1, READY_TIMEOUT_S, f"the API to serve {v1}")
        self.say(f"  API up: {self.base}/v1/recommendations?user_id=...   docs: {self.base}/docs")

        a, b, c = self._pick_users()
        self.step(f"Recommendations for {USERS_SHOWN} users (adapter {v1})")
        before = {u: self._show_user(u) for u in (a, b, c)}

        theme_a, theme_b = self.plan.themes
        other = min(self.plan.themes, key=lambda t: (self._share(c, t), t))  # the taste c has least of
        self.step(f"User {c} clicks three {other} items they had not seen")
        clicks = self._popular_unseen(c, other, 3) or self._popular_unseen(c, None, 3)
        self._click(c, clicks)
        t_click = time.monotonic()
        self._wait(lambda: self._ids(c) != [i for i, _ in before[c]], 30, f"{c}'s answer to change")
        self.say(f"  {c}'s next answer changed {time.monotonic() - t_click:.1f} s after the clicks were published")
        self._show_user(c, previous=before[c], note="after the clicks")

        self.step(f"The other {len(rest):,} events arrive; an incremental run trains the next adapter from {v1}")
        with self._producer() as producer:
            for ev in rest:
                producer.send_event(ev)
            producer.flush(60)
        self._await_ingest(len(first) + len(rest) + len(clicks))
        for ev in rest:
            self.history.setdefault(ev["user_id"], []).append(ev["item_id"])
        v2 = self._train(incremental=True)
        if v2 is None:
            self.say(f"  the gate kept {v1}: {self.outcomes[-1].gate_message}")
        else:
            t_pub = time.monotonic()
            self._wait(lambda: self._served() == v2, READY_TIMEOUT_S, f"the API to serve {v2}")
            self.say(f"  {v2} is served {time.monotonic() - t_pub:.1f} s after it was published (no restart, "
                     "requests kept being answered)")
            for u in (a, b):
                self._show_user(u, previous=before[u], note=f"with {v2}")

        self.step("Brand-new catalog items, described by text only")
        with self._producer() as producer:
            for it in self.plan.new_items:
                producer.send_item({"item_id": it.item_id, "title": it.title, "text": it.text,
                                    "attributes": it.attributes, "ts": int(time.time() * 1000)})
                self.titles[it.item_id] = it.title
            producer.flush(30)
        t_new = time.monotonic()
        self._wait(lambda: all(self.api.knows_item(it.item_id) for it in self.plan.new_items), NEW_ITEM_TIMEOUT_S,
                   "the new items in the index")
        self.say(f"  all {len(self.plan.new_items)} searchable {time.monotonic() - t_new:.1f} s after publishing")
        for it in self.plan.new_items[::2]:
            sim = self.api.similar(it.item_id, k=SHOW_K)
            self.table(f"nearest items to new '{it.title}' ({it.theme}), from its text alone",
                       [(n + 1, self._label(x["item_id"]), f"{x['score']:.3f}") for n, x in enumerate(sim["items"])],
                       ("#", "item", "score"))
        new_a = [it for it in self.plan.new_items if it.theme == theme_a]
        new_b = [it for it in self.plan.new_items if it.theme == theme_b]
        self.say(f"  {a} (likes {theme_a}) clicks new '{new_a[0].title}', {b} (likes {theme_b}) clicks new "
                 f"'{new_b[0].title}': a user who is clicking new items gets new items in their answer (their "
                 "share of the top-k), and the model's score of each new item's text decides which")
        top10 = {u: self._ids(u, k=10) for u in (a, b)}
        self._click(a, [new_a[0].item_id])
        self._click(b, [new_b[0].item_id])
        fresh = {it.item_id for it in self.plan.new_items}
        for user, theme, prev in ((a, theme_a, top10[a]), (b, theme_b, top10[b])):
            # the click is read from Redis by the next request: wait until it shows, then show the answer
            self._wait(lambda u=user, p=prev: self._ids(u, k=10) != p, 15, f"{user}'s answer to change")
            got = self._show_user(user, k=10, note="after clicking a new item", mark=fresh)
            shown = [it for it in self.plan.new_items if it.item_id in {i for i, _ in got}]
            verdict = ", ".join(f"'{it.title}' ({it.theme}: {'their taste' if it.theme == theme else 'not their taste'})"
                                for it in shown) or "none of the four"
            self.say(f"  new items in {user}'s top 10: {verdict}")

        self.step(f"A text query blended with {a}'s history: {self.plan.query!r}")
        plain = self.api.recommendations(a, k=SHOW_K)
        asked = self.api.recommendations(a, k=SHOW_K, query=self.plan.query)
        rows = [(n + 1, self._label(p["item_id"]), self._label(q["item_id"]))
                for n, (p, q) in enumerate(zip(plain["items"], asked["items"]))]
        self.table(f"{a}: history only vs history + query", rows, ("#", "history only", "with the query"))

        self.step("Evaluation of the last training run (leave-one-out by time, full ranking)")
        last = self.outcomes[-1]
        md = (Path(last.run_dir) / "evaluation.md").read_text()
        self.say(escape(md.strip()))
        for out in self.outcomes:
            self.say(f"  plots: {Path(out.run_dir) / 'loss.png'}, {Path(out.run_dir) / 'evaluation.png'}")

        published = [o.published for o in self.outcomes if o.published]
        if len(published) >= 2 and self.plan.dataset.startswith("synthetic"):  # the simulator needs the truth
            self.step(f"An experiment: {published[0]} against the live {published[-1]}, under simulated users")
            run_experiment_step(self.up, self.base, self.plan.dataset, published[0], say=self.say, wait=self._wait)

    # --- pieces ---------------------------------------------------------------------------------
    def _await_ingest(self, n: int) -> None:
        from streaming.offline_log import OfflineLog

        s = self.up.settings
        log = OfflineLog(s.log_dir)

        def logged() -> bool:  # Redis is applied before a log file is renamed into place
            return sum(f.end - f.start + 1 for f in log.list_files(s.events_topic)) >= n

        t = time.monotonic()
        self._wait(logged, INGEST_TIMEOUT_S, f"{n:,} events in the offline log")
        self.say(f"  ingested: {n:,} events in Redis and the Parquet log ({time.monotonic() - t:.1f} s)")

    def _train(self, incremental: bool) -> str | None:
        """The feature job and a training run, in a child process with the parts' environment
        (services/demo_training.py says why); its output goes to this terminal."""
        result = self.dir / f"train-{len(self.outcomes) + 1}.json"
        argv = demo_training.command(self.plan.preset, incremental, result)
        sys.stdout.flush()  # the narration so far comes before the step's own lines
        code = subprocess.run(argv, env=demo_training.step_env(self.up.env), check=False).returncode
        if code != 0:
            raise DemoError(f"the training step exited with status {code} (its output is above): {' '.join(argv)}")
        out = demo_training.read_step(result)
        self.outcomes.append(out)
        m = out.metrics
        self.say(f"  trained {out.epochs} epochs in {out.seconds:.0f} s: validation NDCG@10 {m['val_ndcg10']:.4f}, "
                 f"test NDCG@10 {m['test_ndcg10']:.4f}; {out.gate_message}")
        return out.published

    def _served(self) -> str | None:
        return self.api.served_version("default")

    def _pick_users(self) -> tuple[str, str, str]:
        """A fan of each theme (the largest share of it among users with a long history), and the
        most active remaining user."""
        ta, tb = self.plan.themes
        active = [u for u, h in self.history.items() if len(h) >= 30] or list(self.history)

        share = self._share
        a = max(active, key=lambda u: (share(u, ta) - share(u, tb), u))
        b = max((u for u in active if u != a), key=lambda u: (share(u, tb) - share(u, ta), u))
        c = max((u for u in active if u not in (a, b)), key=lambda u: (len(self.history[u]), u))
        return a, b, c

    def _share(self, user: str, theme: str) -> float:
        h = self.history.get(user) or [None]
        return sum(theme in self.themes.get(i, ()) for i in h) / len(h)

    def _taste(self, user: str) -> str:
        counts = Counter(t for i in self.history.get(user, []) for t in self.themes.get(i, ()))
        total = max(len(self.history.get(user, [])), 1)
        return ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in counts.most_common(3))

    def _label(self, item_id: str) -> str:
        themes = "/".join(sorted(self.themes.get(item_id, ())))
        return escape(self.titles.get(item_id, item_id)) + (f" [dim]({escape(themes)})[/]" if themes else "")

    def _ids(self, user: str, k: int = SHOW_K) -> list[str]:
        return [x["item_id"] for x in self.api.recommendations(user, k=k)["items"]]

    def _show_user(self, user: str, *, k: int = SHOW_K, previous: list[tuple[str, float]] | None = None,
                   note: str = "", mark: set[str] | None = None) -> list[tuple[str, float]]:
        body = self.api.recommendations(user, k=k)
        got = [(x["item_id"], x["score"]) for x in body["items"]]
        was = {i for i, _ in previous} if previous else None
        rows = []
        for n, (item, score) in enumerate(got):
            flag = ("new item" if mark and item in mark else
                    "changed" if was is not None and item not in was else "")
            rows.append((n + 1, self._label(item), f"{score:.3f}", flag))
        recent = [escape(self.titles.get(i, i)) for i in self.history.get(user, [])[-3:]]
        self.table(f"user {user} {note} -- likes {self._taste(user)}; recently: {', '.join(recent)}  "
                   f"[dim](version {body['version']}, fallback {body['fallback']})[/]", rows,
                   ("#", "recommended", "score", ""))
        return got

    def _popular_unseen(self, user: str, theme: str | None, n: int) -> list[str]:
        seen = set(self.history.get(user, []))
        counts = Counter(i for h in self.history.values() for i in h
                         if theme is None or theme in self.themes.get(i, ()))
        return [i for i, _ in counts.most_common() if i not in seen][:n]

    def _click(self, user: str, item_ids: list[str]) -> None:
        ts = int(time.time() * 1000)
        with self._producer() as producer:
            for n, item in enumerate(item_ids):
                producer.send_event({"event_id": f"demo-{uuid.uuid4().hex}", "user_id": user, "item_id": item,
                                     "type": "click", "ts": ts + n})
            producer.flush(30)
        self.history.setdefault(user, []).extend(item_ids)
        self.say(f"  {user} clicked: " + ", ".join(escape(self.titles.get(i, i)) for i in item_ids))



def run_demo(settings: Settings, *, quick: bool, port: int | None, stay: bool) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)

    def table(title: str, rows: list[tuple], columns: tuple[str, ...]) -> None:
        t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        for col in columns:
            t.add_column(col)
        for row in rows:
            t.add_row(*(str(x) for x in row))
        console.print(t)

    tour = Tour(settings, QUICK_PLAN if quick else ML_PLAN, port=port, say=console.print, table=table, stay=stay)
    try:
        return tour.run()
    except (DemoError, UpError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1


__all__ = ["ML_PLAN", "QUICK_PLAN", "DemoError", "Plan", "Tour", "run_demo"]
