"""Adaptive (screen every cell once, race a shortlist side by side) vs full grid: cost and quality, and the
best config's gain over defaults.

Runs both searches on the tiny dense model with a real llama-server on this machine, then reports:
- grid time, adaptive time and their ratio (target <= 25%), for the search itself (the paired comparison
  with the defaults that ends both runs is reported apart: it costs the same in both);
- quality_paired, the headline (target >= 0.95): the adaptive pick's server config against the grid best's,
  both at the grid best's client load, side by side in REFEREE_ROUNDS interleaved rounds (the adaptive race's
  machinery, a grid repetition a round): the geometric mean of the per-round ratios with its 95% CI. The
  grid's best is the maximum of ~24 noisy figures, so its own figure is inflated by its luck (one best cell's
  repetitions spanned 1014-2205 tok/s on this host); the paired figure is free of that. Same load, because
  the load is the user's and only the config is tuned;
- quality_grid_same_load and quality (secondary): by the grid's own figures, the pick's config at the best's
  load, and the picked cell as it was picked, over the grid's best;
- each run's verdict and its gain over llama-server's defaults from the paired comparison, with its 95% CI;
- where each search's time went: seconds spent measuring cells per rung (the CSV's duration_s; adaptive:
  rung 0 is the screen, rung 1 the race), server starts, and the rest (starts, warm-ups, stops).

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/bench_search.py [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
from pathlib import Path

import yaml

from wrapper import settings
from wrapper.bench import race
from wrapper.bench import sweep as bench
from wrapper.bench.outcome import Outcome
from wrapper.bench.spec import load_spec, plan_cells
from wrapper.model import tiny_models
from wrapper.tuning.records import ratio_ci

GRID = {
    "server.parallel": [1, 2, 4, 8],
    "server.threads": [1, 2],
    "server.batch_size": [64, 512],
    "client.concurrency": [4, 8],
    "client.prompt_words": [32],
    "client.max_tokens": [32],
    "repeat.requests": 16,
    "repeat.min_reps": 3,
    "repeat.max_reps": 5,
}

# For a GPU box (--grid gpu --model a bigger GGUF): the knobs that matter there, all layers offloaded.
GPU_GRID = {
    "server.parallel": [1, 4, 16],
    "server.batch_size": [512, 2048],
    "client.concurrency": [8, 16],
    "client.prompt_words": [64],
    "client.max_tokens": [64],
    "repeat.requests": 16,
    "repeat.min_reps": 3,
    "repeat.max_reps": 3,
}


def time_split(o: Outcome, search_s: float) -> dict[str, object]:
    """Measuring time per rung from the CSV, server starts from the log folders (one per config start; the
    paired comparison's own two are left out, as its time is)."""
    rows = list(csv.DictReader((o.out_dir / "results.csv").read_text().splitlines()))
    per_rung: dict[str, float] = {}
    for r in rows:
        if r["status"] != "pruned":
            per_rung[r["rung"]] = per_rung.get(r["rung"], 0.0) + float(r["duration_s"] or 0)
    starts = [d for d in (o.out_dir / "logs").iterdir() if not d.name.startswith("confirm")]
    measuring = sum(per_rung.values())
    return {"measuring_s_per_rung": {k: round(v, 1) for k, v in sorted(per_rung.items())},
            "server_starts": len(starts), "other_s": round(search_s - measuring, 1)}


REFEREE_ROUNDS = 20


def same_load(pick: str, best: str) -> str:
    """The pick's server config at the grid best's client load: what a user compares, since the load is theirs
    and only the config is tuned (on the CPU, concurrency 4 and 8 of one config measure alike; on a GPU the
    higher load is faster whatever the config)."""
    return f"{pick.split('|', 1)[0]}|{best.split('|', 1)[1]}"


def referee(s: settings.Settings, grid: dict[str, object], out: Path, pick: str, best: str) -> dict[str, object]:
    """The adaptive pick's config against the grid best's, both at the grid best's load, side by side in
    REFEREE_ROUNDS interleaved rounds of a grid repetition each: the geometric mean of the per-round
    throughput ratios (pick / best) and its 95% CI. The same config is 1 by definition (nothing to race)."""
    if pick.split("|", 1)[0] == best.split("|", 1)[0]:
        return {"ratio": 1.0, "ci": None, "rounds": 0, "at": best.split("|", 1)[1]}
    spec = load_spec(None, {**grid, "mode": "adaptive", "adaptive.rounds": REFEREE_ROUNDS, "adaptive.final_rounds": 0})
    sweep = bench.open_sweep(s, spec, out)
    with sweep.store:
        cells = {c.key: c for c in plan_cells(spec, sweep.profile_values)[0]}
        contender = cells.get(same_load(pick, best), cells[pick])
        rows = race.run(sweep, [contender, cells[best]], rung=0)
    if rows is None or any(len(r.reps) != REFEREE_ROUNDS for r in rows):
        return {"ratio": None, "ci": None, "rounds": 0}
    logs = [math.log(a / b) for a, b in zip(rows[0].reps, rows[1].reps, strict=True) if a > 0 and b > 0]
    ratio, lo, hi = ratio_ci(logs)
    return {"ratio": round(ratio, 3), "ci": [round(lo, 3), round(hi, 3)] if lo and hi else None,
            "rounds": len(logs), "at": contender.client.key}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-search-")))
    ap.add_argument("--grid", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--model", type=Path, help="GGUF to sweep (default: the tiny dense model)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or tiny_models.ensure(args.out / "models")["tiny-dense"]
    llamacpp = {"model_path": str(model), "host": "127.0.0.1", "port": 8080, "ctx_size": 8192 if args.model else 2048}
    if args.grid == "gpu":
        llamacpp["n_gpu_layers"] = "all"
    reg = args.out / "reg.yaml"
    reg.write_text(yaml.safe_dump({"profiles": {"tiny": {"llamacpp": llamacpp, "selfcheck": {"enabled": False}}}}))
    environ = {**os.environ, "WRAPPER_STATE_DIR": str(args.out / "state")}
    s = settings.build("tiny", str(reg), environ)
    runs = {}
    for mode in ("grid", "adaptive"):
        spec = load_spec(None, {**(GPU_GRID if args.grid == "gpu" else GRID), "mode": mode})
        sweep = bench.open_sweep(s, spec, args.out / mode)
        with sweep.store:
            runs[mode] = bench.run(sweep)
    grid, adaptive = runs["grid"], runs["adaptive"]
    assert grid.selection.best is not None and adaptive.selection.best is not None
    grid_tps = {r.cell_key: r.throughput_tps for r in grid.final if r.reps}
    picked = adaptive.selection.best.cell_key
    search = {m: o.duration_s - o.verdict.duration_s for m, o in runs.items()}

    def gain(o: Outcome) -> str:
        v = o.verdict
        if v.low is None or v.high is None or v.gain is None:
            return v.kind
        band = f"[{(v.low - 1) * 100:+.1f}%, {(v.high - 1) * 100:+.1f}%]"
        return f"{v.kind}: {v.gain * 100:+.1f}% {band} ({v.pairs} pairs)"

    result = {
        "cells": len(grid.final),
        "grid_s": round(grid.duration_s, 1),
        "adaptive_s": round(adaptive.duration_s, 1),
        "grid_search_s": round(search["grid"], 1),
        "adaptive_search_s": round(search["adaptive"], 1),
        "time_ratio": round(search["adaptive"] / search["grid"], 3),
        "grid_verdict": gain(grid),
        "adaptive_verdict": gain(adaptive),
        "grid_best": grid.selection.best.cell_key,
        "grid_best_tps": round(grid.selection.best.throughput_tps, 1),
        "adaptive_best": picked,
        "adaptive_best_tps_in_grid": round(grid_tps.get(picked, 0.0), 1),
        # The headline: pick vs grid best, same load, side by side (free of the grid best's winner's curse).
        "quality_paired": referee(s, GPU_GRID if args.grid == "gpu" else GRID, args.out / "referee", picked,
                                  grid.selection.best.cell_key),
        # Secondary: by the grid's own figures, the pick's config at the best's load, then the picked cell itself.
        "quality_grid_same_load": round(grid_tps.get(same_load(picked, grid.selection.best.cell_key), 0.0)
                                        / grid.selection.best.throughput_tps, 3),
        "quality": round(grid_tps.get(picked, 0.0) / grid.selection.best.throughput_tps, 3),
        "grid_fastest_tps": round(max(grid_tps.values()), 1),
        "defaults_tps": round(grid.selection.baseline.throughput_tps, 1) if grid.selection.baseline else None,
        "gain_over_defaults_unpaired": round(grid.selection.gain, 3) if grid.selection.gain is not None else None,
        "time_split": {m: time_split(o, search[m]) for m, o in runs.items()},
        "report": grid.files["report"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
