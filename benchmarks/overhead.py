"""Supervision overhead: `wrapper serve` vs the same llama-server command run by hand.

Measures, on a tiny model written on the fly (or --model PATH):
  * time from process start to llama-server's /health = 200, bare vs under `wrapper serve` (median of N), the
    latter with and without PYTHONDONTWRITEBYTECODE (common in containers: with it nothing caches bytecode, so
    only what was compiled at install is reused), each warm (the default from the second start with the same
    inputs on: llama-server spawned from the last start's command, wrapper.warm) and cold (WRAPPER_WARM_START=0,
    as a first start), interleaved so a noisy neighbour hits every variant
  * the wrapper's own RSS once llama-server is ready (the child is not counted)
  * the wrapper's CPU use while llama-server sits idle and ready (default supervise settings)

    LLAMA_SERVER_BIN=... .venv/bin/python benchmarks/overhead.py [--runs 5] [--idle-s 30] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wrapper.model import tiny_models  # noqa: E402
from wrapper.profiles.schema import SuperviseSpec  # noqa: E402
from wrapper.supervisor.machine import Supervisor  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> float:
    start = time.monotonic()
    with httpx.Client(trust_env=False) as client:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited {proc.returncode} before ready")
            try:
                if client.get(url, timeout=1.0).status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def supervised_ready(argv: list[str], env: dict[str, str], health: str) -> float:
    """The supervisor alone (no CLI start-up, no prepare): start -> llama-server answers 200."""
    import threading

    sup = Supervisor(argv, env, SuperviseSpec(), health.removesuffix("/health"))
    t0 = time.monotonic()
    thread = threading.Thread(target=sup.run)
    thread.start()
    with httpx.Client(trust_env=False) as client:
        while True:
            try:
                if client.get(health, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    took = time.monotonic() - t0
    sup.request_stop()
    thread.join(20)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--model", type=Path, help="GGUF to load (default: the tiny dense test model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-mmap", action="store_true",
                        help="read the whole model at load (--load-mode none), as a GPU upload does, instead of "
                        "mapping it from the page cache")
    parser.add_argument(
        "--layers",
        type=int,
        default=0,
        help="write a bigger random model: this many layers of n_embd 1024 (0: the tiny test model)",
    )
    opts = parser.parse_args()
    logging.getLogger("wrapper").addHandler(logging.NullHandler())  # the in-process supervisor stays quiet
    logging.getLogger("wrapper").propagate = False

    work = Path(tempfile.mkdtemp(prefix="wrapper-overhead-"))
    if opts.model:
        model = opts.model
    elif opts.layers:
        model = work / f"random-{opts.layers}l.gguf"
        spec = tiny_models.TinySpec(n_layer=opts.layers, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2816)
        tiny_models.write(model, spec)
    else:
        model = tiny_models.ensure(work)["tiny-dense"]
    port, status_port = free_port(), free_port()
    profile = {
        "llamacpp": {
            "model_path": str(model),
            "host": "127.0.0.1",
            "port": port,
            "ctx_size": 512,
            "parallel": 1,
            "threads": opts.threads,
            **({"mmap": False} if opts.no_mmap else {}),
        },
        "selfcheck": {"enabled": False},
    }
    registry = work / "profiles.yaml"
    registry.write_text(yaml.safe_dump({"profiles": {"bench": profile}}))
    # PYTHONDONTWRITEBYTECODE is its own variant below: the inherited one (CI images set it) is dropped here.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLAMACPP_", "LLM_", "WRAPPER_")) and k != "PYTHONDONTWRITEBYTECODE"}
    # As an install does (scripts/bootstrap.sh, the image): the package's bytecode is compiled before any start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "wrapper")], check=True)
    env.update(
        WRAPPER_STATE_DIR=str(work / "state"), WRAPPER_STATUS_PORT=str(status_port), WRAPPER_STATUS_HOST="127.0.0.1"
    )
    wrapper = [sys.executable, "-m", "wrapper"]
    flags = json.loads(
        subprocess.run(
            [*wrapper, "flags", "--json", "--profile", "bench", "--config", str(registry)],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    bare_argv = flags["argv"]
    health = f"http://127.0.0.1:{port}/health"

    bare: list[float] = []
    wrapped: list[float] = []
    wrapped_nobc: list[float] = []
    cold: list[float] = []
    cold_nobc: list[float] = []
    supervised: list[float] = []
    serve_argv = [*wrapper, "serve", "--profile", "bench", "--config", str(registry)]
    nobc_env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
    cold_env, cold_nobc_env = {**env, "WRAPPER_WARM_START": "0"}, {**nobc_env, "WRAPPER_WARM_START": "0"}
    # One start of each warm variant first: it records the command the measured starts then spawn early.
    for run_env in (env, nobc_env):
        proc = subprocess.Popen(serve_argv, env=run_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_health(health, proc)
        time.sleep(0.5)  # the record is written once "ready" is seen
        stop(proc)
    for _ in range(opts.runs):
        supervised.append(supervised_ready(bare_argv, env, health))
        for argv, run_env, times in (
            (bare_argv, env, bare),
            (serve_argv, env, wrapped),
            (serve_argv, nobc_env, wrapped_nobc),
            (serve_argv, cold_env, cold),
            (serve_argv, cold_nobc_env, cold_nobc),
        ):
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, env=run_env, cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            times.append(wait_health(health, proc) - t0)
            stop(proc)

    # One more wrapped run, left idle: RSS of the wrapper alone and its CPU while nothing happens.
    proc = subprocess.Popen(
        [*wrapper, "serve", "--profile", "bench", "--config", str(registry)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_health(health, proc)
    me = psutil.Process(proc.pid)
    time.sleep(1.0)
    rss = me.memory_info().rss
    cpu0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
    time.sleep(opts.idle_s)
    cpu1, t1 = sum(me.cpu_times()[:2]), time.monotonic()
    stop(proc)

    bare_med, wrapped_med = statistics.median(bare), statistics.median(wrapped)
    result = {
        "model": str(model),
        "model_bytes": model.stat().st_size,
        "runs": opts.runs,
        "bare_ready_s_median": round(bare_med, 3),
        "wrapped_ready_s_median": round(wrapped_med, 3),
        "ready_ratio": round(wrapped_med / bare_med, 2),
        "added_s": round(wrapped_med - bare_med, 3),
        "wrapped_nobytecode_ready_s_median": round(statistics.median(wrapped_nobc), 3),
        "added_nobytecode_s": round(statistics.median(wrapped_nobc) - bare_med, 3),
        "wrapped_nobytecode_ready_s": [round(x, 3) for x in wrapped_nobc],
        "cold_added_s": round(statistics.median(cold) - bare_med, 3),
        "cold_added_nobytecode_s": round(statistics.median(cold_nobc) - bare_med, 3),
        "cold_ready_s": [round(x, 3) for x in cold],
        "cold_nobytecode_ready_s": [round(x, 3) for x in cold_nobc],
        "supervisor_only_ready_s_median": round(statistics.median(supervised), 3),
        "supervisor_only_ratio": round(statistics.median(supervised) / bare_med, 2),
        "bare_ready_s": [round(x, 3) for x in bare],
        "wrapped_ready_s": [round(x, 3) for x in wrapped],
        "supervisor_only_ready_s": [round(x, 3) for x in supervised],
        "wrapper_rss_mib": round(rss / 2**20, 1),
        "wrapper_idle_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
        "idle_s": opts.idle_s,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
