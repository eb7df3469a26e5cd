"""The on-start self-check: a warm-up, then a short fixed load at concurrency = the parallel slots.

The measured output throughput is compared with what this profile + model + hardware + load shape did
before. Until the bench store exists, "before" is the last passing self-check, kept in
`<state>/selfcheck/expected.json`; a degraded or failed run never replaces the baseline, so a slowly
degrading machine cannot drag its own expectation down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapper.errors import ServerFailed
from wrapper.events.payloads import SelfCheckFigures, Unit, Verdict
from wrapper.profiles.schema import SelfCheckSpec

if TYPE_CHECKING:
    # Imported where used: `wrapper serve` loads this module at start, and a start must stay quick; the
    # load generator is needed only once llama-server is ready.
    from wrapper.measure import loadgen

log = logging.getLogger("wrapper.selfcheck")


@dataclass(frozen=True)
class Target:
    """What the self-check measures and what it files the baseline under (built by the caller from its
    launch, so the key carries the same fingerprint and model hash as the tuning store)."""

    url: str
    spec: SelfCheckSpec
    state_dir: Path
    api_key: str | None = None
    task: str = "chat"
    parallel: int | None = None
    profile: str = "-"
    sha256: str | None = None
    fingerprint: str = "unknown"


class SelfCheckResult(SelfCheckFigures):
    key: str
    exit_requested: bool = False  # verdict fail and selfcheck.on_fail == "exit": the supervisor should stop
    finished_at: datetime


def judge(throughput: float, expected: float | None, errors: int, requests: int,
          spec: SelfCheckSpec) -> tuple[Verdict, float | None, str]:
    """Pure verdict: pass / degraded / fail, the ratio and the reason in words."""
    if requests in (0, errors) or throughput <= 0:
        return "fail", None, f"{errors}/{requests} requests failed; nothing measured"
    if expected is None or expected <= 0:
        verdict: Verdict = "degraded" if errors else "pass"
        return verdict, None, "no expected figures yet: this run becomes the baseline" + (
            f"; {errors}/{requests} requests failed" if errors else "")
    ratio = throughput / expected
    if ratio < spec.fail_ratio:
        return "fail", ratio, f"{ratio:.2f} of expected, below fail_ratio {spec.fail_ratio}"
    if ratio < spec.degraded_ratio:
        return "degraded", ratio, f"{ratio:.2f} of expected, below degraded_ratio {spec.degraded_ratio}"
    if errors:
        return "degraded", ratio, f"{errors}/{requests} requests failed"
    return "pass", ratio, f"{ratio:.2f} of expected"


def _store_path(state_dir: Path) -> Path:
    return state_dir / "selfcheck" / "expected.json"


def _load_store(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_baseline(path: Path, key: str, result: SelfCheckResult) -> None:
    store = _load_store(path)
    store[key] = {"throughput_tps": result.throughput_tps, "at": result.finished_at.isoformat()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(store, indent=2, sort_keys=True))
    tmp.replace(path)


def _server_facts(url: str, api_key: str | None) -> tuple[int | None, str]:
    """(slots, model identity) from llama-server's /props and /v1/models."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, timeout=5.0, headers=headers) as client:
            props = client.get("/props").json()
            models = client.get("/v1/models").json().get("data") or [{}]
    except (httpx.HTTPError, ValueError) as exc:
        raise ServerFailed(f"selfcheck: llama-server at {url} is not answering ({type(exc).__name__}: {exc})",
                           hint="check the URL and that the server is ready (GET /health)") from None
    meta = models[0].get("meta") or {}
    identity = f"{models[0].get('id', '?')}:size={meta.get('size', '?')}:params={meta.get('n_params', '?')}"
    slots = props.get("total_slots")
    return (int(slots) if slots else None), identity


# The endpoint each kind of profile is measured on (vision profiles are chat models: the chat path).
_ENDPOINTS: dict[str, loadgen.Endpoint] = {"completion": "completion", "embedding": "embedding", "rerank": "rerank"}


class Cancelled(Exception):
    """The self-check was stopped on purpose (the server is being stopped): not a verdict."""


class Run:
    """One self-check in flight on its own event loop; `cancel()` from any thread ends its requests at once
    so that a stopping llama-server only drains its clients' requests, not ours."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[list[loadgen.RequestResult]] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._loop is not None and self._task is not None:
                loop, task = self._loop, self._task
                with contextlib.suppress(RuntimeError):  # the loop already finished
                    loop.call_soon_threadsafe(task.cancel)

    def measure(self, load: loadgen.LoadSpec, warmup: int, timeout_s: float) -> list[loadgen.RequestResult]:
        async def main() -> list[loadgen.RequestResult]:
            with self._lock:
                if self.cancelled:
                    raise Cancelled
                self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            return await asyncio.wait_for(_measure(load, warmup), timeout_s)

        try:
            return asyncio.run(main())
        except asyncio.CancelledError:
            raise Cancelled from None
        finally:
            with self._lock:
                self._loop = self._task = None


def run(target: Target, expected: float | None = None, *, concurrency: int | None = None,
        requests: int | None = None, save: bool = True, expected_source: str | None = None,
        handle: Run | None = None) -> SelfCheckResult:
    """Measure the server at target.url and judge it. Raises ServerFailed when the server does not answer
    and Cancelled when `handle.cancel()` was called."""
    from wrapper.measure import loadgen

    spec = target.spec
    url = target.url.rstrip("/")
    slots, identity = _server_facts(url, target.api_key)
    concurrency = concurrency or spec.concurrency or target.parallel or slots or 1
    requests = requests or spec.requests or 2 * concurrency
    endpoint = _ENDPOINTS.get(target.task, "chat")
    items = endpoint in loadgen.ITEM_ENDPOINTS
    load = loadgen.LoadSpec(url=url, endpoint=endpoint, requests=requests, concurrency=concurrency,
                            max_tokens=spec.max_tokens, prompt_words=spec.prompt_tokens, timeout_s=spec.timeout_s,
                            api_key=target.api_key)
    key = (f"{target.profile}|{target.sha256 or identity}|{target.fingerprint}|c{concurrency}|n{spec.max_tokens}"
           f"|p{spec.prompt_tokens}|{load.endpoint}")

    log.info("selfcheck: %d requests at concurrency %d (%s)", requests, concurrency,
             f"{endpoint}, {load.batch} items each" if items else f"{spec.max_tokens} output tokens each")
    started = time.monotonic()
    handle = handle or Run()
    try:
        results = handle.measure(load, spec.warmup_requests, spec.timeout_s)
    except TimeoutError:
        results = []
        log.warning("selfcheck: did not finish within %.0fs (selfcheck.timeout_s)", spec.timeout_s)
    summary = loadgen.summarize(results)
    unit: Unit = "items/s" if items else "tok/s"
    throughput = summary.items_per_s if items else summary.throughput_tps

    source = (expected_source or "given") if expected is not None else None
    store = _store_path(target.state_dir)
    if expected is None:
        previous = _load_store(store).get(key)
        if previous:
            expected, source = float(previous["throughput_tps"]), f"last self-check {previous['at']}"
    verdict, ratio, reason = judge(throughput, expected, summary.errors, len(results) or requests, spec)
    if not results:
        reason = f"timed out after {spec.timeout_s:.0f}s"
    result = SelfCheckResult(
        verdict=verdict, ratio=ratio, throughput_tps=throughput, unit=unit, expected_tps=expected,
        expected_source=source, key=key, concurrency=concurrency, requests=summary.requests or requests,
        errors=summary.errors if results else requests, prompt_tokens=summary.prompt_tokens,
        completion_tokens=summary.completion_tokens, ttft_p50_ms=summary.ttft_ms["p50"],
        ttft_p95_ms=summary.ttft_ms["p95"], client_decode_tps=summary.client_decode_tps,
        server_decode_tps=summary.server_decode_tps, client_bound=summary.client_bound,
        duration_s=time.monotonic() - started, reason=reason,
        exit_requested=verdict == "fail" and spec.on_fail == "exit", finished_at=datetime.now(UTC))
    if save and verdict == "pass" and not result.errors:
        _save_baseline(store, key, result)
    level = logging.INFO if verdict == "pass" else logging.WARNING
    log.log(level, "selfcheck: %s, %.1f %s at concurrency %d (%s)%s", verdict, result.throughput_tps, unit,
            concurrency, reason, "; the client was the bottleneck" if result.client_bound else "")
    if summary.error_samples:
        log.warning("selfcheck: errors: %s", "; ".join(summary.error_samples))
    return result


async def _measure(load: loadgen.LoadSpec, warmup: int) -> list[loadgen.RequestResult]:
    from wrapper.measure import loadgen

    if warmup:
        await loadgen.run_async(replace(load, requests=warmup, concurrency=1, seed=load.seed + 1))
    return await loadgen.run_async(load)
