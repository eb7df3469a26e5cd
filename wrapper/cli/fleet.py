"""`wrapper fleet`: which profiles fit on which node and GPU, how fast, and one assignment of them."""

from __future__ import annotations

from pathlib import Path

import click

from wrapper import settings
from wrapper.cli.common import echo_json, environment
from wrapper.errors import ConfigError, WrapperError
from wrapper.model import gguf_meta
from wrapper.model.gguf_meta import ModelMeta
from wrapper.plan import fleet
from wrapper.profiles import registry


@click.command("fleet")
@click.option("--config", "config_path", metavar="PATH", help="Profile registry (default: LLM_PROFILES_CONFIG_PATH).")
@click.option("--inventory", type=click.Path(path_type=Path), help="Recorded node announcements (YAML or JSON) "
              "instead of listening on NATS.")
@click.option("--listen-s", type=click.FloatRange(min=0.5, max=120), default=5.0, show_default=True,
              help="How long to listen for mesh.node.announce.v1 on NATS_URL.")
@click.option("--profiles", "names", metavar="A,B", help="Profiles to place (default: every profile).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
def fleet_cmd(config_path: str | None, inventory: Path | None, listen_s: float, names: str | None,
              as_json: bool) -> None:
    """Placement across the fleet: fits per node and GPU with predicted tok/s, an assignment, what fits nowhere."""
    env = environment()
    if inventory is not None:
        nodes = fleet.load_inventory(inventory)
    elif env.nats_url:
        nodes = fleet.listen(env.nats_url, listen_s)
    else:
        raise ConfigError("wrapper fleet: no nodes to place on (NATS_URL is unset and no --inventory was given)",
                          hint="set NATS_URL to hear mesh.node.announce.v1, or pass --inventory FILE")
    reg = registry.load(registry.resolve_path(config_path, env.config_path))
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else reg.names()
    sized: dict[str, tuple[settings.Settings, ModelMeta]] = {}
    unsized: dict[str, str] = {}
    for name in wanted:
        s = settings.build(name, registry=reg, env=env)
        try:
            sized[name] = (s, gguf_meta.for_settings(s))
        except WrapperError as exc:
            unsized[name] = f"cannot size its model: {exc.message}"
    result = fleet.place(sized, nodes, unsized)
    if as_json:
        echo_json({"nodes": [n.model_dump() for n in nodes], **result.model_dump()})
        return
    _show(nodes, result)


def _speed(tok_s: float | None) -> str:
    return f"{tok_s:.1f}" if tok_s else "?"


def _show(nodes: list[fleet.Node], result: fleet.Placement) -> None:
    for n in nodes:
        gpus = ", ".join(f"{d.gpu} {d.vram_mib or '?'} MiB ({d.bandwidth_gbps or '?'} GB/s, {d.bandwidth_basis})"
                         for d in n.devices() if d.device != "CPU") or "no GPU"
        click.echo(f"node     {n.node_id}: {gpus}; RAM {n.ram_mib or '?'} MiB"
                   + (" (unified with the GPU)" if n.unified_memory else ""))
    click.echo("fits     profile                      node/device                 verdict            ceiling tok/s")
    for f in result.fits:
        if f.verdict == "no":
            continue
        where = f"{f.node}/{f.device}"
        click.echo(f"         {f.profile:<28} {where:<27} {f.verdict:<18} {_speed(f.tok_s_ceiling):>8}")
    click.echo("assign   (one profile per device: the most profiles placed, then as written, then the fastest)")
    for name, f in sorted(result.assignment.items()):
        changes = f"; gives up: {'; '.join(f.gives_up)}" if f.gives_up else ""
        click.echo(f"         {name} -> {f.node}/{f.device}" + (f" ({f.gpu})" if f.gpu else "")
                   + f": {f.flags}, ~{_speed(f.tok_s_ceiling)} tok/s ceiling{changes}")
    for name, why in sorted(result.nowhere.items()):
        click.echo(f"nowhere  {name}: {why}")


COMMANDS: list[click.Command] = [fleet_cmd]
