"""Parsing documented `streamrec ...` command lines against the real CLI, without running them.

Shared by the documentation tests (tests/test_readme.py for README.md, tests/k8s/test_runbook.py for
k8s/RUNBOOK.md): a shell line is split like the shell would, every `streamrec` invocation in it
(also after `&&`, `||`, `|`, `;`, and behind `kubectl exec <pod> --`) is found, and click parses
its arguments -- an unknown command, option or bad value raises, a renamed option fails the test.
"""

from __future__ import annotations

import re
import shlex

import click
import typer

ENV_ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SHELL_SEPARATORS = ("&&", "||", "|", ";")


def command_lines(block: str) -> list[str]:
    """The command lines of a shell code block: continuation lines joined, a quoted argument that
    spans lines (a JSON patch) kept in its command, comments and blanks dropped."""
    out: list[str] = []
    pending = ""
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        out.append(pending)
        pending = ""
    if pending:
        out.append(pending)  # unbalanced to the end: let the caller's shlex report it
    return out


def streamrec_args(words: list[str]) -> list[str] | None:
    """The arguments of `streamrec` in one command's words, or None when it runs something else:
    `streamrec ...`, or a command that runs it after `--` (`kubectl exec <pod> -- [env VAR=...] streamrec ...`)."""
    words = [t for t in words if not ENV_ASSIGN.match(t)]
    if words and words[0] == "streamrec":
        return words[1:]
    if "--" in words:
        rest = words[words.index("--") + 1:]
        if rest[:1] == ["env"]:  # `kubectl exec <pod> -- env VAR=value streamrec ...`
            rest = rest[1:]
        if rest and rest[0] == "streamrec":
            return rest[1:]
    return None


def streamrec_invocations(lines: list[str]) -> list[list[str]]:
    """The arguments of every `streamrec` command in `lines` (shell lines, see `command_lines`)."""
    found = []
    for line in lines:
        segment: list[str] = []
        for tok in shlex.split(line, comments=True) + ["&&"]:
            if tok in SHELL_SEPARATORS:
                args = streamrec_args(segment)
                if args is not None:
                    found.append(args)
                segment = []
            else:
                segment.append(tok)
    return found


def parse_streamrec_args(args: list[str]) -> click.Context:
    """Parse `streamrec <args>` with the real CLI (no command runs); raises click's UsageError /
    BadParameter on an unknown command, option or bad value."""
    from services.cli import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("streamrec", list(args))
    while hasattr(cmd, "resolve_command"):  # a group (typer's classes are not click's)
        rest = [*ctx._protected_args, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx
