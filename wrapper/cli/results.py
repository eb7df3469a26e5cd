"""`wrapper results`: past bench-profile runs and the best configs recorded for auto-tune."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from wrapper.cli.common import echo_json, environment
from wrapper.tuning.store import Store, default_path


@click.command("results")
@click.option("--profile", "profile_name", metavar="NAME", help="Only this profile (default: all).")
@click.option("--config", "config_path", metavar="PATH", hidden=True, help="Accepted for symmetry; unused.")
@click.option("--json", "as_json", is_flag=True, help="Runs and best configs as JSON.")
def results_cmd(profile_name: str | None, config_path: str | None, as_json: bool) -> None:
    """List sweep runs and the best config recorded for each (profile, model, hardware, build)."""
    env = environment()
    path = default_path(env.state_path())
    runs: list[dict[str, Any]] = []
    bests: list[dict[str, Any]] = []
    if path.is_file():
        with Store(path) as store:
            for run in store.runs(profile_name):
                summary = json.loads(run.pop("summary_json") or "{}")
                run.pop("spec_json", None)
                runs.append({**run, "best": summary.get("best"), "gain": summary.get("gain")})
            bests = [{"profile": b.key.profile, "model_id": b.key.model_id, "hardware_fingerprint": b.key.hardware_fp,
                      "build": b.key.build, "run_id": b.run_id, "values": b.values, "throughput_tps": b.throughput_tps,
                      "baseline_tps": b.baseline_tps, "gain": b.gain, "created_at": b.created_at}
                     for b in store.bests(profile_name)]
    if as_json:
        echo_json({"store": str(path), "runs": runs, "best": bests})
        return
    if not runs:
        click.echo(f"no runs recorded in {path}")
        return
    for run in runs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started_at"]))
        best = run["best"]
        answer = f"best {best['config']} {best['throughput_tps']:.1f} tok/s" if best else "no best"
        gain = f" ({run['gain'] * 100:+.1f}% vs defaults)" if run.get("gain") is not None else ""
        click.echo(f"{run['run_id']}  {when}  {run['profile']}  {run['mode']}  {run['status']}  {answer}{gain}")
    seen: set[tuple[str, ...]] = set()
    click.echo("best configs in force (newest per key):")
    for b in bests:
        key = (b["profile"], b["model_id"], b["hardware_fingerprint"], b["build"])
        if key in seen:
            continue
        seen.add(key)
        values = ", ".join(f"{k}={v}" for k, v in b["values"].items())
        click.echo(f"  {b['profile']}  model {b['model_id'][:12]}  hw {b['hardware_fingerprint']}  "
                   f"build {b['build']}: {values}  ({b['run_id']})")


COMMANDS = [results_cmd]
