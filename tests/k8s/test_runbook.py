"""k8s/RUNBOOK.md stays usable: it has a section for every on-call task the issue lists and for every
alert of k8s/monitoring/prometheus-rules.yaml (meaning, how to confirm, what to do), its links
resolve, and every streamrec command it shows parses against the real CLI -- in shell blocks, behind
`kubectl exec ... --`, in inline code and in the JSON command lists of one-off Jobs -- the way
tests/test_readme.py checks README.md's (tests/cli_parsing.py). Its Python snippets compile and
import only names that exist.
"""

from __future__ import annotations

import ast
import importlib
import json
import re

import pytest

from tests.cli_parsing import command_lines, parse_streamrec_args, streamrec_invocations
from tests.k8s.test_monitoring import RUNBOOK, alert_rules, runbook_anchors
from tests.test_k8s_manifests import K8S_DIR

TEXT = RUNBOOK.read_text(encoding="utf-8")
SHELL_BLOCKS = re.findall(r"```(?:sh|bash)\n(.*?)```", TEXT, flags=re.S)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
# The on-call tasks of issues 14 and 15, by their sections' anchors.
TASKS = [
    "deploy-from-zero", "upgrade-the-image", "scale-ingest", "scale-serving", "pin-or-roll-back-an-adapter",
    "replay-a-topic-from-an-offset-or-a-time", "drain-and-reprocess-the-dlq", "rotate-the-api-keys", "redis-lost",
    "a-broker-or-topic-recreated", "a-stuck-trainer", "the-shared-volume-is-full",
    # issue 15, privacy
    "forget-a-user-right-to-be-forgotten", "rotate-the-pseudonym-key",
    # issue 17, online experiments
    "running-an-experiment",
]
ALERT_PARTS = ("**Meaning.**", "**Confirm.**", "**Act.**")


def _dedent_block(block: str) -> str:
    """A code block inside a list item, as the shell would get it (the list's indent removed)."""
    lines = block.splitlines()
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines)


def _invocations() -> list[list[str]]:
    found = [args for block in SHELL_BLOCKS for args in streamrec_invocations(command_lines(block))]
    # inline code: `streamrec registry list --scene default` (a span may wrap across lines)
    found += [span.split()[1:] for span in re.findall(r"`(streamrec [^`]+)`", TEXT)]
    # the command of a one-off Job: "value": ["streamrec", "rebuild-online", ...]
    found += [json.loads(m)[1:] for m in re.findall(r'\[\s*"streamrec"[^\]]*\]', TEXT)]
    return found


INVOCATIONS = _invocations()


def _section(anchor: str) -> str:
    """The text of the section whose heading has this anchor, up to the next heading of its level."""
    lines = TEXT.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(#{1,6})\s+(.*)", line)
        if m and re.sub(r"[^\w\- ]", "", m.group(2).strip().lower()).replace(" ", "-") == anchor:
            level = len(m.group(1))
            end = next((j for j in range(i + 1, len(lines))
                        if re.match(rf"#{{1,{level}}}\s", lines[j])), len(lines))
            return "\n".join(lines[i + 1:end])
    raise AssertionError(f"k8s/RUNBOOK.md has no section #{anchor}")


def test_the_runbook_has_every_task():
    missing = [t for t in TASKS if t not in runbook_anchors()]
    assert not missing, f"k8s/RUNBOOK.md lacks the task sections {missing}"
    for task in TASKS:
        assert "```sh" in _section(task) or "`streamrec " in _section(task), f"#{task} shows no command"


@pytest.mark.parametrize("alert", sorted({r["alert"] for r in alert_rules()}))
def test_every_alert_has_a_section_saying_what_to_do(alert):
    text = _section(alert.lower())
    for part in ALERT_PARTS:
        assert part in text, f"#{alert.lower()}: no {part}"
    confirm = text.split("**Confirm.**", 1)[1].split("**Act.**", 1)[0]
    assert "```promql" in confirm or "streamrec status" in confirm, f"#{alert.lower()}: how to confirm it"


def test_the_runbook_shows_the_commands_the_issue_asks_for():
    commands = {" ".join(args[:2]) for args in INVOCATIONS}
    for needed in ("status", "rebuild-online", "dlq", "registry rollback", "registry list", "ingest --fresh",
                   "forget", "privacy rotate-key", "privacy pseudonym",
                   "experiment start", "experiment status", "experiment stop", "experiment promote"):
        assert any(c.startswith(needed) for c in commands), f"no `streamrec {needed}` in k8s/RUNBOOK.md"
    assert "--reset-offsets" in TEXT and "--to-datetime" in TEXT and "--to-offset" in TEXT, "replay by time/offset"


def test_the_runbook_finds_commands_in_every_form():
    assert len(INVOCATIONS) >= 25
    assert ["rebuild-online", "--no-progress"] in INVOCATIONS  # a one-off Job's JSON command
    assert any(a[:1] == ["status"] and "--api" in a for a in INVOCATIONS)  # behind kubectl exec --


@pytest.mark.parametrize("args", INVOCATIONS, ids=[" ".join(a) or "(none)" for a in INVOCATIONS])
def test_every_streamrec_command_in_the_runbook_parses(args):
    parse_streamrec_args(args)  # click raises UsageError / BadParameter on an unknown command, option or bad value


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.strip().splitlines()[0][:40])
def test_python_snippets_compile_and_import_what_exists(block):
    tree = ast.parse(_dedent_block(block))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def test_links_resolve():
    """In-page anchors, and anchors of k8s/README.md, exist."""
    readme = (K8S_DIR / "README.md").read_text(encoding="utf-8")
    readme_anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                      for h in re.findall(r"^#{1,6}\s+(.*)$", readme, flags=re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", TEXT):
        page, _, anchor = target.partition("#")
        if page == "":
            assert anchor in runbook_anchors(), f"RUNBOOK.md links to #{anchor}, which it does not have"
        elif page == "README.md":
            assert not anchor or anchor in readme_anchors, f"RUNBOOK.md links to README.md#{anchor}, which is gone"
        else:
            assert target.startswith("http"), f"unexpected link {target}"


def test_the_map_links_the_runbook():
    readme = (K8S_DIR / "README.md").read_text(encoding="utf-8")
    assert "(RUNBOOK.md)" in readme, "k8s/README.md (the map) links to the runbook"
