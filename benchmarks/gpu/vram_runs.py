"""On a GPU box: start llama-server with several placements of synthetic models and record, per run, the
buffer sizes llama-server logs and the GPU memory NVML reports. The plan is compared offline
(benchmarks/plan_accuracy.py reads the JSON this writes)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from wrapper.model import tiny_models

MODELS = {
    # ~1.5 GB f16 dense llama with GQA (16 heads, 4 KV heads).
    "dense-1.5g": tiny_models.TinySpec(n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=5632,
                                       n_ctx_train=32768, dtype="f16", seed=3),
    # ~1.3 GB f16 MoE llama: 8 experts, 2 used.
    "moe-1.3g": tiny_models.TinySpec(n_layer=8, n_embd=2048, n_head=16, n_head_kv=4, n_ff=1408, n_expert=8,
                                     n_expert_used=2, n_ctx_train=32768, dtype="f16", seed=4),
}

RUNS = [
    ("dense-1.5g", ["-ngl", "99", "-c", "4096", "-np", "1"]),
    ("dense-1.5g", ["-ngl", "99", "-c", "16384", "-np", "4"]),
    ("dense-1.5g", ["-ngl", "99", "-c", "8192", "-np", "2", "-ctk", "q8_0"]),
    ("dense-1.5g", ["-ngl", "8", "-c", "4096", "-np", "1"]),
    ("moe-1.3g", ["-ngl", "99", "-c", "4096", "-np", "1"]),
    ("moe-1.3g", ["-ngl", "99", "-c", "4096", "-np", "1", "--n-cpu-moe", "4"]),
]

BUF = re.compile(r"(?P<dev>\S+) (?P<kind>model|KV|compute|output|RS) buffer size =\s*(?P<mib>[\d.]+) MiB")


def gpu_used_mib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--models", default="/tmp/vram-models")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    models = Path(args.models)
    paths = {}
    for name, spec in MODELS.items():
        t = time.time()
        paths[name] = tiny_models.write(models / f"{name}.gguf", spec)
        print(f"wrote {name}: {paths[name].stat().st_size / 2**20:.0f} MiB in {time.time() - t:.1f}s", flush=True)
    baseline = gpu_used_mib()
    results = []
    for i, (name, flags) in enumerate(RUNS):
        port = 18500 + i
        log_path = Path(args.out) / f"run{i}.log"
        cmd = [args.bin, "-m", str(paths[name]), "--port", str(port), "-lv", "4", *flags]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            ok = wait_ready(port, proc)
            used = gpu_used_mib() if ok else None
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        text = log_path.read_text(errors="replace")
        buffers = [m.groupdict() for m in BUF.finditer(text)]
        row = {"model": name, "flags": flags, "ready": ok, "gpu_used_mib": used, "gpu_baseline_mib": baseline,
               "buffers": buffers, "model_bytes": paths[name].stat().st_size,
               "log_tail": text.splitlines()[-60:] if not ok else [
                   line for line in text.splitlines() if "buffer size" in line or "offload" in line]}
        results.append(row)
        print(json.dumps({k: row[k] for k in ("model", "flags", "ready", "gpu_used_mib")}), flush=True)
        log_path.unlink()
    Path(args.out, "vram_runs.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
