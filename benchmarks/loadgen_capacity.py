"""How much load the generator itself can drive, and how much it adds to TTFT.

A fake llama-server (raw asyncio HTTP/1.1, keep-alive, chunked SSE) answers every request instantly
with N token chunks and the final `usage`/`timings` chunk, so everything measured is the client's cost.

    # the fake server alone (also used by tests/test_loadgen.py):
    python benchmarks/loadgen_capacity.py serve --port 18080 [--delay-ms 100 --serial]
    # the capacity run: server on core 1, generator pinned to core 0
    python benchmarks/loadgen_capacity.py run --server-cpu 1 --client-cpu 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _sse(obj: object) -> bytes:
    data = f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                  lock: asyncio.Lock | None) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            n = int(body.get("max_tokens") or body.get("n_predict") or 16)
            chat = b"/chat/" in head.split(b"\r\n", 1)[0]
            if lock is not None:  # --serial: one request at a time, like a single-slot server
                async with lock:
                    await asyncio.sleep(delay)
                    await _stream(writer, n, chat)
            else:
                if delay:
                    await asyncio.sleep(delay)
                await _stream(writer, n, chat)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _stream(writer: asyncio.StreamWriter, n: int, chat: bool) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(n):
        piece = {"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]} if chat else {"content": f" t{i}"}
        writer.write(_sse(piece))
        await writer.drain()
    timings = {"prompt_n": 10, "cache_n": 0, "predicted_n": n, "predicted_per_second": 1e6}
    final: dict[str, object] = {"timings": timings}
    if chat:
        final.update(choices=[], usage={"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n,
                                        "prompt_tokens_details": {"cached_tokens": 0}})
    else:
        final.update(content="", stop=True)
    writer.write(_sse(final) + (_sse_done() if chat else b"") + b"0\r\n\r\n")
    await writer.drain()


def _sse_done() -> bytes:
    data = b"data: [DONE]\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def serve(port: int, delay_ms: float = 0.0, serial: bool = False) -> None:
    lock = asyncio.Lock() if serial else None
    server = await asyncio.start_server(lambda r, w: _handle(r, w, delay_ms / 1000, lock), "127.0.0.1", port)
    print(f"fake llama-server on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def _client(port: int, concurrency: int, requests: int, tokens: int) -> dict[str, float]:
    from wrapper.measure import loadgen

    spec = loadgen.LoadSpec(url=f"http://127.0.0.1:{port}", requests=requests, concurrency=concurrency,
                            max_tokens=tokens, prompt_words=16)
    start = time.perf_counter()
    summary = loadgen.summarize(loadgen.run(spec))
    wall = time.perf_counter() - start
    assert summary.errors == 0, summary.error_samples
    return {"concurrency": concurrency, "tokens": tokens, "requests": requests, "wall_s": round(wall, 3),
            "req_per_s": round(requests / wall, 1), "tok_per_s": round(summary.completion_tokens / wall),
            "ttft_p50_ms": round(summary.ttft_ms["p50"] or 0, 3), "ttft_p99_ms": round(summary.ttft_ms["p99"] or 0, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--delay-ms", type=float, default=0.0)
    s.add_argument("--serial", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--server-cpu", type=int)
    r.add_argument("--client-cpu", type=int)
    r.add_argument("--requests", type=int, default=2000)
    c = sub.add_parser("client")  # one measurement, run pinned by `run`
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--requests", type=int, default=500)
    c.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.cmd == "serve":
        asyncio.run(serve(args.port, args.delay_ms, args.serial))
        return 0
    if args.cmd == "client":
        print(json.dumps(_client(args.port, args.concurrency, args.requests, args.tokens)))
        return 0
    port = _free_port()
    server = subprocess.Popen([*_pin(args.server_cpu), sys.executable, __file__, "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()
        # (concurrency, tokens): TTFT overhead at concurrency 1, then sustained rates under load.
        for concurrency, tokens in ((1, 1), (1, 64), (8, 64), (32, 64), (32, 256)):
            out = subprocess.run([*_pin(args.client_cpu), sys.executable, __file__, "client", "--port", str(port),
                                  "--concurrency", str(concurrency), "--requests", str(args.requests),
                                  "--tokens", str(tokens)], capture_output=True, text=True, check=True)
            print(out.stdout.strip(), flush=True)
    finally:
        server.terminate()
        server.wait()
    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
