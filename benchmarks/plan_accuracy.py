"""Placement accuracy: the planner's KV cache, weights and compute buffer vs what llama-server reports.

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/plan_accuracy.py [--out DIR] [--markdown]

Runs llama-server (CPU build, -t 1, --fit off so the sizes are the ones asked for) on the tiny dense and
MoE models and on bigger synthetic llamas written here (f16 and q8_0, a few hundred MB), reads the buffer
sizes from its verbose log and prints one table row per configuration. benchmarks/plan_vs_vram.py reuses
`write_synthetic`, `run_server` and `parse_log` on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wrapper.model import gguf_meta, tiny_models
from wrapper.plan import placement

MIB = 1 << 20


def write_synthetic(path: Path, *, n_layer: int = 8, n_embd: int = 1024, n_head: int = 16, n_head_kv: int = 4,
                    n_ff: int = 2816, n_vocab: int = 32000, n_expert: int = 0, n_expert_used: int = 0,
                    dtype: str = "f16") -> Path:
    """A loadable llama GGUF of real shapes (constant weights: only memory is measured)."""
    if path.is_file():
        return path
    spec = tiny_models.TinySpec(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                                n_ctx_train=8192, n_expert=n_expert, n_expert_used=n_expert_used, dtype=dtype,
                                n_vocab=n_vocab, constant=True)
    return tiny_models.write(path, spec)


_SIZE = re.compile(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB")
_KV_TOTAL = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB")
_COMPUTE_EXACT = re.compile(r"(\S+) compute buffer size is\s+([\d.]+) MiB")


def parse_log(text: str) -> dict[str, Any]:
    """Buffer sizes (MiB) by kind and device from the verbose log of one llama-server load (--fit off)."""
    out: dict[str, dict[str, float]] = {"model": {}, "KV": {}, "compute": {}}
    for m in _SIZE.finditer(text):
        # KV lines add up: a sliding-window model logs one buffer per cache (full and SWA) on each device.
        out[m[2]][m[1]] = out[m[2]].get(m[1], 0.0) + float(m[3]) if m[2] == "KV" else float(m[3])
    for m in _COMPUTE_EXACT.finditer(text):  # printed at exit with 4 decimals
        out["compute"][m[1]] = float(m[2])
    kv = [float(x) for x in _KV_TOTAL.findall(text)]
    return {**out, "kv_total": sum(kv) if kv else None}


def run_server(binary: str, model: Path, args: list[str], timeout: float = 120.0) -> str:
    """Start llama-server, wait until it listens, stop it; return its log."""
    cmd = [binary, "-m", str(model), "--port", "0", "--host", "127.0.0.1", "-v", "--fit", "off", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "listening on" in line or "exiting due to" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)  # llama-server installs its signal handlers around the time it starts listening
    proc.terminate()
    try:
        rest, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return "".join(lines) + (rest or "")


CASES: list[tuple[str, str, int, int, str, bool]] = [
    # model, label, ctx, parallel, cache type, flash attention
    ("tiny-dense", "tiny dense f32", 1024, 1, "f16", True),
    ("tiny-moe", "tiny MoE f32", 2048, 2, "f16", True),
    ("synth-f16", "llama 8L/1024 f16", 4096, 1, "f16", True),
    ("synth-f16", "llama 8L/1024 f16", 4096, 1, "f16", False),
    ("synth-f16", "llama 8L/1024 f16", 8192, 4, "q8_0", True),
    ("synth-q8", "llama 8L/1024 q8_0", 3000, 3, "q4_0", True),
    ("synth-q8", "llama 8L/1024 q8_0", 2048, 2, "f16", False),
    ("synth-moe", "MoE 4L 8x/2 f16", 4096, 2, "f16", True),
]


def models(out: Path) -> dict[str, Path]:
    found = dict(tiny_models.ensure(out))
    found["synth-f16"] = write_synthetic(out / "synth-f16.gguf")
    found["synth-q8"] = write_synthetic(out / "synth-q8.gguf", dtype="q8_0")
    found["synth-moe"] = write_synthetic(out / "synth-moe.gguf", n_layer=4, n_ff=1024, n_expert=8, n_expert_used=2)
    return found


def pct(planned: float, real: float) -> str:
    return "n/a" if not real else f"{(planned - real) / real * 100:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/plan-accuracy", help="where the synthetic models are written")
    args = ap.parse_args()
    binary = os.environ.get("LLAMA_SERVER_BIN") or "llama-server"
    paths = models(Path(args.out))
    print("| model | ctx x slots, KV type, flash attn | KV plan / real MiB | weights plan / real MiB | "
          "compute plan / real MiB | total plan / real MiB | total error |")
    print("|---|---|---|---|---|---|---|")
    for key, label, ctx, par, cache, flash in CASES:
        meta = gguf_meta.read_local(paths[key])
        fa = "on" if flash else "off"
        inp = placement.PlanInputs(ctx=ctx, parallel=par, cache_type_k=cache, cache_type_v=cache, flash_attn=flash)
        p = placement.plan(meta, inp)
        real = parse_log(run_server(binary, paths[key], ["-t", "1", "-c", str(ctx), "-np", str(par),
                                                         "-ctk", cache, "-ctv", cache, "-fa", fa]))
        cpu = p.devices[-1]
        rk, rw, rc = real["kv_total"] or 0.0, sum(real["model"].values()), sum(real["compute"].values())
        pk, pw, pc = p.kv_bytes / MIB, cpu.weights_mib, cpu.compute_mib
        print(f"| {label} | {ctx} x {par}, {cache}, fa {fa} | {pk:.2f} / {rk:.2f} | {pw:.2f} / {rw:.2f} | "
              f"{pc:.2f} / {rc:.2f} | {pk + pw + pc:.2f} / {rk + rw + rc:.2f} | {pct(pk + pw + pc, rk + rw + rc)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
