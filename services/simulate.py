"""`streamrec simulate`: simulated users of a synthetic dataset against the running API, closing the loop.

    streamrec simulate --dataset synthetic:n_users=300,seed=11 --requests 2000        # CTR over time
    streamrec simulate --dataset ... --duration 120 --users 100 --json sim.json

The users come from the synthetic dataset the stack was fed (`--dataset`, the same spec): its
`SyntheticDataset.truth` holds every user's true tastes and every item's topic and popularity. Each
simulated request:

1. picks a user (uniformly among the first `--users` users, from a plan drawn with `--seed`) and asks
   the API for `--k` recommendations over HTTP (`GET /v1/recommendations?user_id=..&k=..&scene=..`);
2. shows the answer to the click model (`ClickModel`): the item at 1-based position p is clicked,
   independently of the others, with probability relevance(user, item) x position_bias(p), where

       relevance(u, i)   = RELEVANCE_MAX x share(u, topic(i)) x (POPULARITY_FLOOR + (1 - POPULARITY_FLOOR) x pop(i))
       share(u, t)       = taste(u, t) / max_t' taste(u, t')   (1 for the favourite topic, ~0 for foreign ones)
       pop(i)            = the item's popularity / the most popular item of its topic's (1 for the top item)
       position_bias(p)  = 1 / log2(1 + p)                      (1, 0.63, 0.5, 0.43, 0.39 for p = 1..5)

   (the DCG discount as an examination model: a user looks at position p with that probability and
   then clicks what is relevant); items the truth does not know (added later, e.g. the demo's
   `new-1`) have relevance 0;
3. sends each click to Kafka as an ordinary event (`streaming.producer.EventProducer`, type `click`,
   key the user) carrying the answer's `request_id` and the item's `position`: ingest, the feature
   job, attribution and training see it like any other event -- it is also the user's next
   interaction, so their next answer reads it from Redis.

CTR, the simulator's and attribution's definition alike: an *impression* is one answered request; it is
*clicked* when at least one of its items was clicked (streaming/features/attribution.py counts an
impression clicked when >= 1 click is attributed to it); CTR = clicked impressions / impressions.
Requests that got no answer (an error status after the retries) are not impressions and are counted
apart. The report gives the CTR over time (per `--bucket` consecutive answers), per answering version
(`fallback:popular` / `fallback:trending` when no adapter answered), and the click rate per position.

Determinism: the users' plan and every click draw come from numpy generators seeded by (`--seed`,
request number), so the same answers give the same clicks whatever the concurrency; the answers
themselves depend on the live system. Concurrency: `--concurrency` threads, each with its own HTTP
session. With API keys set (`STREAMREC_API_KEYS`; the first key is sent), requests are paced under
`RATE_LIMIT_SHARE` of `STREAMREC_RATE_LIMIT_RPS`, and a 429 is retried after its `Retry-After`.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from streaming.datasets.synthetic import SyntheticDataset, SyntheticTruth

# --- the click model (named constants: the whole model is in the module docstring) ---------------
RELEVANCE_MAX = 0.3  # click probability of the favourite topic's most popular item when seen at position 1
# relevance share kept by the least popular item of a liked topic; high, because exclude_seen removes the
# items a user clicked: a steep popularity term would make every user's CTR sink as their top items run out
POPULARITY_FLOOR = 0.8
DEFAULT_K = 5  # items per answer: few enough that a good list does not saturate the session CTR
ITEM_PREFIX = "i"  # synthetic item ids are i0..i{n-1}; anything else is unknown to the truth

# --- the run ------------------------------------------------------------------------------------
DEFAULT_REQUESTS = 1000
DEFAULT_CONCURRENCY = 4
DEFAULT_BUCKET = 100  # answers per point of the CTR-over-time series
RATE_LIMIT_SHARE = 0.8  # with API keys set: stay under this share of STREAMREC_RATE_LIMIT_RPS
HTTP_TIMEOUT_S = 30.0
RETRY_AFTER_MAX_S = 5.0  # longest wait on one 429 (the server's Retry-After, capped)
MAX_RETRIES = 5  # 429s / connection errors retried per request before it counts as an error
PACING_SLEEP_MAX_S = 0.05
_PLAN_STREAM, _CLICK_STREAM = 1, 2  # the seeded generators: (seed, stream[, request number])


class SimulateError(RuntimeError):
    """The simulation cannot run; the message names the bad value or the unreachable URL."""


def position_bias(position: int | np.ndarray) -> float | np.ndarray:
    """Probability that the user examines the 1-based `position`: 1 / log2(1 + position)."""
    if isinstance(position, (int, np.integer)):
        return 1.0 / math.log2(1.0 + position)
    return 1.0 / np.log2(1.0 + np.asarray(position, dtype=float))


class ClickModel:
    """The simulated users' true click probabilities, from the synthetic dataset's planted truth."""

    def __init__(self, truth: SyntheticTruth, *, relevance_max: float = RELEVANCE_MAX,
                 popularity_floor: float = POPULARITY_FLOOR) -> None:
        if not 0.0 < relevance_max <= 1.0 or not 0.0 <= popularity_floor <= 1.0:
            raise SimulateError(f"relevance_max={relevance_max} must be in (0, 1], popularity_floor="
                                f"{popularity_floor} in [0, 1]")
        tastes = truth.user_tastes
        self.share = tastes / tastes.max(axis=1, keepdims=True)  # (n_users, n_topics)
        topic, pop = truth.item_topic, truth.item_popularity
        top = np.zeros(len(truth.topic_names))
        np.maximum.at(top, topic, pop)
        self.item_topic = topic
        self.item_weight = relevance_max * (popularity_floor + (1.0 - popularity_floor) * pop / top[topic])
        self.n_users, self.n_items = self.share.shape[0], len(topic)

    def user_index(self, user_id: str) -> int:
        idx = _index(user_id, "u", self.n_users)
        if idx is None:
            raise SimulateError(f"user {user_id!r} is not a user of the dataset (u0..u{self.n_users - 1})")
        return idx

    def relevance(self, user: int, item_ids: list[str]) -> np.ndarray:
        """Click probability of each item when examined (0 for items the truth does not know)."""
        idx = [_index(i, ITEM_PREFIX, self.n_items) for i in item_ids]
        known = np.array([i is not None for i in idx], dtype=bool)
        rows = np.array([i if i is not None else 0 for i in idx], dtype=np.int64)
        rel = self.item_weight[rows] * self.share[user, self.item_topic[rows]]
        return np.where(known, rel, 0.0)

    def click_probabilities(self, user: int, item_ids: list[str]) -> np.ndarray:
        """relevance x position_bias, item_ids[0] being position 1."""
        return self.relevance(user, item_ids) * position_bias(np.arange(1, len(item_ids) + 1))

    def clicks(self, user: int, item_ids: list[str], rng: np.random.Generator) -> list[int]:
        """The clicked 1-based positions of one answer (independent draws)."""
        if not item_ids:
            return []
        p = self.click_probabilities(user, item_ids)
        return [int(k) + 1 for k in np.flatnonzero(rng.random(len(p)) < p)]


def _index(ident: str, prefix: str, n: int) -> int | None:
    if not ident.startswith(prefix) or not ident[len(prefix):].isdigit():
        return None
    i = int(ident[len(prefix):])
    return i if i < n else None


# --- the run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    users: int | None = None  # the first N users of the dataset (None: all)
    requests: int | None = DEFAULT_REQUESTS  # None: until `duration_s`
    seed: int = 0
    scene: str = "default"
    k: int = DEFAULT_K
    concurrency: int = DEFAULT_CONCURRENCY
    duration_s: float | None = None  # stop issuing requests after this long
    bucket: int = DEFAULT_BUCKET
    rate: float | None = None  # requests/s across all threads (None: as fast as answered)

    def check(self, n_users: int) -> None:
        if self.requests is None and self.duration_s is None:
            raise SimulateError("give --requests or --duration (or both: whichever ends first)")
        if self.requests is not None and self.requests < 1:
            raise SimulateError(f"--requests {self.requests}: must be at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise SimulateError(f"--duration {self.duration_s}: must be positive seconds")
        if self.users is not None and not 1 <= self.users <= n_users:
            raise SimulateError(f"--users {self.users}: the dataset has {n_users} users (1..{n_users})")
        if self.seed < 0 or self.k < 1 or self.concurrency < 1 or self.bucket < 1:
            raise SimulateError(f"--seed {self.seed} must be >= 0; --k {self.k}, --concurrency {self.concurrency} and "
                      f"--bucket {self.bucket} at least 1")
        if self.rate is not None and not self.rate > 0:
            raise SimulateError(f"--rate {self.rate}: must be positive requests/s")


@dataclass
class Outcome:
    """One request as the simulator saw it."""

    user: str
    status: int | str  # HTTP status, or the error's class name when none came back
    request_id: str | None = None
    label: str | None = None  # the answering version, or fallback:<kind>
    shown: int = 0
    clicked_positions: list[int] = field(default_factory=list)


@dataclass
class SimReport:
    requests: int = 0  # requests sent (answered + errors)
    impressions: int = 0  # answered: the CTR's denominator
    clicked: int = 0  # impressions with >= 1 click
    attributable_clicked: int = 0  # of them, answers that carried a request_id (what attribution can count)
    clicks: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status / exception -> count
    retried_429: int = 0
    no_request_id: int = 0  # answers without a request_id: their clicks cannot be attributed
    events_sent: int = 0
    events_failed: int = 0
    seconds: float = 0.0
    ctr_over_time: list[dict] = field(default_factory=list)  # {"answers": end, "ctr": ...} per bucket
    by_version: dict[str, dict] = field(default_factory=dict)  # label -> impressions, clicked, ctr
    by_position: list[dict] = field(default_factory=list)  # position -> shown, clicks, rate

    @property
    def ctr(self) -> float:
        return self.clicked / self.impressions if self.impressions else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ctr": round(self.ctr, 6)}


def summarize(outcomes: list[Outcome], bucket: int, seconds: float = 0.0, retried_429: int = 0,
              events: tuple[int, int] = (0, 0)) -> SimReport:
    """The report of outcomes in completion order (pure: the unit tests feed it directly)."""
    rep = SimReport(requests=len(outcomes), retried_429=retried_429, seconds=round(seconds, 3),
                    events_sent=events[0], events_failed=events[1])
    shown_at: dict[int, int] = {}
    clicks_at: dict[int, int] = {}
    window = [0, 0]
    for o in outcomes:
        if o.status != 200:
            rep.errors[str(o.status)] = rep.errors.get(str(o.status), 0) + 1
            continue
        rep.impressions += 1
        hit = bool(o.clicked_positions)
        rep.clicked += hit
        rep.attributable_clicked += hit and o.request_id is not None
        rep.clicks += len(o.clicked_positions)
        rep.no_request_id += o.request_id is None
        v = rep.by_version.setdefault(o.label or "?", {"impressions": 0, "clicked": 0})
        v["impressions"] += 1
        v["clicked"] += hit
        for p in range(1, o.shown + 1):
            shown_at[p] = shown_at.get(p, 0) + 1
        for p in o.clicked_positions:
            clicks_at[p] = clicks_at.get(p, 0) + 1
        window[0] += 1
        window[1] += hit
        if window[0] == bucket:
            rep.ctr_over_time.append({"answers": rep.impressions, "ctr": round(window[1] / bucket, 4)})
            window = [0, 0]
    if window[0]:
        rep.ctr_over_time.append({"answers": rep.impressions, "ctr": round(window[1] / window[0], 4)})
    for v in rep.by_version.values():
        v["ctr"] = round(v["clicked"] / v["impressions"], 6)
    rep.by_position = [{"position": p, "shown": n, "clicks": clicks_at.get(p, 0),
                        "rate": round(clicks_at.get(p, 0) / n, 6)} for p, n in sorted(shown_at.items())]
    return rep


AnswerFn = Callable[[str], tuple[int | str, Mapping[str, Any] | None]]  # user_id -> (status, body)
SendFn = Callable[[dict], None]  # one click event -> Kafka


class _Pacer:
    """At most `rate` starts per second across threads (None: no pacing)."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self.lock, self.next_due = rate, threading.Lock(), time.monotonic()

    def wait(self, stop: threading.Event) -> None:
        if not self.rate:
            return
        with self.lock:
            due = self.next_due
            self.next_due = max(due, time.monotonic()) + 1.0 / self.rate
        while (ahead := due - time.monotonic()) > 0 and not stop.is_set():
            time.sleep(min(ahead, PACING_SLEEP_MAX_S))


class Simulator:
    """Runs the simulated users: `answer(user_id)` asks the API, `send(event)` publishes a click."""

    def __init__(self, dataset: SyntheticDataset, cfg: SimConfig, answer: AnswerFn, send: SendFn,
                 model: ClickModel | None = None, *, run_tag: str | None = None) -> None:
        n_users = dataset.config.n_users
        cfg.check(n_users)
        self.cfg, self.answer, self.send = cfg, answer, send
        self.model = model or ClickModel(dataset.truth)
        self.pool = cfg.users or n_users
        self.run_tag = run_tag or uuid.uuid4().hex[:8]  # event ids unique across runs (ingest dedups by id)
        self.scene_field = None if cfg.scene == "default" else cfg.scene  # the dataset's events carry no scene
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self.outcomes: list[Outcome] = []

    def user_of(self, n: int) -> str:
        """The user of request `n` (a seeded plan, independent of the concurrency)."""
        rng = np.random.default_rng([self.cfg.seed, _PLAN_STREAM, n])
        return f"u{int(rng.integers(0, self.pool))}"

    def one(self, n: int) -> Outcome:
        """Request `n`: ask, draw the clicks, publish them."""
        user = self.user_of(n)
        status, body = self.answer(user)
        out = Outcome(user=user, status=status)
        if status != 200 or body is None:
            return out
        items = [str(x["item_id"]) for x in body.get("items") or []]
        out.request_id, out.shown = body.get("request_id") or None, len(items)
        out.label = body.get("version") or f"fallback:{body.get('fallback')}"
        rng = np.random.default_rng([self.cfg.seed, _CLICK_STREAM, n])
        out.clicked_positions = self.model.clicks(self.model.user_index(user), items, rng)
        ts = int(time.time() * 1000)
        for pos in out.clicked_positions:
            event = {"event_id": f"sim-{self.run_tag}-{n}-{pos}", "user_id": user, "item_id": items[pos - 1],
                     "type": "click", "ts": ts + pos, "scene": self.scene_field, "position": pos}
            if out.request_id is not None:
                event["request_id"] = out.request_id
            self.send(event)
        return out

    def _claim(self, t0: float) -> int | None:
        with self._lock:
            n = self._next
            if self.stop.is_set() or (self.cfg.requests is not None and n >= self.cfg.requests):
                return None
            if self.cfg.duration_s is not None and time.monotonic() - t0 >= self.cfg.duration_s:
                return None
            self._next += 1
            return n

    def run(self, on_outcome: Callable[[Outcome], None] | None = None, pacer: _Pacer | None = None) -> list[Outcome]:
        """Every request, `concurrency` at a time; outcomes in completion order."""
        t0 = time.monotonic()
        pacer = pacer or _Pacer(self.cfg.rate)

        def worker() -> None:
            while (n := self._claim(t0)) is not None:
                pacer.wait(self.stop)
                out = self.one(n)
                with self._lock:
                    self.outcomes.append(out)
                if on_outcome is not None:
                    on_outcome(out)

        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="simulate") as pool:
            futures = [pool.submit(worker) for _ in range(self.cfg.concurrency)]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                self.stop.set()
                raise
        return self.outcomes


# --- the real parts: HTTP answers, Kafka clicks ---------------------------------------------------
class HttpAnswers:
    """`AnswerFn` over HTTP: one `requests.Session` per thread; 429 and connection errors retried
    (`MAX_RETRIES`, waiting the server's `Retry-After`, at most `RETRY_AFTER_MAX_S`)."""

    def __init__(self, api_url: str, *, k: int, scene: str, api_key: str | None = None,
                 timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.url = api_url.rstrip("/") + "/v1/recommendations"
        self.k, self.scene, self.timeout_s = k, scene, timeout_s
        self.headers = {"x-api-key": api_key} if api_key else {}
        self.local = threading.local()
        self.retried_429 = 0

    def __call__(self, user_id: str) -> tuple[int | str, Mapping[str, Any] | None]:
        import requests

        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        status: int | str = "none"
        for attempt in range(MAX_RETRIES + 1):
            try:
                resp = session.get(self.url, params={"user_id": user_id, "k": self.k, "scene": self.scene},
                                   headers=self.headers, timeout=self.timeout_s)
            except requests.RequestException as exc:
                status = type(exc).__name__
                time.sleep(min(RETRY_AFTER_MAX_S, 0.1 * 2 ** attempt))  # back-off before the retry
                continue
            if resp.status_code == 429 and attempt < MAX_RETRIES:
                self.retried_429 += 1
                time.sleep(min(RETRY_AFTER_MAX_S, float(resp.headers.get("Retry-After") or 1)))
                continue
            if resp.status_code != 200:
                return resp.status_code, None
            try:
                return 200, resp.json()
            except ValueError:
                return "not-json", None
        return status, None


class KafkaClicks:
    """`SendFn` onto the events topic through the project's producer; send failures are counted."""

    def __init__(self, settings: Any) -> None:
        from streaming.producer import EventProducer

        self.producer = EventProducer(settings)
        self.sent = self.failed = 0
        self._lock = threading.Lock()

    def _failed(self, _exc: BaseException) -> None:
        with self._lock:
            self.failed += 1

    def __call__(self, event: dict) -> None:
        self.producer.send_event(event).add_errback(self._failed)
        with self._lock:
            self.sent += 1

    def close(self, timeout_s: float = 60.0) -> None:
        try:
            self.producer.flush(timeout_s)
        finally:
            self.producer.close()


def check_api(api_url: str, scene: str, timeout_s: float = 5.0) -> dict:
    """The API's readiness body; `SimulateError` naming the URL when it does not answer."""
    from services.api_client import ApiClient, ApiError

    client = ApiClient(api_url, timeout_s=timeout_s)
    try:
        body = client.readiness()
    except ApiError as exc:
        raise SimulateError(f"the API at {api_url} is unreachable ({exc}); start it (`streamrec up`) or pass "
                            "--api-url") from None
    finally:
        client.close()
    if scene not in (body.get("scenes") or {}):
        raise SimulateError(f"the API at {api_url} serves no scene {scene!r} (it knows: "
                            f"{', '.join(body.get('scenes') or {}) or 'none'}); pass --scene")
    return body


def run_simulation(settings: Any, dataset: SyntheticDataset, cfg: SimConfig, api_url: str, *,
                   progress: bool = True, check: bool = True) -> SimReport:
    """Simulate `cfg` against the API at `api_url`, clicks to the Kafka of `settings`; the report."""
    from tqdm import tqdm

    if check:
        check_api(api_url, cfg.scene)
    key = settings.api_keys[0] if settings.api_keys else None
    rate = cfg.rate
    if key and settings.rate_limit_rps > 0:  # the per-key limit applies only with keys (services/api_guard.py)
        cap = RATE_LIMIT_SHARE * settings.rate_limit_rps
        rate = min(rate, cap) if rate else cap
    answers = HttpAnswers(api_url, k=cfg.k, scene=cfg.scene, api_key=key)
    clicks = KafkaClicks(settings)
    sim = Simulator(dataset, cfg, answers, clicks)
    total = cfg.requests if cfg.requests is not None else None
    bar = tqdm(total=total, desc="simulate", unit=" req", disable=not progress, leave=False)
    lock, seen = threading.Lock(), [0, 0]

    def tick(out: Outcome) -> None:
        with lock:
            seen[0] += out.status == 200
            seen[1] += bool(out.clicked_positions)
            bar.update(1)
            if bar.n % 20 == 0:
                bar.set_postfix_str(f"CTR {seen[1] / max(seen[0], 1):.3f}", refresh=False)

    t0 = time.monotonic()
    try:
        outcomes = sim.run(tick, _Pacer(rate))
    finally:
        bar.close()
        clicks.close()
    return summarize(outcomes, cfg.bucket, time.monotonic() - t0, answers.retried_429, (clicks.sent, clicks.failed))


__all__ = ["DEFAULT_BUCKET", "DEFAULT_CONCURRENCY", "DEFAULT_K", "DEFAULT_REQUESTS", "HTTP_TIMEOUT_S", "MAX_RETRIES",
           "POPULARITY_FLOOR", "RATE_LIMIT_SHARE", "RELEVANCE_MAX", "RETRY_AFTER_MAX_S", "AnswerFn", "ClickModel", "HttpAnswers", "KafkaClicks",
           "Outcome", "SendFn", "SimConfig", "SimReport", "SimulateError", "Simulator", "check_api", "position_bias", "run_simulation",
           "summarize"]
