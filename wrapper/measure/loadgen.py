"""Deterministic streaming load generator and its metrics (used by the self-check and bench-profile).

Token counts come from the server's own `usage`/`timings` (llama-server sends them in the final stream
chunk), never from re-tokenizing on the client. Open-loop latencies are counted from the *intended*
send time, so a slow server cannot hide its queueing (no coordinated omission).

Metric definitions (after the inference-optimisation-lab seed):
- TTFT: from the (intended) send to the first chunk carrying non-empty text.
- per-stream decode tok/s: (completion_tokens - 1) / (last token time - first token time).
- throughput: all output tokens / the measured window (first send to last response end).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import httpx

CORPUS_VERSION = 1
# Shipped inside the package so a non-editable install (the container image) has it too.
CORPUS_PATH = Path(__file__).resolve().parent / "data" / f"prompts-v{CORPUS_VERSION}.jsonl"
# Frozen: scripts/make_prompt_corpus.py --check regenerates the file and must match this digest.
CORPUS_SHA256 = "3fab88abf0b59d44a942ea4666853d6d71f40899f591098853fcaf4e92b38fcc"
# The client lagged the server when both hold: the median request spent more than this share of its
# client-side time outside the server's own prompt + decode time, ...
CLIENT_OVERHEAD_LIMIT = 0.10
# ... and the client's event loop woke this late (p95) when it should have been reading the streams. The
# old test (client and server per-stream decode rates more than 5% apart) blamed the client whenever a busy
# host delayed the server's own HTTP threads (issue 12); a late event loop is the client's own witness.
LOOP_LAG_LIMIT_MS = 5.0
LAG_TICK_S = 0.01

Endpoint = Literal["chat", "completion", "embedding", "rerank"]
# Embedding and rerank servers generate nothing: they are measured in items (inputs embedded, documents scored).
ITEM_ENDPOINTS: tuple[Endpoint, ...] = ("embedding", "rerank")


@dataclass(frozen=True)
class Prompt:
    id: str
    words: int
    text: str


@cache
def corpus(path: Path = CORPUS_PATH, sha256: str = CORPUS_SHA256) -> tuple[Prompt, ...]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"prompt corpus {path}: sha256 {digest} != frozen {sha256}; regenerate or bump the version")
    return tuple(Prompt(**json.loads(line)) for line in data.splitlines() if line.strip())


def select(n: int, seed: int, prompt_words: int, prompts: Sequence[Prompt] | None = None) -> list[Prompt]:
    """n prompts of the corpus length closest to prompt_words, in an order fixed by seed."""
    pool = list(prompts if prompts is not None else corpus())
    lengths = sorted({p.words for p in pool})
    target = min(lengths, key=lambda w: (abs(w - prompt_words), w))
    bucket = [p for p in pool if p.words == target]
    rng = random.Random(seed)
    return [bucket[rng.randrange(len(bucket))] for _ in range(n)]


@dataclass(frozen=True)
class LoadSpec:
    url: str  # llama-server base URL, e.g. http://127.0.0.1:8080
    endpoint: Endpoint = "chat"
    requests: int = 8
    concurrency: int = 1  # closed loop: this many requests in flight
    rate: float | None = None  # open loop: Poisson arrivals per second (concurrency is then ignored)
    max_tokens: int = 64
    prompt_words: int = 128
    seed: int = 0
    cache_prompt: bool = False
    timeout_s: float = 120.0
    api_key: str | None = field(default=None, repr=False)
    batch: int = 4  # embedding/rerank: items (inputs, documents) per request


@dataclass
class RequestResult:
    index: int
    prompt_id: str
    intended: float  # monotonic seconds; the send time the schedule asked for
    sent: float = 0.0
    first: float | None = None  # first non-empty token
    last: float | None = None  # last non-empty token
    end: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    server_decode_tps: float | None = None  # timings.predicted_per_second
    server_prompt_tps: float | None = None
    items: int = 0  # embedding/rerank: inputs embedded or documents scored
    streamed: int = 0  # chunks with text so far (llama-server streams one token each): progress before usage
    server_ms: float | None = None  # timings.prompt_ms + predicted_ms: the server's own time on it
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.intended) * 1000

    @property
    def e2e_ms(self) -> float:
        return (self.end - self.intended) * 1000

    @property
    def client_decode_tps(self) -> float | None:
        if self.first is None or self.last is None or self.completion_tokens < 2 or self.last <= self.first:
            return None
        return (self.completion_tokens - 1) / (self.last - self.first)

    @property
    def client_overhead(self) -> float | None:
        """The share of this request's client-side time (send to end) the server did not spend on it."""
        span = self.end - self.sent
        if self.server_ms is None or span <= 0:
            return None
        return max(0.0, span - self.server_ms / 1000) / span


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    errors: int
    error_rate: float
    window_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    throughput_tps: float  # output tokens / window
    request_rate: float
    items: int  # embedding/rerank: inputs embedded or documents scored
    items_per_s: float
    ttft_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    client_decode_tps: float | None  # mean per-stream
    server_decode_tps: float | None  # mean per-stream, from timings.predicted_per_second
    client_server_gap: float | None  # |client - server| / server
    client_bound: bool
    error_samples: list[str]
    client_overhead: float | None = None  # median share of a request's client time outside the server
    loop_lag_ms_p95: float | None = None  # how late the client's event loop woke (None: not measured)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}


def summarize(results: Sequence[RequestResult], loop_lag_ms: Sequence[float] | None = None) -> Summary:
    """loop_lag_ms: the client event loop's wake-up delays during the run (LoadLag.samples_ms); without
    them the client counts as lagging on the overhead test alone."""
    ok = [r for r in results if r.ok]
    window = (max(r.end for r in results) - min(r.intended for r in results)) if results else 0.0
    completion = sum(r.completion_tokens for r in ok)
    client = [v for r in ok if (v := r.client_decode_tps) is not None]
    server = [r.server_decode_tps for r in ok if r.server_decode_tps]
    client_mean, server_mean = _mean(client), _mean(server)
    gap = abs(client_mean - server_mean) / server_mean if client_mean and server_mean else None
    errors = [r.error for r in results if r.error]
    overhead = percentile([v for r in ok if (v := r.client_overhead) is not None], 50)
    lag = percentile(loop_lag_ms, 95) if loop_lag_ms else None
    lagged = overhead is not None and overhead > CLIENT_OVERHEAD_LIMIT and (lag is None or lag > LOOP_LAG_LIMIT_MS)
    return Summary(
        requests=len(results),
        ok=len(ok),
        errors=len(errors),
        error_rate=len(errors) / len(results) if results else 0.0,
        window_s=window,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        completion_tokens=completion,
        cached_tokens=sum(r.cached_tokens for r in ok),
        throughput_tps=completion / window if window > 0 else 0.0,
        request_rate=len(ok) / window if window > 0 else 0.0,
        items=sum(r.items for r in ok),
        items_per_s=sum(r.items for r in ok) / window if window > 0 else 0.0,
        ttft_ms=_pcts([t for r in ok if (t := r.ttft_ms) is not None]),
        e2e_ms=_pcts([r.e2e_ms for r in ok]),
        itl_ms=_pcts([g for r in ok for g in r.gaps_ms]),
        client_decode_tps=client_mean,
        server_decode_tps=server_mean,
        client_server_gap=gap,
        client_bound=lagged,
        error_samples=sorted(set(errors))[:5],
        client_overhead=overhead,
        loop_lag_ms_p95=lag,
    )


def _body(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    # ignore_eos + a fixed token budget make every request produce exactly max_tokens tokens.
    common: dict[str, Any] = {"stream": True, "cache_prompt": spec.cache_prompt, "ignore_eos": True,
                              "seed": spec.seed, "temperature": 0.0}
    if spec.endpoint == "chat":
        return {**common, "messages": [{"role": "user", "content": prompt.text}], "max_tokens": spec.max_tokens,
                "stream_options": {"include_usage": True}}
    return {**common, "prompt": prompt.text, "n_predict": spec.max_tokens}


def _text_of(chunk: dict[str, Any]) -> str:
    if "choices" in chunk:
        choices = chunk["choices"]
        if not choices:
            return ""
        delta = choices[0].get("delta") or {}
        return str(delta.get("content") or delta.get("reasoning_content") or "")
    return str(chunk.get("content") or "")


def _take_usage(result: RequestResult, chunk: dict[str, Any]) -> None:
    usage = chunk.get("usage")
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens", 0))
        result.completion_tokens = int(usage.get("completion_tokens", 0))
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens", 0))
    timings = chunk.get("timings")
    if timings:
        # /completion has no `usage`; its timings say the same: prompt_n is the uncached part.
        if not usage:
            result.prompt_tokens = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
            result.completion_tokens = int(timings.get("predicted_n", 0))
            result.cached_tokens = int(timings.get("cache_n", 0))
        result.server_decode_tps = timings.get("predicted_per_second")
        result.server_prompt_tps = timings.get("prompt_per_second")
        with contextlib.suppress(TypeError, ValueError, KeyError):
            result.server_ms = float(timings.get("prompt_ms", 0.0)) + float(timings["predicted_ms"])


async def _one(client: httpx.AsyncClient, spec: LoadSpec, result: RequestResult, prompt: Prompt,
               retry: bool = True) -> None:
    path = "/v1/chat/completions" if spec.endpoint == "chat" else "/completion"
    clock = time.perf_counter
    result.sent = clock()
    try:
        async with client.stream("POST", path, json=_body(spec, prompt)) as response:
            if response.status_code != 200:
                body = (await response.aread())[:200].decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    # Read on to the end of the body: leaving early would discard the keep-alive connection.
                    continue
                now = clock()
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"stream error: {str(chunk['error'])[:200]}"
                    return
                if _text_of(chunk):
                    result.streamed += 1
                    if result.last is not None:
                        result.gaps_ms.append((now - result.last) * 1000)
                    if result.first is None:
                        result.first = now
                    result.last = now
                if "timings" in chunk or "usage" in chunk:
                    _take_usage(result, chunk)
        if result.first is None:
            result.error = "stream ended without a token"
        elif result.completion_tokens == 0:
            result.error = "stream ended without usage/timings"
    except httpx.RemoteProtocolError as exc:
        # llama-server (cpp-httplib) may close a pooled keep-alive connection just as a request is sent on it;
        # that request got no response at all, so nothing ran and sending it once more is safe.
        if retry and result.first is None and "without sending a response" in str(exc):
            await _one(client, spec, result, prompt, retry=False)
            return
        result.error = f"{type(exc).__name__}: {str(exc)[:200] or 'no detail'}"
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200] or 'no detail'}"
    finally:
        result.end = clock()


def _items_body(spec: LoadSpec, prompt: Prompt) -> tuple[str, dict[str, Any], int]:
    """(path, body, items) of one embedding or rerank request: the prompt cut into `batch` texts."""
    words = prompt.text.split()
    step = max(1, len(words) // spec.batch)
    texts = [" ".join(words[i * step:(i + 1) * step]) or prompt.text for i in range(spec.batch)]
    if spec.endpoint == "embedding":
        return "/v1/embeddings", {"input": texts}, len(texts)
    return "/v1/rerank", {"query": texts[0], "documents": texts}, len(texts)


async def _one_items(client: httpx.AsyncClient, spec: LoadSpec, result: RequestResult, prompt: Prompt) -> None:
    """One embedding or rerank request: no stream, so no TTFT; the answer must hold one result per item."""
    path, body, items = _items_body(spec, prompt)
    clock = time.perf_counter
    result.sent = clock()
    try:
        response = await client.post(path, json=body)
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return
        data = response.json()
        got = len(data.get("data") or data.get("results") or [])
        if got != items:
            result.error = f"{path} answered {got} results for {items} items"
            return
        result.items = items
        result.prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200] or 'no detail'}"
    finally:
        result.end = clock()


@cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verification context, built once: httpx builds (and loads the CA bundle into) a new
    one for every client, ~50 ms of CPU, and a sweep makes a client for every measured run (1.3 s of a 13 s
    adaptive search went there, plus a gap before every run)."""
    return httpx.create_ssl_context()


def _client(spec: LoadSpec, connections: int | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=spec.url.rstrip("/"), headers=headers, limits=limits, verify=tls_context(),
                             timeout=httpx.Timeout(spec.timeout_s, connect=min(spec.timeout_s, 10.0)))


async def run_async(spec: LoadSpec, into: list[RequestResult] | None = None) -> list[RequestResult]:
    """Run the load; `into` gets each request's result as it is sent, so a caller that cancels the run (a
    timeout) still sees what arrived on the requests in flight."""
    prompts = select(spec.requests, spec.seed, spec.prompt_words)
    send = _one_items if spec.endpoint in ITEM_ENDPOINTS else _one
    open_loop = spec.rate is not None
    async with _client(spec, None if open_loop else spec.concurrency) as client:
        start = time.perf_counter()
        if spec.rate is not None:
            rng = random.Random(spec.seed)
            offsets, t = [], 0.0
            for _ in prompts:
                offsets.append(t)
                t += rng.expovariate(spec.rate)
            pairs = enumerate(zip(prompts, offsets, strict=True))
            results = [RequestResult(i, p.id, start + off) for i, (p, off) in pairs]

            async def fire(r: RequestResult, p: Prompt) -> None:
                await asyncio.sleep(max(0.0, r.intended - time.perf_counter()))
                if into is not None:
                    into.append(r)
                await send(client, spec, r, p)

            await asyncio.gather(*(fire(r, p) for r, p in zip(results, prompts, strict=True)))
            return results
        results = []
        queue = list(enumerate(prompts))
        queue.reverse()

        async def worker() -> None:
            while queue:
                i, p = queue.pop()
                # Closed loop: the request is intended the moment a worker is free.
                r = RequestResult(i, p.id, time.perf_counter())
                results.append(r)
                if into is not None:
                    into.append(r)
                await send(client, spec, r, p)

        await asyncio.gather(*(worker() for _ in range(max(1, spec.concurrency))))
        results.sort(key=lambda r: r.index)
        return results


class LoopLag:
    """Samples how late this event loop wakes from a short sleep while a load runs: a client too busy to
    read its streams shows here first (async with LoopLag() as lag: ...; lag.samples_ms)."""

    def __init__(self) -> None:
        self.samples_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self.samples_ms.append(max(0.0, (time.perf_counter() - start - LAG_TICK_S) * 1000))

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def run(spec: LoadSpec) -> list[RequestResult]:
    """Run the load in a fresh event loop (safe to call from any thread without a running loop)."""
    return asyncio.run(run_async(spec))
