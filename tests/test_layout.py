"""The code base's house rules, checked on the source (see docs/architecture.md, "Layout"):

* a module's private (`_`-prefixed) names are its own: no other module, test or benchmark imports
  them, reads them through the module, or monkeypatches them -- what others need gets a public name;
* a module holds one idea, so none in the three packages grows past `MAX_MODULE_LINES` lines
  (a file that is one idea read top to bottom may be listed in `LONG_MODULES`, with the reason);
* imports follow the data flow: services -> training -> streaming, never back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streaming", "training", "services")
MAX_MODULE_LINES = 600
# path -> why it is one idea read top to bottom (empty: no module needs the exception today)
LONG_MODULES: dict[str, str] = {}
# a package may import only the packages after it in the data flow
ALLOWED_IMPORTS = {"services": {"services", "training", "streaming"}, "training": {"training", "streaming"},
                   "streaming": {"streaming"}}


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_module(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PACKAGES


def private_uses(path: Path) -> list[str]:
    """Every use in `path` of another project module's private name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: set[str] = set()  # local names bound to project modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _project_module(a.name):
                    aliases.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _project_module(node.module):
            for a in node.names:
                if _is_private(a.name):
                    found.append(f"{_rel(path)}:{node.lineno}: from {node.module} import {a.name}")
                elif a.name[:1].islower():  # `from streaming import features`: a module, maybe
                    aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("setattr", "delattr"):
            # monkeypatch.setattr(module, "_name", ...)
            args = node.args
            if (len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id in aliases
                    and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str)
                    and _is_private(args[1].value)):
                found.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [hit for path in _sources(*PACKAGES, "tests", "bench") for hit in private_uses(path)]
    assert not found, "private names used outside their module (give them a public name):\n" + "\n".join(found)


def test_the_private_name_check_catches_each_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import streaming.features as features\n"
        "from services import stack\n"
        "from services.stack import _free_port\n"
        "stack._alive('kafka', None)\n"
        "def test(monkeypatch):\n"
        "    monkeypatch.setattr(features, '_publish', None)\n"
        "    features.__name__, stack.public()\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        hits = private_uses(probe)
    finally:
        ROOT = saved
    assert len(hits) == 3, hits
    assert any("_free_port" in h for h in hits) and any("_alive" in h for h in hits)
    assert any("_publish" in h for h in hits)


@pytest.mark.parametrize("path", _sources(*PACKAGES), ids=_rel)
def test_module_holds_one_idea(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    rel = _rel(path)
    if rel in LONG_MODULES:
        return
    assert lines <= MAX_MODULE_LINES, (
        f"{rel} has {lines} lines (> {MAX_MODULE_LINES}): split it by idea, or list it in LONG_MODULES with the reason"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_data_flow(package):
    wrong = []
    for path in _sources(package):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top not in ALLOWED_IMPORTS[package]:
                    wrong.append(f"{_rel(path)}:{node.lineno}: imports {name}")
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED_IMPORTS[package])}:\n" + "\n".join(wrong)
