"""The on-start self-check: a warm-up, then a short fixed load at concurrency = the parallel slots.

The measured output throughput is compared with what this profile + model + hardware + load shape did
before. Until the bench store exists, "before" is the last passing self-check, kept in
`<state>/selfcheck/expected.json`; a degraded or failed run never replaces the baseline, so a slowly
degrading machine cannot drag its own expectation down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from wrapper.errors import ServerFailed
from wrapper.profiles.schema import SelfCheckSpec
from wrapper.settings import Environment

if TYPE_CHECKING:
    # Imported where used: `wrapper serve` loads this module at start, and a start must stay quick; the
    # load generator and the event models are needed only once llama-server is ready.
    from wrapper.events import payloads as events
    from wrapper.events.publisher import Publisher
    from wrapper.measure import loadgen

log = logging.getLogger("wrapper.selfcheck")

Verdict = Literal["pass", "degraded", "fail"]


class SelfCheckFigures(BaseModel):
    """What a self-check measured and concluded: the result's fields and the event's payload."""

    verdict: Verdict
    ratio: float | None  # measured / expected throughput; None when there was nothing to compare with
    throughput_tps: float
    expected_tps: float | None = None
    expected_source: str | None = None
    concurrency: int
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    client_decode_tps: float | None = None
    server_decode_tps: float | None = None
    client_bound: bool = False
    duration_s: float
    reason: str


class SelfCheckResult(SelfCheckFigures):
    key: str
    exit_requested: bool = False  # verdict fail and selfcheck.on_fail == "exit": the supervisor should stop
    finished_at: datetime

    def event(self, context: dict[str, Any]) -> events.SelfCheck:
        from wrapper.events import payloads as events

        fields = self.model_dump(exclude={"key", "exit_requested", "finished_at"})
        return events.SelfCheck(**context, **fields)


def judge(throughput: float, expected: float | None, errors: int, requests: int,
          spec: SelfCheckSpec) -> tuple[Verdict, float | None, str]:
    """Pure verdict: pass / degraded / fail, the ratio and the reason in words."""
    if requests in (0, errors) or throughput <= 0:
        return "fail", None, f"{errors}/{requests} requests failed; no tokens measured"
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


def _store_path(env: Environment) -> Path:
    return env.state_path() / "selfcheck" / "expected.json"


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


def _api_key(settings: Any) -> str | None:
    path = settings.server.api_key_file if settings is not None else None
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def run(url: str, settings: Any = None, expected: float | None = None, *, model: Any = None,
        concurrency: int | None = None, requests: int | None = None,
        publisher: Publisher | None = None, save: bool = True,
        expected_source: str | None = None) -> SelfCheckResult:
    """Measure the server at url and judge it. Raises ServerFailed when the server does not answer."""
    from wrapper.events import payloads as events
    from wrapper.measure import loadgen

    spec: SelfCheckSpec = settings.profile.selfcheck if settings is not None else SelfCheckSpec()
    env: Environment = settings.env if settings is not None else Environment.from_environ()
    url = url.rstrip("/")
    api_key = _api_key(settings)
    slots, identity = _server_facts(url, api_key)
    parallel = settings.server.parallel if settings is not None else None
    concurrency = concurrency or spec.concurrency or parallel or slots or 1
    requests = requests or spec.requests or 2 * concurrency
    task = settings.profile.task_type if settings is not None else "chat"
    load = loadgen.LoadSpec(url=url, endpoint="completion" if task == "completion" else "chat", requests=requests,
                            concurrency=concurrency, max_tokens=spec.max_tokens, prompt_words=spec.prompt_tokens,
                            timeout_s=spec.timeout_s, api_key=api_key)
    sha = getattr(model, "sha256", None) or (settings.server.sha256 if settings is not None else None)
    profile = settings.profile_name if settings is not None else "-"
    hardware = (events.hardware_summary(settings.cuda_visible_devices if settings is not None else None).fingerprint
                or "unknown")
    key = (f"{profile}|{sha or identity}|{hardware}|c{concurrency}|n{spec.max_tokens}"
           f"|p{spec.prompt_tokens}|{load.endpoint}")

    started = time.monotonic()
    try:
        results = asyncio.run(asyncio.wait_for(_measure(load, spec.warmup_requests), spec.timeout_s))
    except TimeoutError:
        results = []
        log.warning("selfcheck: did not finish within %.0fs (selfcheck.timeout_s)", spec.timeout_s)
    summary = loadgen.summarize(results)

    source = (expected_source or "given") if expected is not None else None
    store = _store_path(env)
    if expected is None:
        previous = _load_store(store).get(key)
        if previous:
            expected, source = float(previous["throughput_tps"]), f"last self-check {previous['at']}"
    verdict, ratio, reason = judge(summary.throughput_tps, expected, summary.errors, len(results) or requests, spec)
    if not results:
        reason = f"timed out after {spec.timeout_s:.0f}s"
    result = SelfCheckResult(
        verdict=verdict, ratio=ratio, throughput_tps=summary.throughput_tps, expected_tps=expected,
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
    log.log(level, "selfcheck: %s, %.1f tok/s at concurrency %d (%s)%s", verdict, result.throughput_tps,
            concurrency, reason, "; the client was the bottleneck" if result.client_bound else "")
    if summary.error_samples:
        log.warning("selfcheck: errors: %s", "; ".join(summary.error_samples))
    if publisher is not None:
        publisher.publish(events.SelfCheck.SUBJECT, result.event(publisher.context))
    return result


async def _measure(load: loadgen.LoadSpec, warmup: int) -> list[loadgen.RequestResult]:
    from wrapper.measure import loadgen

    if warmup:
        await loadgen.run_async(replace(load, requests=warmup, concurrency=1, seed=load.seed + 1))
    return await loadgen.run_async(load)


def record_receipt(settings: Any, model_file: Path, result: SelfCheckResult) -> None:
    """Measured decode speed beside the plan's ceiling for this hardware (calibrates later plans)."""
    from wrapper.plan import receipts

    measured = result.server_decode_tps or result.client_decode_tps
    if measured and result.verdict != "fail":
        receipts.record_measurement(settings, model_file, measured, kind="selfcheck")


def run_in_background(url: str, settings: Any, *, model: Any = None, publisher: Publisher | None = None,
                      on_done: Callable[[SelfCheckResult], None] | None = None,
                      expected: tuple[float, str] | None = None) -> threading.Thread:
    """Run after "ready" without holding up serving; errors are logged, never raised."""

    def target() -> None:
        try:
            result = run(url, settings, expected[0] if expected else None, model=model, publisher=publisher,
                         expected_source=expected[1] if expected else None)
        except Exception as exc:
            log.warning("selfcheck: could not run: %s", exc)
            return
        if on_done is not None:
            on_done(result)

    thread = threading.Thread(target=target, name="wrapper-selfcheck", daemon=True)
    thread.start()
    return thread


def after_ready(settings: Any, *, publisher: Publisher | None = None, status: Any = None,
                model: Any = None, on_fail_exit: Callable[[SelfCheckResult], None] | None = None,
                model_file: Path | None = None, expected: tuple[float, str] | None = None,
                ) -> Callable[[str, dict[str, Any]], None]:
    """A supervisor listener: after every "ready", run the self-check in the background when enabled.

    The result goes to `status.selfcheck` (for /status and /metrics), the log and NATS; `on_fail_exit` is
    called when the verdict is fail and the profile says `selfcheck.on_fail: exit`.
    """

    def done(result: SelfCheckResult) -> None:
        if status is not None:
            status.selfcheck = result.model_dump(mode="json")
        if model_file is not None:
            record_receipt(settings, model_file, result)
        if result.exit_requested and on_fail_exit is not None:
            on_fail_exit(result)

    def listener(event: str, info: dict[str, Any]) -> None:
        if event != "ready" or not settings.profile.selfcheck.enabled:
            return
        host = settings.server.host if settings.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        run_in_background(f"http://{host}:{settings.server.port}", settings, model=model, publisher=publisher,
                          on_done=done, expected=expected)

    return listener
