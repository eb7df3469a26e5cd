"""On a GPU box: aggregate decode throughput of llama-server's defaults vs a few server configs, under the
same closed-loop load (concurrency C, fixed output length, ignore_eos). A coarse cross-check of what
`wrapper bench-profile` tunes; results go to throughput_runs.json."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import time
import urllib.request
from pathlib import Path

from vram_runs import wait_ready  # type: ignore[import-not-found]

CONFIGS = {
    "defaults": ["-ngl", "99"],
    "np4": ["-ngl", "99", "-np", "4", "-c", "8192"],
    "np8": ["-ngl", "99", "-np", "8", "-c", "8192"],
    "np8-ub1024": ["-ngl", "99", "-np", "8", "-c", "8192", "-b", "2048", "-ub", "1024"],
}


def one(port: int, i: int, n: int) -> int:
    body = json.dumps({"prompt": f"Request {i}: tell me about GPUs and memory bandwidth.", "n_predict": n,
                       "ignore_eos": True, "cache_prompt": False}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return int(json.load(r)["timings"]["predicted_n"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    rows = []
    for i, (name, flags) in enumerate(CONFIGS.items()):
        port = 18600 + i
        proc = subprocess.Popen([a.bin, "-m", a.model, "--port", str(port), *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not wait_ready(port, proc):
                rows.append({"config": name, "flags": flags, "error": "not ready"})
                continue
            one(port, -1, 8)  # warm-up
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(a.concurrency) as pool:
                tokens = sum(pool.map(lambda k, p=port: one(p, k, a.tokens), range(a.requests)))
            wall = time.perf_counter() - t
            rows.append({"config": name, "flags": flags, "tokens": tokens, "wall_s": round(wall, 3),
                         "throughput_tps": round(tokens / wall, 1)})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(20)
    Path(a.out, "throughput_runs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
