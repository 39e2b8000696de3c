"""The closed-loop simulator (services/simulate.py): the click model's statistics on small seeds, the
CTR definition, seeded determinism, and the command's clear errors. Unit tests answer through a fake
HTTP answer function and collect the click events in a list; the real API run is bench/online.py."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from services.simulate import (
    ClickModel,
    Outcome,
    SimConfig,
    SimulateError,
    Simulator,
    check_api,
    position_bias,
    summarize,
)
from streaming.datasets.synthetic import SyntheticConfig, synthetic_dataset
from streaming.events import Event

DS = synthetic_dataset(SyntheticConfig(n_users=40, n_items=60, n_events=100, n_topics=4, seed=3, taste_noise=0.05))
MODEL = ClickModel(DS.truth)
SIGMAS = 4.5  # tolerance of an empirical rate against its model probability, in binomial standard errors


class FakeApi:
    """An answer function: each user gets `lists(user)`, with a fresh request id and a version."""

    def __init__(self, lists, version: str | None = "v000001") -> None:
        self.lists, self.version = lists, version
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, user: str):
        with self.lock:
            self.n += 1
            rid = f"r{self.n}"
        items = [{"item_id": i, "score": 1.0} for i in self.lists(user)]
        return 200, {"items": items, "scene": "default", "version": self.version,
                     "fallback": None if self.version else "popular", "request_id": rid}


def items_of_topic(topic: int, n: int) -> list[str]:
    return [f"i{i}" for i in np.flatnonzero(DS.truth.item_topic == topic)[:n]]


def run(lists, *, requests: int, seed: int = 0, concurrency: int = 1, users: int | None = None, version="v000001"):
    sent: list[dict] = []
    lock = threading.Lock()

    def send(ev: dict) -> None:
        with lock:
            sent.append(ev)

    sim = Simulator(DS, SimConfig(requests=requests, seed=seed, concurrency=concurrency, users=users, bucket=50),
                    FakeApi(lists, version), send, run_tag="t")
    return sim.run(), sorted(sent, key=lambda e: e["event_id"])


def test_position_bias_is_the_dcg_discount():
    assert position_bias(1) == 1.0
    assert position_bias(3) == pytest.approx(0.5)
    assert np.allclose(position_bias(np.arange(1, 6)), 1 / np.log2(np.arange(2, 7)))


def test_empirical_click_rate_per_position_matches_the_model():
    user = 0
    fav = int(DS.truth.user_topics[user, 0])
    shown = items_of_topic(fav, 5)
    outcomes, _ = run(lambda u: shown, requests=4000, users=1)
    expected = MODEL.click_probabilities(user, shown)
    assert expected[0] > expected[-1] > 0  # the same kind of items, lower down: fewer clicks
    rep = summarize(outcomes, bucket=1000)
    for row, p in zip(rep.by_position, expected):
        se = math.sqrt(p * (1 - p) / row["shown"])
        assert abs(row["rate"] - p) <= SIGMAS * se, (row, p)
    # the session CTR: P(at least one click) of independent clicks
    p_any = 1 - np.prod(1 - expected)
    assert abs(rep.ctr - p_any) <= SIGMAS * math.sqrt(p_any * (1 - p_any) / rep.impressions)


def test_users_click_their_topics_more_than_others():
    # each user is shown its favourite topic's items, or those of a topic it does not like
    def liked(u: str) -> list[str]:
        return items_of_topic(int(DS.truth.user_topics[int(u[1:]), 0]), 5)

    def disliked(u: str) -> list[str]:
        row = DS.truth.user_tastes[int(u[1:])]
        return items_of_topic(int(np.argmin(row)), 5)

    on, _ = run(liked, requests=1500, seed=1)
    off, _ = run(disliked, requests=1500, seed=1)
    ctr_on, ctr_off = summarize(on, 100).ctr, summarize(off, 100).ctr
    assert ctr_on > 0.3 and ctr_off < 0.05 and ctr_on > 5 * ctr_off, (ctr_on, ctr_off)


def test_unknown_items_have_zero_relevance():
    rel = MODEL.relevance(0, ["new-1", "i999999", "i0"])
    assert rel[0] == rel[1] == 0.0 and rel[2] > 0.0


def test_seeded_runs_are_identical_whatever_the_concurrency():
    lists = lambda u: [f"i{(int(u[1:]) * 7 + j) % 60}" for j in range(5)]
    _, one = run(lists, requests=600, seed=7, concurrency=1)
    _, four = run(lists, requests=600, seed=7, concurrency=4)
    key = lambda e: (e["event_id"], e["user_id"], e["item_id"], e["position"])
    assert one and [key(e) for e in one] == [key(e) for e in four]
    _, other = run(lists, requests=600, seed=8, concurrency=1)
    assert [key(e) for e in other] != [key(e) for e in one]


def test_clicks_are_valid_events_carrying_request_id_and_position():
    user0_items = items_of_topic(int(DS.truth.user_topics[0, 0]), 5)
    outcomes, sent = run(lambda u: user0_items, requests=200, users=1)
    assert sent and len(sent) == sum(len(o.clicked_positions) for o in outcomes)
    rids = {o.request_id for o in outcomes}
    for ev in sent:
        e = Event.model_validate(ev)
        assert e.type == "click" and e.request_id in rids and 1 <= e.position <= 5
        assert e.item_id == user0_items[e.position - 1] and e.user_id == "u0"
    assert len({ev["event_id"] for ev in sent}) == len(sent)


def test_summary_defines_ctr_as_clicked_answers_over_answers():
    outcomes = [Outcome("u0", 200, "r1", "v1", 5, [1, 3]), Outcome("u1", 200, "r2", "v1", 5, []),
                Outcome("u2", 200, "r3", "fallback:popular", 5, [2]), Outcome("u3", 503),
                Outcome("u4", "ConnectionError")]
    rep = summarize(outcomes, bucket=2)
    assert (rep.requests, rep.impressions, rep.clicked, rep.clicks) == (5, 3, 2, 3)
    assert rep.ctr == pytest.approx(2 / 3)
    assert rep.errors == {"503": 1, "ConnectionError": 1}
    assert rep.ctr_over_time == [{"answers": 2, "ctr": 0.5}, {"answers": 3, "ctr": 1.0}]
    assert rep.by_version["v1"] == {"impressions": 2, "clicked": 1, "ctr": 0.5}
    assert rep.by_version["fallback:popular"]["ctr"] == 1.0
    assert [p["clicks"] for p in rep.by_position] == [1, 1, 1, 0, 0]
    assert rep.to_json()["ctr"] == pytest.approx(2 / 3, abs=1e-6)


def test_the_run_stops_at_its_requests_and_bad_configs_are_refused():
    outcomes, _ = run(lambda u: ["i0"], requests=50)
    assert len(outcomes) == 50
    for cfg, text in ((SimConfig(requests=None), "--duration"), (SimConfig(requests=0), "--requests 0"),
                      (SimConfig(users=41), "--users 41"), (SimConfig(duration_s=-1), "--duration -1")):
        with pytest.raises(SimulateError, match=text):
            cfg.check(DS.config.n_users)


def test_unreachable_api_names_the_url():
    from tests.fixtures.replica import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(SimulateError, match=url.replace(".", r"\.")):
        check_api(url, "default", timeout_s=2)
    from services.cli import app

    res = CliRunner().invoke(app, ["simulate", "--api-url", url, "--requests", "3"])
    assert res.exit_code == 1 and url in res.output


# --- integration: the real broker and ingest --------------------------------------------------------
class StandInApi:
    """A local HTTP server answering /readyz and /v1/recommendations like the API (the user's favourite
    topic's items, a fresh request_id each): the HTTP side of the simulator without Ray Serve -- the real
    API is driven by bench/online.py."""

    def __init__(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        served = self.served = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                if url.path == "/readyz":
                    body = {"ready": True, "scenes": {"default": {"state": "loaded", "version": "v000001"}},
                            "replica": "stand-in"}
                else:
                    q = parse_qs(url.query)
                    user = int(q["user_id"][0][1:])
                    items = items_of_topic(int(DS.truth.user_topics[user, 0]), int(q["k"][0]))
                    with lock:
                        rid = f"r-{len(served)}"
                        served.append(rid)
                    body = {"items": [{"item_id": i, "score": 1.0} for i in items], "scene": "default",
                            "version": "v000001", "fallback": None, "request_id": rid}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.integration
def test_clicks_reach_the_log_with_request_id_and_position(embedded_stack, tmp_path):
    from services.simulate import run_simulation
    from streaming.ingest import Ingestor
    from tests.streaming.helpers import isolated_settings, read_log

    settings = isolated_settings(embedded_stack, tmp_path / "data")
    api = StandInApi()
    try:
        rep = run_simulation(settings, DS, SimConfig(requests=200, seed=4, users=10, bucket=50), api.url,
                             progress=False)
    finally:
        api.close()
    assert rep.impressions == 200 and rep.clicks > 0 and rep.events_failed == 0 and rep.no_request_id == 0
    Ingestor(settings).run(until_idle_s=2.0)
    log = read_log(settings).to_pylist()
    assert len(log) == rep.clicks == rep.events_sent
    served = set(api.served)
    for row in log:
        assert row["request_id"] in served and 1 <= row["position"] <= 5 and row["type"] == "click"
    assert len({r["request_id"] for r in log}) == rep.clicked  # a clicked impression: >= 1 click with its id
