"""The planner against llama-server's own buffer report on nine real model families.

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/plan_families.py [--out DIR] [--keep] [--only KEY ...]

Writes each family's synthetic GGUF (wrapper/model/family_models.py: the real vocabulary, head counts and
dims, KV heads, window layout, experts; layers and hidden sizes cut proportionally), starts llama-server on
it (CPU build, -t 1, --fit off), sums the model, KV and compute buffers its log reports, and prints one
markdown row per configuration beside the plan's numbers for the same command. Models are deleted after
their rows unless --keep. On a GPU machine pass --ngl 999 to compare the GPU buffers too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

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


def reported(log: str) -> dict[str, float]:
    """MiB by kind, summed over devices and caches (an iSWA model logs one KV buffer per cache)."""
    out = {"model": 0.0, "KV": 0.0, "compute": 0.0}
    exact: dict[str, float] = {}
    for m in _SIZE.finditer(log):
        out[m[2]] += float(m[3])
    for m in _COMPUTE_EXACT.finditer(log):  # printed at exit with 4 decimals
        exact[m[1]] = float(m[2])
    if exact:
        out["compute"] = sum(exact.values())
    return out


def pct(planned: float, real: float) -> str:
    return "n/a" if not real else f"{(planned - real) / real * 100:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/plan-families", help="where the synthetic models are written")
    ap.add_argument("--keep", action="store_true", help="keep the models (they take 0.2-1 GB each)")
    ap.add_argument("--only", nargs="*", help="family keys to run (default: all)")
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
            p = placement.plan(meta, placement.PlanInputs(ctx=ctx, parallel=par, cache_type_k=cache,
                                                          cache_type_v=cache, flash_attn=flash))
            real = reported(run_server(binary, path, ["-t", "1", "-c", str(ctx), "-np", str(par), "-ctk", cache,
                                                      "-ctv", cache, "-fa", fa]))
            cpu = p.devices[-1]
            planned = cpu.weights_mib + cpu.kv_mib + cpu.compute_mib
            total = sum(real.values())
            worst = max(worst, abs(planned - total) / total if total else 1.0)
            print(f"| {fam.label} | {fam.cut} | {ctx} x {par}, {cache}, {fa} | {cpu.weights_mib:.1f} / "
                  f"{real['model']:.1f} | {cpu.kv_mib:.1f} / {real['KV']:.1f} | {cpu.compute_mib:.1f} / "
                  f"{real['compute']:.1f} | {planned:.1f} / {total:.1f} | {pct(planned, total)} |", flush=True)
        if not args.keep:
            path.unlink()
    print(f"\nworst total error: {worst * 100:.1f}%")
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
