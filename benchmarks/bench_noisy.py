"""bench-profile on a noisy host: does any sweep store a config slower than the defaults it measured?

Runs N sweeps (default 10) of the tiny dense model with a real llama-server, few repetitions, while a
CPU hog spins beside it (`--no-hog` for a quiet run), and counts the outcomes:
- verdicts: win (stored), defaults, inconclusive (nothing stored);
- stored_slower: stored configs slower than the defaults measured in the same run, judged twice: by the
  paired comparison's means and, independently, by the sweep's own cells at the same load. Target: 0.

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/bench_noisy.py [--sweeps 10] [--no-hog] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from wrapper import settings
from wrapper.bench import sweep as bench
from wrapper.bench.spec import load_spec
from wrapper.model import tiny_models

SPEC = {
    "server.parallel": [1, 2, 4],
    "client.concurrency": [4],
    "client.prompt_words": [16],
    "client.max_tokens": [16],
    "repeat.requests": 8,
    "repeat.min_reps": 2,
    "repeat.max_reps": 3,
    "confirm.budget_s": 60.0,
}
HOG = "import time\nwhile True:\n    sum(range(10000))\n"


def one(s: settings.Settings, out: Path, seed: int) -> dict[str, Any]:
    spec = load_spec(None, {**SPEC, "seed": seed})
    sweep = bench.open_sweep(s, spec, out)
    with sweep.store:
        outcome = bench.run(sweep)
    v, cand = outcome.verdict, outcome.summary["candidate"]
    row: dict[str, Any] = {"verdict": v.kind, "stored": outcome.best_values is not None,
                           "candidate": cand["config"] if cand else None,
                           "gain": v.gain, "gain_low": None if v.low is None else v.low - 1,
                           "gain_high": None if v.high is None else v.high - 1, "pairs": v.pairs,
                           "duration_s": round(outcome.duration_s, 1)}
    if row["stored"]:
        sel = outcome.selection
        assert sel.best is not None
        row["slower_paired"] = statistics.fmean(v.leader_reps) < statistics.fmean(v.defaults_reps)
        row["slower_cells"] = sel.baseline is not None and sel.best.throughput_tps < sel.baseline.throughput_tps
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-noisy-")))
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--no-hog", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = tiny_models.ensure(args.out / "models")["tiny-dense"]
    llamacpp = {"model_path": str(model), "host": "127.0.0.1", "port": 8080, "ctx_size": 2048}
    reg = args.out / "reg.yaml"
    reg.write_text(yaml.safe_dump({"profiles": {"tiny": {"llamacpp": llamacpp, "selfcheck": {"enabled": False}}}}))
    s = settings.build("tiny", str(reg), {**os.environ, "WRAPPER_STATE_DIR": str(args.out / "state")})
    hog = None if args.no_hog else subprocess.Popen([sys.executable, "-c", HOG])
    rows = []
    started = time.monotonic()
    try:
        for i in range(args.sweeps):
            rows.append(one(s, args.out / f"sweep-{i:02d}", seed=i))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if hog is not None:
            hog.send_signal(signal.SIGTERM)
            hog.wait(10)
    stored = [r for r in rows if r["stored"]]
    result = {
        "sweeps": len(rows), "hog": hog is not None, "spec": SPEC,
        "verdicts": {k: sum(r["verdict"] == k for r in rows) for k in ("win", "defaults", "inconclusive")},
        "stored": len(stored),
        "stored_slower_paired": sum(r["slower_paired"] for r in stored),
        "stored_slower_cells": sum(r["slower_cells"] for r in stored),
        "stored_gains": [round(r["gain"], 3) for r in stored],
        "total_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
