"""`wrapper plan`: will the profile's model fit here, with which flags, and how fast? Exit 5 if refused."""

from __future__ import annotations

from pathlib import Path

import click

from wrapper.cli.common import echo_json, load_settings, profile_options
from wrapper.errors import ConfigError, PlanRefused
from wrapper.model import acquire, gguf_meta
from wrapper.plan import hardware, placement, receipts, search, speed


def _mib_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--vram-mib {value!r}: expected MiB per GPU, e.g. 24000 or 24000,24000") from None
    if any(v < 0 for v in out):
        raise ConfigError(f"--vram-mib {value!r}: negative")
    return out


@click.command("plan")
@profile_options
@click.option("--vram-mib", metavar="N[,N]", help="VRAM budget per GPU in MiB instead of the detected free VRAM "
              "(0 or empty: CPU only).")
@click.option("--ram-mib", type=click.IntRange(min=0), help="RAM budget in MiB instead of the detected one.")
@click.option("--ctx", type=click.IntRange(min=0), help="Context size (default: the profile's, else the model's).")
@click.option("--parallel", type=click.IntRange(min=1), help="Parallel slots (default: the profile's, else 1).")
@click.option("--gpu", "gpu_name", metavar="NAME", help="Plan for this GPU model (e.g. 'RTX 4090 Laptop'): its "
              "spec-sheet memory bandwidth gives --vram-mib plans a speed ceiling.")
@click.option("--measure-bandwidth", is_flag=True, help="Measure CPU memory bandwidth (kept for later plans on "
              "this host).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
def plan_cmd(*, profile_name: str | None, config_path: str | None, vram_mib: str | None, ram_mib: int | None,
             ctx: int | None, parallel: int | None, gpu_name: str | None, measure_bandwidth: bool,
             as_json: bool) -> None:
    """Placement plan: memory map, -ngl / --n-cpu-moe / ctx, predicted tok/s, verdict."""
    s = load_settings(profile_name, config_path)
    hw = hardware.for_settings(s, measure_bandwidth=measure_bandwidth)
    budgets = _mib_list(vram_mib)
    if budgets is not None:
        budgets = [b for b in budgets if b > 0]
    meta = gguf_meta.for_settings(s)
    if gpu_name and speed.spec_bandwidth(gpu_name) is None:
        raise ConfigError(f"--gpu {gpu_name!r}: no memory bandwidth known for this GPU",
                          hint="known: " + ", ".join(sorted({p for p, _ in speed.GPU_BANDWIDTH_GBPS})))
    inp, notes = placement.inputs_for(s, hw, vram_mib=budgets, ram_mib=ram_mib, ctx=ctx, parallel=parallel,
                                      gpu_name=gpu_name)
    p = placement.plan(meta, inp)
    p.decisions[:0] = notes
    if meta.n_ctx_train and p.ctx > meta.n_ctx_train:
        p.decisions.append(f"ctx {p.ctx} exceeds the model's training context {meta.n_ctx_train}: quality past "
                           f"{meta.n_ctx_train} tokens is untested unless the model documents RoPE scaling")
    options = search.search(meta, inp) if p.verdict == "refuse" else []
    model_name = Path(acquire.expected_path(s)).name
    on_host = receipts.load(receipts.path_in(s.env.state_path()), hw.fingerprint)
    fc = receipts.forecast(on_host, p.tok_s_ceiling, model_name)
    prefill = speed.prefill_ceiling(p.weights_cpu_bytes if inp.vram_mib else 0, inp.ubatch,
                                    speed.pcie_gbps(hw.gpus[0].pcie_gen, hw.gpus[0].pcie_width) if hw.gpus else None)
    if as_json:
        data = p.summary()
        data.update(model=meta.model_dump(exclude={"layers"}), hardware_fingerprint=hw.fingerprint,
                    forecast=fc.model_dump() if fc else None, receipts_on_host=len(on_host),
                    options=[dict(o.model_dump(), flags=o.flags(meta.n_layer)) for o in options],
                    prefill_link_tok_s=round(prefill, 1) if prefill else None,
                    ngl_spelled=search.spell_ngl(p.n_gpu_layers, meta.n_layer))
        if p.n_gpu_layers >= placement.NGL_ALL_PLANNED:
            data["n_gpu_layers"] = search.NGL_ALL
        echo_json(data)
    else:
        _show(p, meta, fc, on_host=len(on_host), options=options, prefill=prefill)
    if p.verdict == "refuse":
        raise PlanRefused(f"plan refused for profile {s.profile_name}: {meta.name or model_name} does not fit",
                          hint=("try: " + "; ".join(p.alternatives)) if p.alternatives else "")


def _show(p: placement.Plan, meta: gguf_meta.ModelMeta, fc: receipts.Forecast | None, *, on_host: int,
          options: list[search.Option], prefill: float | None) -> None:
    moe = f", {meta.n_expert} experts ({meta.n_expert_used} used)" if meta.n_expert else ""
    click.echo(f"model    {meta.name or meta.source}: {meta.architecture}, {meta.n_layer} layers{moe}, "
               f"{meta.tensor_bytes / placement.MIB:.0f} MiB of weights")
    click.echo(f"flags    -ngl {search.spell_ngl(p.n_gpu_layers, meta.n_layer)}"
               + (f" --n-cpu-moe {p.n_cpu_moe}" if p.n_cpu_moe else "")
               + f" -c {p.ctx} -np {p.parallel} -ctk {p.cache_type_k} -ctv {p.cache_type_v}")
    click.echo("memory   device   weights      KV  compute  overhead    total   budget   margin  (MiB)")
    for d in p.devices:
        budget = "unknown" if d.budget_mib is None else str(d.budget_mib)
        margin = "-" if d.margin_mib is None else f"{d.margin_mib:.0f}"
        click.echo(f"         {d.device:<6} {d.weights_mib:9.0f} {d.kv_mib:7.0f} {d.compute_mib:8.0f} "
                   f"{d.overhead_mib:9.0f} {d.total_mib:8.0f} {budget:>8} {margin:>8}")
    ceiling = f"{p.tok_s_ceiling:.1f} tok/s" if p.tok_s_ceiling else "unknown"
    click.echo(f"speed    ceiling {ceiling} ({p.tok_s_basis})")
    if prefill:
        click.echo(f"         prompt ≤ {prefill:.0f} tok/s while RAM-resident weights cross PCIe each batch")
    if fc:
        band = f"{fc.low_tok_s:.1f}-{fc.high_tok_s:.1f} tok/s, mid {fc.mid_tok_s:.1f}"
        click.echo(f"         forecast {band} ({fc.basis})")
    elif on_host:
        click.echo(f"         forecast: uncalibrated ({on_host} receipt(s) on this hardware, none with a predicted "
                   "ceiling to compare with)")
    else:
        click.echo("         forecast: uncalibrated (no receipts for this hardware yet)")
    for why in p.decisions:
        click.echo(f"  - {why}")
    click.echo(f"verdict  {p.verdict}")
    for a in p.alternatives:
        click.echo(f"  would fit: {a}")
    if options:
        click.echo("options  (fit together; fastest first)")
    for o in options:
        speed_text = f"~{o.tok_s_ceiling:.1f} tok/s ceiling" if o.tok_s_ceiling else "speed unknown"
        click.echo(f"         {o.flags(meta.n_layer)}  {speed_text}; gives up: {'; '.join(o.gives_up) or 'nothing'}")


COMMANDS: list[click.Command] = [plan_cmd]
