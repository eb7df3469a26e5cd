"""On a GPU machine: the plan vs the buffers a CUDA llama-server reports vs nvidia-smi's used memory.

    LLAMA_SERVER_BIN=/path/to/cuda/llama-server .venv/bin/python benchmarks/plan_vs_vram.py [--out DIR]

Writes the synthetic models of benchmarks/plan_accuracy.py (plus a ~2 GB one), detects the GPU with NVML,
and for each case starts llama-server with the planned -ngl / --n-cpu-moe (and once with a VRAM budget
small enough to force a partial offload), then prints the planned GPU weights / KV / compute next to the
CUDA buffer sizes from the log and the process's memory from nvidia-smi. Takes a minute or two.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plan_accuracy import parse_log, write_synthetic

from wrapper.model import gguf_meta
from wrapper.plan import hardware, placement


def smi_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run(binary: str, model: Path, args: list[str]) -> tuple[str, int | None]:
    """Start llama-server, read nvidia-smi while it is up, stop it; return (log, used MiB)."""
    cmd = [binary, "-m", str(model), "--port", "0", "--host", "127.0.0.1", "-v", "--fit", "off", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines, used = [], None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if "listening on" in line:
            time.sleep(1.0)
            used = smi_used_mib()
            break
        if "exiting due to" in line or time.monotonic() > deadline:
            break
    proc.terminate()
    try:
        rest, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return "".join(lines) + (rest or ""), used


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/plan-vs-vram")
    ap.add_argument("--fa-off", action="store_true", help="for a CUDA build without flash-attention kernels")
    args = ap.parse_args()
    binary = os.environ.get("LLAMA_SERVER_BIN") or "llama-server"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {
        "dense-300M-f16": write_synthetic(out / "synth-f16.gguf"),
        "moe-340M-f16": write_synthetic(out / "synth-moe.gguf", n_layer=4, n_ff=1024, n_expert=8, n_expert_used=2),
        "dense-2G-f16": write_synthetic(out / "synth-2g.gguf", n_layer=24, n_embd=2048, n_head=16, n_head_kv=4,
                                        n_ff=5632),
    }
    hw = hardware.detect(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not hw.gpus:
        print(f"no GPU: {hw.gpu_note}")
        return 1
    g = hw.gpus[0]
    print(f"GPU {g.name}, {g.vram_total_mib} MiB total, {g.vram_free_mib} MiB free, idle used {smi_used_mib()} MiB")
    base_used = smi_used_mib() or 0
    print("| model | ctx x np, fa | budget MiB | plan -ngl/-ncmoe | GPU weights plan/real | KV plan/real | "
          "compute plan/real | plan GPU total (incl. CUDA context reserve) | nvidia-smi delta |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("dense-300M-f16", 8192, 1, True, None), ("dense-300M-f16", 8192, 4, False, None),
             ("moe-340M-f16", 4096, 2, True, None), ("moe-340M-f16", 4096, 2, True, 700),
             ("dense-2G-f16", 16384, 2, True, None), ("dense-2G-f16", 16384, 2, True, 1800)]
    for name, ctx, par, fa_wanted, budget in cases:
        fa = fa_wanted and not args.fa_off
        meta = gguf_meta.read_local(models[name])
        vram = [budget or (g.vram_free_mib or 0)]
        p = placement.plan(meta, placement.PlanInputs(vram_mib=vram, ctx=ctx, parallel=par, flash_attn=fa))
        flags = ["-ngl", str(p.n_gpu_layers), "-c", str(ctx), "-np", str(par), "-fa", "on" if fa else "off",
                 "-t", "4"]
        if p.n_cpu_moe:
            flags += ["--n-cpu-moe", str(p.n_cpu_moe)]
        log, used = run(binary, models[name], flags)
        real = parse_log(log)
        cuda = {k: sum(v for dev, v in real[k].items() if dev.startswith("CUDA0") and "Host" not in dev)
                for k in ("model", "KV", "compute")}
        d = p.devices[0]
        delta = None if used is None else used - base_used
        print(f"| {name} | {ctx} x {par}, {'on' if fa else 'off'} | {vram[0]} | {p.n_gpu_layers}/{p.n_cpu_moe} | "
              f"{d.weights_mib:.1f} / {cuda['model']:.1f} | {d.kv_mib:.1f} / {cuda['KV']:.1f} | "
              f"{d.compute_mib:.1f} / {cuda['compute']:.1f} | {d.total_mib:.0f} | {delta} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
