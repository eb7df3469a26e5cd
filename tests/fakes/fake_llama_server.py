#!/usr/bin/env python3
"""A stand-in for llama-server that stages one fault, chosen by FAKE_LLAMA_MODE.

It answers `--help`/`--version` like llama-server (so flag detection works), parses --host/--port, and
serves GET /health. Modes:
  ok                 serve 200 (after FAKE_LOAD_S seconds of 503 "loading")
  crash              print an error and exit 1 at once (a crash loop)
  crash_after_ready  serve, then exit 1 after FAKE_CRASH_AFTER_S seconds
  bad_flag           "error: invalid argument: --bogus", exit 1
  addr_in_use        llama-server's bind failure text, exit 1
  ignore_term        serve and ignore SIGTERM
  flood              serve while printing lines as fast as possible
  hang               print a line, then never listen and never print again (a stalled load)
  hang_inference     /health stays 200 but /slots never answers (the inference loop is stuck)
  busy_inference     like hang_inference, but burning CPU (a long prompt on a slow CPU): not hung
  no_slots           serve, with /slots answering 501 as with llama-server --no-slots
With FAKE_OOM_CTX=N set, any mode fails like llama.cpp out of memory for the KV cache when --ctx-size is
above N (or unset: the tiny models' training ctx 2048), asking for ctx x FAKE_KV_BYTES_PER_CELL bytes.
"""

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = """usage: llama-server [options]
-m,    --model FNAME          model path
--host HOST                   ip address to listen
--port PORT                   port to listen
-c,    --ctx-size N           size of the prompt context
-np,   --parallel N           number of parallel sequences
-t,    --threads N            number of threads
-b,    --batch-size N         logical maximum batch size
-fa,   --flash-attn [on|off|auto]  set Flash Attention use
--api-key-file FNAME          path to file containing API keys
-ctk,  --cache-type-k TYPE    KV cache data type for K
-ctv,  --cache-type-v TYPE    KV cache data type for V
"""

MODE = os.environ.get("FAKE_LLAMA_MODE", "ok")
LOAD_S = float(os.environ.get("FAKE_LOAD_S", "0"))
START = time.monotonic()


def arg(name, default):
    argv = sys.argv[1:]
    return argv[argv.index(name) + 1] if name in argv else default


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        loading = time.monotonic() - START < LOAD_S
        if self.path == "/slots" and not loading:
            if MODE in ("hang_inference", "busy_inference"):
                time.sleep(3600)  # like a task the stuck inference loop never picks up
            status, body = (501, b'{"error":"slots disabled"}') if MODE == "no_slots" else (200, b"[]")
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = b'{"error":"Loading model"}' if loading else b'{"status":"ok"}'
        self.send_response(503 if loading else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _burn():
    while True:
        sum(range(10000))


def serve():
    server = ThreadingHTTPServer((arg("--host", "127.0.0.1"), int(arg("--port", "8080"))), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("0.00.000.100 I srv  llama_server: listening", file=sys.stderr, flush=True)


def main():
    if "--help" in sys.argv:
        print(HELP)
        return 0
    if "--version" in sys.argv:
        print("version: 9999 (fake)", file=sys.stderr)
        return 0
    print(f"0.00.000.001 I fake llama-server mode={MODE} pid={os.getpid()}", file=sys.stderr, flush=True)
    if MODE == "crash":
        print("0.00.000.002 E ggml: GGML_ASSERT(fake) failed", file=sys.stderr, flush=True)
        return 1
    if MODE == "bad_flag":
        print("error: invalid argument: --bogus", file=sys.stderr, flush=True)
        return 1
    if MODE == "addr_in_use":
        print(
            "0.00.002.360 E srv  start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 1",
            file=sys.stderr,
            flush=True,
        )
        return 1
    oom_ctx = int(os.environ.get("FAKE_OOM_CTX", "0"))
    ctx = int(arg("--ctx-size", arg("-c", "0")))
    if oom_ctx and (ctx == 0 or ctx > oom_ctx):
        # llama.cpp's words when the KV cache does not fit (ggml CPU backend, then llama_context).
        size = (ctx or 2048) * int(os.environ.get("FAKE_KV_BYTES_PER_CELL", "65536"))
        print(f"0.00.100.000 E ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size {size}",
              file=sys.stderr, flush=True)
        print("0.00.100.001 E llama_init_from_model: failed to initialize the context: failed to allocate buffer "
              "for kv cache", file=sys.stderr, flush=True)
        return 1
    if MODE == "hang":
        time.sleep(3600)
        return 0
    if MODE == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve()
    if MODE == "crash_after_ready":
        time.sleep(float(os.environ.get("FAKE_CRASH_AFTER_S", "0.5")))
        print("0.00.000.003 E srv  fake crash after ready", file=sys.stderr, flush=True)
        os._exit(1)
    if MODE == "busy_inference":
        threading.Thread(target=_burn, daemon=True).start()
    if MODE == "flood":
        line = "0.00.000.004 I flood " + "x" * 200 + "\n"
        out = sys.stdout
        while True:
            out.write(line * 64)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
