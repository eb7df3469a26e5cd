"""The planner against llama-server's own buffer report on nine real model families.

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/plan_families.py [--out DIR] [--keep] [--only KEY ...]

Writes each family's synthetic GGUF (wrapper/model/family_models.py: the real vocabulary, head counts and
dims, KV heads, window layout, experts; layers and hidden sizes cut proportionally), starts llama-server on
it (CPU build, -t 1, --fit off), sums the model, KV and compute buffers its log reports, and prints one
markdown row per configuration beside the plan's numbers for the same command. Models are deleted after
their rows unless --keep. On a GPU machine pass `--ngl 999` (and `--n-cpu-moe N` for the MoE families) to
compare the GPU buffers too: the plan is then made for one GPU with that offload, and the weights/KV/compute
columns sum every device (the per-device split is printed below each row).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plan_accuracy import run_server

from wrapper.model import family_models, gguf_meta
from wrapper.plan import placement

MIB = 1 << 20
_SIZE = re.compile(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB")
_COMPUTE_EXACT = re.compile(r"(\S+) compute buffer size is\s+([\d.]+) MiB")

# family key -> configurations: (ctx, parallel, cache type, flash attention)
DEFAULT = [(8192, 4, "f16", True)]
EXTRA = {
    "llama3": [(4096, 1, "q8_0", True)],
    "gemma3": [(32768, 1, "f16", True), (8192, 4, "f16", False)],
    "gpt-oss": [(32768, 2, "q8_0", True)],
    "deepseek2": [(16384, 1, "f16", False)],
    "phi": [(4096, 2, "f16", False)],
}


def reported(log: str) -> dict[str, Any]:
    """MiB by kind, summed over devices and caches (an iSWA model logs one KV buffer per cache), plus the
    same by device (`by_device`, kind -> device -> MiB)."""
    by: dict[str, dict[str, float]] = {"model": {}, "KV": {}, "compute": {}}
    for m in _SIZE.finditer(log):
        by[m[2]][m[1]] = by[m[2]].get(m[1], 0.0) + float(m[3])
    exact = {m[1]: float(m[2]) for m in _COMPUTE_EXACT.finditer(log)}  # printed at exit with 4 decimals
    if exact:
        by["compute"] = exact
    out: dict[str, Any] = {kind: sum(devices.values()) for kind, devices in by.items()}
    return {**out, "by_device": by}


def pct(planned: float, real: float) -> str:
    return "n/a" if not real else f"{(planned - real) / real * 100:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/plan-families", help="where the synthetic models are written")
    ap.add_argument("--keep", action="store_true", help="keep the models (they take 0.2-1 GB each)")
    ap.add_argument("--only", nargs="*", help="family keys to run (default: all)")
    ap.add_argument("--ngl", type=int, default=None, help="offload this many layers (GPU build); default CPU only")
    ap.add_argument("--n-cpu-moe", type=int, default=None, help="with --ngl: keep the experts of the first N "
                    "layers on the CPU")
    args = ap.parse_args()
    binary = os.environ.get("LLAMA_SERVER_BIN") or "llama-server"
    out = Path(args.out)
    print("| family (shape of) | cut | ctx x slots, KV, fa | weights plan / real | KV plan / real | "
          "compute plan / real | total plan / real MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for fam in family_models.FAMILIES:
        if args.only and fam.key not in args.only:
            continue
        path = out / f"{fam.key}.gguf"
        if not path.is_file():
            family_models.write(path, fam)
        meta = gguf_meta.read_local(path)
        for ctx, par, cache, flash in DEFAULT + EXTRA.get(fam.key, []):
            fa = "on" if flash else "off"
            gpu = args.ngl is not None
            moe = args.n_cpu_moe if gpu and meta.is_moe else None
            p = placement.plan(meta, placement.PlanInputs(
                ctx=ctx, parallel=par, cache_type_k=cache, cache_type_v=cache, flash_attn=flash,
                vram_mib=[10**6] if gpu else [], n_gpu_layers=args.ngl, n_cpu_moe=moe if gpu else None))
            extra = ["-ngl", str(args.ngl)] if gpu else []
            extra += ["--n-cpu-moe", str(moe)] if moe else []
            real = reported(run_server(binary, path, ["-t", "1", "-c", str(ctx), "-np", str(par), "-ctk", cache,
                                                      "-ctv", cache, "-fa", fa, *extra]))
            w, k, c = (sum(getattr(d, f) for d in p.devices) for f in ("weights_mib", "kv_mib", "compute_mib"))
            planned = w + k + c
            total = real["model"] + real["KV"] + real["compute"]
            worst = max(worst, abs(planned - total) / total if total else 1.0)
            print(f"| {fam.label} | {fam.cut} | {ctx} x {par}, {cache}, {fa} | {w:.1f} / {real['model']:.1f} | "
                  f"{k:.1f} / {real['KV']:.1f} | {c:.1f} / {real['compute']:.1f} | {planned:.1f} / {total:.1f} | "
                  f"{pct(planned, total)} |", flush=True)
            if gpu:
                split = "; ".join(f"{d.device} {d.weights_mib:.0f}+{d.kv_mib:.0f}+{d.compute_mib:.0f}"
                                  for d in p.devices)
                print(f"<!-- plan per device (weights+KV+compute MiB): {split}; reported: {real['by_device']} -->")
        if not args.keep:
            path.unlink()
    print(f"\nworst total error: {worst * 100:.1f}%")
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
