"""`wrapper bench-profile`: sweep llama-server flags under load, record every cell, pick the best config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from wrapper.bench import signals
from wrapper.bench import sweep as bench
from wrapper.bench.spec import load_spec
from wrapper.cli.common import echo_json, load_settings, profile_options

F = TypeVar("F", bound=Callable[..., object])

_INT_DIMS = ("instances", "parallel", "batch_size", "ubatch_size", "ctx_size", "n_gpu_layers", "n_cpu_moe", "threads")
_STR_DIMS = ("flash_attn", "cache_type_k", "cache_type_v")


def _list(kind: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, str | None], list[Any] | None]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any] | None:
        if value is None:
            return None
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected a comma-separated list") from None

    return parse


def _dim_options(func: F) -> F:
    for name in reversed(_INT_DIMS + _STR_DIMS):
        kind: Callable[[str], Any] = int if name in _INT_DIMS else str
        func = click.option(f"--{name.replace('_', '-')}", name, callback=_list(kind), metavar="A,B,...",
                            help=f"Server dimension llamacpp.{name}." if name != "instances" else
                            "Servers per config (load split across them).")(func)
    return func


@click.command("bench-profile")
@profile_options
@click.option("--spec", "spec_path", type=click.Path(path_type=Path, dir_okay=False), help="Sweep spec YAML.")
@_dim_options
@click.option("--concurrency", callback=_list(int), metavar="A,B,...", help="Closed-loop concurrent streams.")
@click.option("--rate", callback=_list(float), metavar="A,B,...", help="Open-loop arrivals/s (replaces concurrency).")
@click.option("--prompt-words", callback=_list(int), metavar="A,B,...", help="Prompt lengths (corpus words).")
@click.option("--max-tokens", callback=_list(int), metavar="A,B,...", help="Output tokens per request.")
@click.option("--requests", type=int, help="Requests per repetition (default 16).")
@click.option("--min-reps", type=int, help="Repetitions at least (default 3).")
@click.option("--max-reps", type=int, help="Repetitions at most (default 6).")
@click.option("--ci", "ci_rel", type=float, help="Stop repeating once the 95% CI half-width <= this x mean (0.05).")
@click.option("--confirm-budget-s", type=float,
              help="Seconds for the paired comparison with llama-server's defaults before 'inconclusive' (180).")
@click.option("--slo-ttft-p95-ms", type=float, help="SLO: p95 time to first token (default 2000).")
@click.option("--slo-min-decode-tps", type=float, help="SLO: per-stream decode tok/s (default 5).")
@click.option("--mode", type=click.Choice(["grid", "adaptive"]),
              help="Full grid, or adaptive: one short run of every cell, then a side-by-side race of the best few.")
@click.option("--no-baseline", is_flag=True, help="Do not measure llama-server's defaults for comparison.")
@click.option("--seed", type=int, help="Prompt selection seed (default 0).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), help="Results directory.")
@click.option("--resume", "resume", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Continue an interrupted run in this directory (its spec is reused).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def bench_cmd(profile_name: str | None, config_path: str | None, *, spec_path: Path | None, out_dir: Path | None,
              resume: Path | None, as_json: bool, no_baseline: bool, **opts: object) -> None:
    """Sweep server flags x client load; record results and the best config for auto-tune."""
    s = load_settings(profile_name, config_path)
    names = {**{d: f"server.{d}" for d in _INT_DIMS + _STR_DIMS},
             **{d: f"client.{d}" for d in ("concurrency", "rate", "prompt_words", "max_tokens")},
             **{d: f"repeat.{d}" for d in ("requests", "min_reps", "max_reps", "ci_rel")},
             "confirm_budget_s": "confirm.budget_s", "slo_ttft_p95_ms": "slo.ttft_p95_ms",
             "slo_min_decode_tps": "slo.min_decode_tps",
             "mode": "mode", "seed": "seed"}
    overrides = {names[k]: v for k, v in opts.items() if v is not None}
    if no_baseline:
        overrides["baseline"] = False
    spec = None if resume else load_spec(spec_path, overrides)
    from wrapper.bench.events import publisher_for

    publish, pub = publisher_for(s)
    try:
        sweep = bench.open_sweep(s, spec, out_dir, resume=resume, publish=publish)
        # From here SIGTERM/SIGINT/SIGHUP only record; the sweep stops its servers and exits 130 (Interrupted).
        with sweep.store, signals.recorded(sweep.stop):
            outcome = bench.run(sweep)
    finally:
        if pub is not None:
            pub.close()
    if as_json:
        echo_json(outcome.summary)
        return
    sel, verdict = outcome.selection, outcome.verdict
    for p in outcome.pruned:
        click.echo(f"skipped {p.cell.key}: {p.reason}")
    for r in outcome.final:
        if r.status != "ok":
            click.echo(f"{r.status:7} {r.cell_key}: {r.reason}")
    if outcome.best_values is not None and sel.best is not None:
        click.echo(f"best: {sel.best.server_key} at {sel.best.client_key} ({verdict.kind}): {verdict.reason}")
        click.echo(f"  why chosen: {sel.reason}")
        click.echo("  stored for `wrapper serve --auto-tune`: "
                   + " ".join(f"{k}={v}" for k, v in outcome.best_values.items()))
    else:
        click.echo(f"{verdict.kind}: {verdict.reason}")
        if verdict.advice:
            click.echo(f"  what to try: {verdict.advice}")
    for note in outcome.notes:
        click.echo(f"  note: {note}")
    click.echo(f"results: {outcome.files['csv']}\nreport:  {outcome.files['report']}")


COMMANDS = [bench_cmd]
