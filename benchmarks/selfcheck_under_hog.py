"""Ten self-checks in a row on a healthy llama-server with a CPU hog beside it: how often does it cry wolf?

Issue 12's bar: no `fail` and at most one `degraded` in ten. The server is the tiny dense model as
`ctx_size: 512, parallel: 2` runs it (256 tokens a slot: the shape whose every request used to fail with
HTTP 400); the hog is one busy-loop process per `--hogs`, started after the server is up and stopped at
the end. The first check runs with the hog already there and becomes the baseline the others compare with,
exactly as on a host that is busy from the start.

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/selfcheck_under_hog.py [--runs 10] [--hogs 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from wrapper.measure import selfcheck
from wrapper.model import tiny_models
from wrapper.profiles.schema import SelfCheckSpec


def _busy() -> None:
    while True:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(binary: str, model: Path, ctx: int, parallel: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
                             "-c", str(ctx), "-np", str(parallel), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("llama-server did not become ready in 60 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--hogs", type=int, default=1, help="busy-loop processes beside the server")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--measure-s", type=float, default=SelfCheckSpec().measure_s)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    binary = os.environ.get("LLAMA_SERVER_BIN") or "llama-server"
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_models.ensure(tmp)["tiny-dense"]
        proc, url = _server(binary, model, args.ctx, args.parallel)
        hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.hogs)]
        for hog in hogs:
            hog.start()
        rows = []
        try:
            target = selfcheck.Target(url=url, spec=SelfCheckSpec(measure_s=args.measure_s), state_dir=Path(tmp),
                                      parallel=args.parallel, profile="hog-bench")
            for i in range(args.runs):
                r = selfcheck.run(target)
                rows.append({"run": i + 1, "verdict": r.verdict, "tok_s": round(r.throughput_tps, 1),
                             "ci": [round(r.ci_low or 0, 1), round(r.ci_high or 0, 1)], "ratio": r.ratio,
                             "windows": r.windows, "errors": r.errors, "client_bound": r.client_bound,
                             "s": round(r.duration_s, 1)})
                if not args.json:
                    row = rows[-1]
                    ratio = f"{r.ratio:.2f}" if r.ratio is not None else "  - "
                    print(f"{row['run']:>3} {r.verdict:<8} {row['tok_s']:>8} tok/s  CI {row['ci'][0]:>7}-"
                          f"{row['ci'][1]:<7} ratio {ratio}  windows {r.windows:>2}  errors {r.errors}  "
                          f"client_bound {r.client_bound}  {row['s']} s", flush=True)
        finally:
            for hog in hogs:
                hog.kill()
            proc.terminate()
            proc.wait(10)
    counts = Counter(row["verdict"] for row in rows)
    ok = counts["fail"] == 0 and counts["degraded"] <= 1
    summary = {"runs": len(rows), "hogs": args.hogs, "cpus": os.cpu_count(), "ctx": args.ctx,
               "parallel": args.parallel, "verdicts": dict(counts), "meets_bar": ok, "rows": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"verdicts: {dict(counts)}; bar (no fail, <= 1 degraded in {len(rows)}): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
