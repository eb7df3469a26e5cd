"""`wrapper profiles list | show NAME | validate [PATH]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wrapper import profiles as registry_mod
from wrapper import settings as settings_mod
from wrapper.cli.common import echo_json, environment, load_settings
from wrapper.errors import RegistryNotFound


@click.group("profiles")
def profiles_group() -> None:
    """Inspect and check the profile registry."""


def _registry(config_path: str | None) -> registry_mod.Registry:
    env = environment()
    return registry_mod.load(registry_mod.resolve_path(config_path, env.config_path))


@profiles_group.command("list")
@click.option("--config", "config_path", metavar="PATH", help="Profile registry.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(config_path: str | None, as_json: bool) -> None:
    """List the profiles in the registry."""
    reg = _registry(config_path)
    rows: list[dict[str, Any]] = []
    for name in reg.names():
        p = reg.profiles[name]
        model = p.llamacpp.model_path or f"{p.llamacpp.hf_repo_id}/{p.llamacpp.hf_filename}"
        rows.append({"name": name, "display_name": p.display_name, "task_type": p.task_type, "model": model})
    if as_json:
        echo_json({"registry": str(reg.path), "profiles": rows})
        return
    click.echo(f"# {reg.path}")
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['display_name'] or '-'}  [{r['model']}]")


@profiles_group.command("show")
@click.argument("name", required=False)
@click.option("--config", "config_path", metavar="PATH", help="Profile registry.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--auto-tune", is_flag=True, help="Show the values a tuned start would use.")
def show_cmd(name: str | None, config_path: str | None, as_json: bool, auto_tune: bool) -> None:
    """Show a profile's effective values and where each came from (profile / env / default / tuning)."""
    s = load_settings(name, config_path)
    from wrapper.launch.prepare import prepare

    decisions: list[str] = []
    if auto_tune or s.profile.tuning.auto or s.server.n_gpu_layers == "auto":
        launch = prepare(s, auto_tune=auto_tune or None)  # the same layers `serve` applies
        s, decisions = launch.settings, list(launch.decisions)
    rows = effective_rows(s)
    if as_json:
        echo_json({"profile": s.profile_name, "registry": str(s.registry_path), "values": rows,
                   "decisions": decisions})
        return
    click.echo(f"# profile {s.profile_name} from {s.registry_path}")
    width = max(len(r["setting"]) for r in rows)
    for r in rows:
        click.echo(f"{r['setting']:<{width}}  {_fmt(r['value']):<24}  ({r['origin']})")
    for decision in decisions:
        click.echo(f"# {decision}")


def effective_rows(s: settings_mod.Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key in ("display_name", "task_type", "backend", "model_id"):
        rows.append({"setting": key, "value": getattr(s.profile, key), "origin": s.origin(key)})
    for block in ("llamacpp", "gpu", "selfcheck", "tuning", "supervise"):
        sub = getattr(s.profile, block)
        for field in type(sub).model_fields:
            path = f"{block}.{field}"
            rows.append({"setting": path, "value": getattr(sub, field), "origin": s.origin(path)})
    rows.append({"setting": "env.CUDA_VISIBLE_DEVICES", "value": s.cuda_visible_devices, "origin": s.cuda_origin})
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


@profiles_group.command("validate")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def validate_cmd(path: str | None) -> None:
    """Check a registry file; every problem is reported with file:line and setting path."""
    env = environment()
    resolved = Path(path) if path else registry_mod.resolve_path(None, env.config_path)
    if path and not resolved.is_file():
        raise RegistryNotFound(f"{path}: no such file")
    reg = registry_mod.load(resolved)
    click.echo(f"ok: {resolved}: {len(reg.profiles)} profile(s): {', '.join(reg.names())}")


COMMANDS = [profiles_group]
