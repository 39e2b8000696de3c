"""`streamrec experiment start|status|stop|promote` (services/experiment_cli.py) on a real local
registry, with a fake click attribution reader."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.experiment_cli import make_experiment_app
from streaming.features.attribution import ArmCounts, ArmKey, Attribution
from training import experiments
from training.experiment_stats import Arm, compare, wilson
from training.experiments import CONTROL
from training.registry import Registry

SCENE = "home"
runner = CliRunner()


class FakeAttribution:
    """variant -> (impressions, clicked); the arms carry the experiment id they are asked for."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}
        self.late, self.orphan = 0, 0

    def __call__(self, settings, *, scene=None, experiment=None, since_ms=None) -> Attribution:
        arms = {ArmKey(scene, "v000001" if v == CONTROL else v, v, experiment): ArmCounts(n, c, c + 1)
                for v, (n, c) in self.counts.items()}
        return Attribution(arms=arms, by_position=pa.table({}), items=pa.table({}), window_ms=1_800_000,
                           late_clicks=self.late, orphan_clicks=self.orphan)


@pytest.fixture
def reg(tmp_path, monkeypatch) -> Registry:
    """SCENE with v000001 live and v000002, v000003 published, not live."""
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STREAMREC_REGISTRY_ROOT", str(tmp_path / "registry"))
    r = Registry(tmp_path / "registry")
    for i, tag in enumerate("abc"):
        d = tmp_path / f"staged-{tag}"
        d.mkdir()
        (d / "adapter.pt").write_bytes(tag.encode())
        r.publish(SCENE, d, {"metrics": {"val_ndcg10": 0.3}}, make_live=i == 0)
    return r


@pytest.fixture
def fake() -> FakeAttribution:
    return FakeAttribution()


@pytest.fixture
def cli(fake):
    return make_experiment_app(read=fake)


def invoke(cli, *args: str):
    return runner.invoke(cli, list(args))


def test_mounted_on_the_streamrec_command():
    result = runner.invoke(app, ["experiment", "--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("start", "status", "stop", "promote"))


def test_start_status_stop(cli, reg, fake):
    result = invoke(cli, "start", SCENE, "--candidate", "v000002", "--percent", "10")
    assert result.exit_code == 0, result.output
    exp = experiments.active(reg, SCENE)
    assert exp.candidates == {"v000002": 10.0} and exp.kind == "manual" and exp.control == "v000001"
    assert exp.id in result.output and "control (v000001, the live version) 90%" in result.output

    fake.counts = {CONTROL: (9000, 900), "v000002": (1000, 80)}
    fake.late, fake.orphan = 3, 7
    result = invoke(cli, "status", SCENE)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("VARIANT"))
    control, candidate = lines[header + 1].split(), lines[header + 2].split()
    assert control[:7] == ["control", "v000001", "90%", "9000", "900", "901", "0.1000"]
    assert candidate[:7] == ["v000002", "v000002", "10%", "1000", "80", "81", "0.0800"]
    cmp = compare(Arm(9000, 900), Arm(1000, 80))
    assert f"{cmp.diff:+.4f}" in lines[header + 2] and f"{cmp.p_value:.4f}" in lines[header + 2]
    assert "3 late" in result.output and "7 without an impression" in result.output
    assert "canary" not in result.output  # a manual experiment has no canary line

    result = invoke(cli, "status", SCENE, "--json")
    report = json.loads(result.output)
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["v000002"]["p_value"] == pytest.approx(cmp.p_value, abs=1e-6)
    assert rows[CONTROL]["ctr_ci95"] == pytest.approx(list(wilson(Arm(9000, 900))), abs=1e-6)
    assert rows[CONTROL]["diff"] is None and report["canary"] is None and report["experiment"]["id"] == exp.id

    result = invoke(cli, "stop", SCENE)
    assert result.exit_code == 0 and f"experiment {exp.id} stopped" in result.output
    assert experiments.active(reg, SCENE) is None and reg.current(SCENE).version == "v000001"
    result = invoke(cli, "status", SCENE)
    assert result.exit_code == 0 and "runs no experiment (live: v000001)" in result.output
    assert "stop" in result.output and exp.id in result.output  # the log's last entries
    assert json.loads(invoke(cli, "status", SCENE, "--json").output)["active"] is None


def test_several_candidates_and_promote_one(cli, reg, fake):
    result = invoke(cli, "start", SCENE, "--candidate", "v000002", "--percent", "10",
                    "--candidate", "v000003", "--percent", "5.5")
    assert result.exit_code == 0, result.output
    assert experiments.active(reg, SCENE).candidates == {"v000002": 10.0, "v000003": 5.5}
    fake.counts = {CONTROL: (100, 10)}  # v000003 has no impression yet: zeros, no p-value
    report = json.loads(invoke(cli, "status", SCENE, "--json").output)
    assert [r["variant"] for r in report["variants"]] == [CONTROL, "v000002", "v000003"]
    assert report["variants"][0]["percent"] == pytest.approx(84.5) and report["variants"][2]["p_value"] is None

    result = invoke(cli, "promote", SCENE)
    assert result.exit_code == 1 and "has 2 candidates" in result.output and "v000002, v000003" in result.output
    result = invoke(cli, "promote", SCENE, "--version", "v000003")
    assert result.exit_code == 0, result.output
    assert "v000001 -> v000003 live" in result.output and reg.current(SCENE).version == "v000003"
    assert experiments.active(reg, SCENE) is None
    assert experiments.read(reg, SCENE).log[0]["action"] == "promote"
    assert reg.pointer(SCENE)["log"][0]["action"] == "promote"


def test_a_canary_shows_its_always_valid_interval_and_verdict(cli, reg, fake):
    exp = experiments.start(reg, SCENE, {"v000002": 10}, kind="canary")
    fake.counts = {CONTROL: (9000, 900), "v000002": (1000, 100)}
    result = invoke(cli, "status", SCENE)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("canary v000002"))
    assert "always-valid 95% interval" in line and "verdict wait:" in line and "1000 of 2000 impressions" in line
    report = json.loads(invoke(cli, "status", SCENE, "--json").output)
    assert report["canary"]["verdict"] == "wait" and report["experiment"]["id"] == exp.id
    low, high = report["canary"]["always_valid_ci"]
    assert low < 0 < high


@pytest.mark.parametrize("args, names", [
    (("start", "ghost", "--candidate", "v000002", "--percent", "10"), "'ghost'"),
    (("start", SCENE, "--candidate", "v000099", "--percent", "10"), "'v000099'"),
    (("start", SCENE, "--candidate", "v000001", "--percent", "10"), "--candidate v000001: it is the live version"),
    (("start", SCENE, "--candidate", "v000002", "--percent", "0"), "--percent 0"),
    (("start", SCENE, "--candidate", "v000002", "--percent", "95"), "--percent 95"),
    (("start", SCENE, "--candidate", "v000002", "--percent", "60", "--candidate", "v000003", "--percent", "40"),
     "add up to 100"),
    (("start", SCENE, "--candidate", "v000002", "--candidate", "v000003", "--percent", "10"),
     "2 --candidate and 1 --percent"),
    (("start", SCENE, "--candidate", "v000002", "--percent", "5", "--candidate", "v000002", "--percent", "5"),
     "--candidate v000002 is given more than once"),
    (("start", "../etc", "--candidate", "v000002", "--percent", "10"), "'../etc'"),
    (("status", "ghost"), "'ghost'"),
    (("stop", SCENE), f"scene '{SCENE}' runs no experiment"),
    (("promote", SCENE), f"scene '{SCENE}' runs no experiment"),
])
def test_bad_inputs_exit_1_naming_the_value(cli, reg, args, names):
    result = invoke(cli, *args)
    assert result.exit_code == 1, result.output
    assert names in result.output and "Traceback" not in result.output
    assert experiments.active(reg, SCENE) is None


def test_a_second_start_exits_1_naming_the_running_experiment(cli, reg):
    assert invoke(cli, "start", SCENE, "--candidate", "v000002", "--percent", "10").exit_code == 0
    first = experiments.active(reg, SCENE)
    result = invoke(cli, "start", SCENE, "--candidate", "v000003", "--percent", "10")
    assert result.exit_code == 1 and first.id in result.output and f"streamrec experiment stop {SCENE}" in result.output
    assert experiments.active(reg, SCENE) == first
    result = invoke(cli, "promote", SCENE, "--version", "v000003")
    assert result.exit_code == 1 and "'v000003' is not a candidate" in result.output


def test_an_unreadable_attribution_exits_1_saying_so(reg):
    def broken(settings, **kw):
        raise OSError("disk gone")

    cli = make_experiment_app(read=broken)
    assert invoke(cli, "start", SCENE, "--candidate", "v000002", "--percent", "10").exit_code == 0
    result = invoke(cli, "status", SCENE)
    assert result.exit_code == 1 and "cannot read the click attribution" in result.output and "disk gone" in result.output


def test_bad_configuration_exits_2(cli, reg, monkeypatch):
    monkeypatch.setenv("STREAMREC_CANARY_PERCENT", "80")  # above its bound (50)
    result = invoke(cli, "status", SCENE)
    assert result.exit_code == 2 and "STREAMREC_CANARY_PERCENT" in result.output


def test_status_reads_the_real_attribution_by_default(reg, tmp_path):
    """No impressions logged yet: the real reader (streaming/features/attribution.py) gives zeros."""
    cli = make_experiment_app()
    assert invoke(cli, "start", SCENE, "--candidate", "v000002", "--percent", "10").exit_code == 0
    result = invoke(cli, "status", SCENE, "--json")
    assert result.exit_code == 0, result.output
    assert [r["impressions"] for r in json.loads(result.output)["variants"]] == [0, 0]


def test_review_decides_a_canary_once(cli, reg, fake):
    assert invoke(cli, "review", SCENE).output.strip() == f"scene '{SCENE}' runs no canary"
    experiments.start(reg, SCENE, {"v000002": 10}, kind="canary")
    fake.counts = {CONTROL: (900, 90), "v000002": (100, 10)}
    result = invoke(cli, "review", SCENE)
    assert result.exit_code == 0 and result.output.startswith(f"{SCENE}: wait: 100 of 2000 impressions")
    fake.counts = {CONTROL: (18000, 1800), "v000002": (2000, 200)}
    result = invoke(cli, "review", SCENE)
    assert result.exit_code == 0 and result.output.startswith(f"{SCENE}: promote: ")
    assert reg.current(SCENE).version == "v000002" and experiments.active(reg, SCENE) is None
    assert invoke(cli, "review", "ghost").exit_code == 1
