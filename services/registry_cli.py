"""`streamrec registry ...`: inspect the adapter registry and roll a scene back.

    streamrec registry list [--scene S] [--json]     # every published version, the live one marked
    streamrec registry show SCENE [VERSION] [--json] # a manifest (default: live) + checksum check
    streamrec registry rollback SCENE [--to VERSION] # move the live pointer back (atomically)

The root is `Settings.registry_uri` (`STREAMREC_REGISTRY_ROOT`, default `<data_dir>/registry`).
Exit status: 0 on success, 1 for a registry error (unknown scene or version, corrupt files,
nothing to roll back to), 2 for a configuration error. Mounted in `services/cli.py` with
``app.add_typer(registry_app, name="registry")``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from streaming.settings import SettingsError, load_settings
from training.registry import Registry, RegistryError, VersionInfo, VersionNotFound

EXIT_CONFIG = 2
EXIT_FAILURE = 1

NDCG_KEY = "val_ndcg10"
LIVE_MARK = "*"

registry_app = typer.Typer(
    help="The adapter registry: list versions, show a manifest, roll a scene back.",
    no_args_is_help=True,
)


def _fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _registry() -> Registry:
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None
    try:
        return Registry(settings.registry_uri)
    except RegistryError as exc:  # an unusable root is a configuration error
        raise _fail(f"STREAMREC_REGISTRY_ROOT: {exc}", EXIT_CONFIG) from None


def _row(info: VersionInfo, live: str | None) -> dict[str, Any]:
    return {
        "scene": info.scene,
        "version": info.version,
        "created_at": info.created_at,
        "parent": info.parent,
        NDCG_KEY: info.metrics.get(NDCG_KEY),
        "live": info.version == live,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _unknown_scene(registry: Registry, scene: str) -> typer.Exit:
    known = registry.scenes()
    return _fail(f"unknown scene {scene!r} in {registry.root} (known: {', '.join(known) or 'none'})")


@registry_app.command("list")
def list_versions(
    scene: Optional[str] = typer.Option(None, "--scene", help="Only this scene."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Every published version per scene, oldest first; `*` marks the live one."""
    registry = _registry()
    try:
        scenes = registry.scenes() if scene is None else [scene]
        rows = []
        for name in scenes:
            versions = registry.versions(name)
            if scene is not None and not versions:
                raise _unknown_scene(registry, name)
            pointer = registry.pointer(name)
            live = pointer["version"] if pointer else None
            rows.extend(_row(v, live) for v in versions)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no published versions in {registry.root}")
        return
    header = ("SCENE", "VERSION", "CREATED_AT", "PARENT", "VAL_NDCG@10", "LIVE")
    table = [header] + [
        (r["scene"], r["version"], _fmt(r["created_at"]), _fmt(r["parent"]), _fmt(r[NDCG_KEY]), LIVE_MARK if r["live"] else "")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@registry_app.command("show")
def show(
    scene: str = typer.Argument(..., help="The scene."),
    version: Optional[str] = typer.Argument(None, help="A version (default: the live one)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: the manifest, live flag and verification."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 against the manifest."),
) -> None:
    """Print a version's manifest and whether its files match their checksums (exit 1 if not)."""
    registry = _registry()
    try:
        if registry.pointer(scene) is None:
            raise _unknown_scene(registry, scene)
        info = registry.get(scene, version) if version is not None else registry.current(scene)
        if info is None:  # pragma: no cover - a pointer always names a version
            raise VersionNotFound(f"scene {scene!r} has no live version")
        live = registry.pointer(scene)["version"]
    except RegistryError as exc:
        raise _fail(str(exc)) from None

    verification: dict[str, Any] = {"checked": False, "ok": None, "error": None}
    if verify:
        try:
            registry.verify(scene, info.version)
            verification = {"checked": True, "ok": True, "error": None}
        except RegistryError as exc:
            verification = {"checked": True, "ok": False, "error": str(exc)}

    if as_json:
        typer.echo(json.dumps(
            {"scene": scene, "version": info.version, "path": info.path, "live": info.version == live,
             "manifest": info.manifest, "verification": verification},
            indent=2,
        ))
    else:
        typer.echo(f"{scene} {info.version}{' (live)' if info.version == live else ''}: {info.path}")
        typer.echo(json.dumps(info.manifest, indent=2, sort_keys=True))
        if not verification["checked"]:
            typer.echo("checksums: not verified (--no-verify)")
        elif verification["ok"]:
            typer.secho(f"checksums: ok ({len(info.files)} files)", fg=typer.colors.GREEN)
    if verification["ok"] is False:
        raise _fail(f"checksums: FAILED: {verification['error']}")


@registry_app.command("rollback")
def rollback(
    scene: str = typer.Argument(..., help="The scene."),
    to: Optional[str] = typer.Option(None, "--to", help="Target version (default: the previous live version)."),
) -> None:
    """Make an earlier version live again (verified first; only the pointer moves)."""
    registry = _registry()
    try:
        pointer = registry.pointer(scene)
        if pointer is None:
            raise _unknown_scene(registry, scene)
        info = registry.rollback(scene, to)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{scene}: {pointer['version']} -> {info.version}")
