"""The README stays true: its test command is what CI runs, it documents every setting, and every
command it shows parses against the real CLI / API.

What runs them: `streamrec demo --quick` (tests/services/test_demo.py), `streamrec up`
(tests/services/test_up_e2e.py), produce / ingest / features / dlq / stack / config
(tests/services/test_cli.py), train / evaluate / registry (tests/services/test_cli_training.py and
tests/training), serve and the curl routes (tests/services/test_serve.py). This module checks that
the README's spelling of each command and route is one those tests exercise: a renamed option or
route fails here.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from streaming.settings import env_var_names
from tests.cli_parsing import command_lines, parse_streamrec_args, streamrec_invocations

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[str]:
    return [line for block in BASH_BLOCKS for line in command_lines(block)]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "```bash\npytest -q\n```" in README
    assert ci.strip().splitlines()[-1] == "pytest -q"
    assert "pip install -e '.[dev]'" in ci and "pip install -e '.[dev]'" in README


def test_a_fresh_machine_needs_exactly_two_commands():
    assert BASH_BLOCKS[0].strip().splitlines() == ["pip install -e '.[dev]'", "streamrec demo"]


def test_every_setting_is_in_the_configuration_reference():
    for var in env_var_names().values():
        assert f"`{var}`" in README, f"{var} missing from README's configuration table"


INVOCATIONS = streamrec_invocations(_command_lines())


def test_the_readme_shows_the_main_commands():
    shown = {args[0] for args in INVOCATIONS if args}
    assert {"demo", "up", "produce", "ingest", "features", "train", "serve", "dlq", "evaluate", "registry"} <= shown


@pytest.mark.parametrize("args", INVOCATIONS, ids=[" ".join(a) or "(none)" for a in INVOCATIONS])
def test_every_streamrec_command_in_the_readme_parses(args):
    parse_streamrec_args(args)  # click raises UsageError / BadParameter on an unknown command, option or bad value


def test_every_curl_route_in_the_readme_exists():
    from services.serve_app import api

    # the generated OpenAPI schema: what /docs shows is what the README must match
    routes = {(m.upper(), path) for path, ops in api.openapi()["paths"].items() for m in ops}
    patterns = [(m, re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$")) for m, p in routes]
    curls = [line for line in _command_lines() if line.startswith("curl")]
    assert len(curls) >= 4
    for line in curls:
        tokens = shlex.split(line, comments=True)
        method = tokens[tokens.index("-X") + 1] if "-X" in tokens else "GET"
        url = next(t for t in tokens[1:] if "localhost" in t)
        path = "/" + url.split("/", 1)[1].split("?")[0]
        assert any(m == method and pat.match(path) for m, pat in patterns), f"{method} {path}: no such route"
        if "-d" in tokens:  # a body the API accepts
            from services.api_schema import RecommendRequest

            RecommendRequest.model_validate(json.loads(tokens[tokens.index("-d") + 1]))


def test_the_kcat_example_publishes_a_valid_event_keyed_by_user():
    from streaming.events import Event

    line = next(line for line in _command_lines() if "kcat" in line)
    key, _, payload = shlex.split(line)[1].partition(":")
    event = Event.model_validate(json.loads(payload))
    assert event.user_id == key and "-t events" in line and "-K:" in line
