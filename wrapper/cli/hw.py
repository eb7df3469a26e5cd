"""`wrapper hw [--json] [--measure-bandwidth]`: this machine's hardware profile."""

from __future__ import annotations

import click

from wrapper import settings
from wrapper.cli.common import echo_json, environment
from wrapper.plan import hardware


@click.command("hw")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.option("--measure-bandwidth", is_flag=True, help="Measure CPU memory bandwidth (a ~1 s numpy copy).")
def hw(as_json: bool, measure_bandwidth: bool) -> None:
    """The hardware profile of this machine: GPUs, CPU, RAM, cgroup limit, fingerprint."""
    env = environment()
    # Without a profile: the override, else what this process inherited (settings.visible_devices).
    profile = hardware.detect(settings.visible_devices(env)[0], measure_bandwidth=measure_bandwidth)
    profile = hardware.with_host_facts(profile, env.state_path())  # keeps a new figure, or shows the last one
    if as_json:
        echo_json(profile.summary())
        return
    click.echo(f"fingerprint   {profile.fingerprint}")
    for g in profile.gpus:
        pcie = f"PCIe gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen else "PCIe unknown"
        click.echo(f"GPU{g.index}          {g.name}, {_mib(g.vram_total_mib)} total, {_mib(g.vram_free_mib)} free, "
                   f"{_mib(g.vram_reserved_mib)} reserved, cc {g.compute_capability or '?'}, {pcie}, "
                   f"peak {_num(g.mem_bandwidth_peak_gbps, 'GB/s')}")
    if not profile.gpus:
        click.echo(f"GPU           none ({profile.gpu_note})")
    else:
        click.echo(f"driver        {profile.driver_version or 'unknown'}, CUDA {profile.cuda_version or 'unknown'}")
    click.echo(f"CPU           {profile.cpu_model or 'unknown'}, {profile.cpu_cores_usable} usable / "
               f"{profile.cpu_cores_logical} logical / {profile.cpu_cores_physical} physical cores")
    click.echo(f"RAM           {_mib(profile.ram_total_mib)} total, {_mib(profile.ram_available_mib)} available, "
               f"cgroup limit {_mib(profile.cgroup_limit_mib) if profile.cgroup_limit_mib else 'none'}")
    bw = profile.cpu_bandwidth_gbps
    when = "measured now" if measure_bandwidth else "measured earlier on this host"
    click.echo(f"CPU bandwidth {f'{bw:g} GB/s ({when})' if bw else 'not measured (--measure-bandwidth)'}")


def _mib(v: int | None) -> str:
    return "unknown" if v is None else f"{v} MiB"


def _num(v: float | None, unit: str) -> str:
    return "unknown" if v is None else f"{v:g} {unit}"


COMMANDS: list[click.Command] = [hw]
