"""Where `wrapper serve` spends its time before llama-server's exec (issue 16).

Runs `wrapper serve` on a profile until the moment it spawns llama-server (the exec shim's Popen), N times, and
reports the median wall and CPU time from interpreter start to that moment, then one more run under
`python -X importtime` that lists the slowest imports made before it (cumulative microseconds). Nothing is
started: the process ends at the spawn.

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/start_steps.py --config REGISTRY --profile NAME [--runs 9]

With no --config it writes a tiny registry over the tiny dense test model.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# Runs inside the measured interpreter: stop at the first Popen and print how long it took to get there.
_PROBE = """
import os, resource, subprocess, sys, time
def _stop(self, *a, **k):
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"SPAWN {time.perf_counter():.6f} {r.ru_utime + r.ru_stime:.6f}", file=sys.stderr, flush=True)
    os._exit(0)
subprocess.Popen.__init__ = _stop
import runpy
sys.argv = ["wrapper", *sys.argv[1:]]
runpy.run_module("wrapper", run_name="__main__", alter_sys=True)
"""


def _registry(work: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(REPO))
    from wrapper.model import tiny_models

    model = tiny_models.ensure(work)["tiny-dense"]
    registry = work / "profiles.yaml"
    profile = {"llamacpp": {"model_path": str(model), "host": "127.0.0.1", "port": 18599, "ctx_size": 512},
               "selfcheck": {"enabled": False}}
    registry.write_text(yaml.safe_dump({"profiles": {"steps": profile}}))
    return registry, "steps"


def _one(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    match = re.search(r"SPAWN (\S+) (\S+)", done.stderr)
    if match is None:
        raise SystemExit(f"wrapper serve did not reach the spawn:\n{done.stderr[-2000:]}")
    return float(match.group(1)) - t0, float(match.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--profile")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wrapper-steps-"))
    registry, profile = (args.config, args.profile) if args.config else _registry(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACPP_", "LLM_", "WRAPPER_"))}
    env.update(WRAPPER_STATE_DIR=str(work / "state"), WRAPPER_STATUS_PORT="0")
    probe = work / "probe.py"
    probe.write_text(_PROBE)
    argv = [sys.executable, str(probe), "serve", "--profile", profile, "--config", str(registry)]
    for variant, extra in (("bytecode", {}), ("PYTHONDONTWRITEBYTECODE=1", {"PYTHONDONTWRITEBYTECODE": "1"})):
        runs = [_one(argv, {**env, **extra}) for _ in range(args.runs)]
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{variant:28s} start -> spawn: wall {wall:.3f} s, cpu {cpu:.3f} s (median of {args.runs})")
    done = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], env=env, cwd=REPO, capture_output=True,
                          text=True, check=False)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            rows.append((int(parts[1]), depth, name.strip()))
    print("\nslowest imports before the spawn (cumulative us; -X importtime inflates them):")
    for cumulative, _, name in sorted((r for r in rows if r[1] <= 1), reverse=True)[: args.top]:
        print(f"  {cumulative:8d}  {name}")


if __name__ == "__main__":
    main()
