"""The plan vs the GPU memory a CUDA llama-server really used (benchmarks/gpu/results/vram_runs.json).

Rewrites the same synthetic models vram_runs.py wrote on the GPU machine (same specs and seeds, so the same
tensors), plans each recorded run with its exact flags and prints the plan's GPU total (weights + KV +
compute + the fixed CUDA context reserve) beside nvidia-smi's used memory for that run.

    .venv/bin/python benchmarks/gpu/compare_plan.py [--models DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from vram_runs import MODELS  # type: ignore[import-not-found]  # noqa: E402

from wrapper.model import gguf_meta, tiny_models  # noqa: E402
from wrapper.plan import placement  # noqa: E402


def flag(flags: list[str], name: str, default: str | None = None) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else default


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path("/tmp/vram-models"))
    args = ap.parse_args()
    runs = json.loads((HERE / "results" / "vram_runs.json").read_text())
    nvml = json.loads((HERE / "results" / "nvml.json").read_text())
    total_mib = nvml["devices"][0]["memory_v1"]["total"] // 2**20
    metas = {}
    for name, spec in MODELS.items():
        path = args.models / f"{name}.gguf"
        if not path.is_file():
            tiny_models.write(path, spec)
        metas[name] = gguf_meta.read_local(path)
    print("| model | flags | plan GPU weights / KV / compute MiB | plan GPU total MiB | nvidia-smi used MiB "
          "| plan - used |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        f = run["flags"]
        inp = placement.PlanInputs(
            vram_mib=[total_mib], ctx=int(flag(f, "-c") or 0), parallel=int(flag(f, "-np") or 1),
            cache_type_k=flag(f, "-ctk", "f16") or "f16", flash_attn=False,  # the build had no FA kernels
            n_gpu_layers=int(flag(f, "-ngl") or 0), n_cpu_moe=int(flag(f, "--n-cpu-moe") or 0))
        p = placement.plan(metas[run["model"]], inp, explore=False)
        gpu = p.devices[0]
        used = run["gpu_used_mib"]
        diff = gpu.total_mib - used
        print(f"| {run['model']} | `{' '.join(f)}` | {gpu.weights_mib:.0f} / {gpu.kv_mib:.0f} / {gpu.compute_mib:.0f} "
              f"| {gpu.total_mib:.0f} | {used:.0f} | {diff:+.0f} ({diff / used * 100:+.1f}%) |")


if __name__ == "__main__":
    main()
