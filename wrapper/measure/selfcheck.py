"""The on-start self-check: a warm-up, then repeated windows of a fixed load at concurrency = the slots.

The load is sized from the running server (wrapper.measure.sizing): prompts and output fit one slot, and
prompt lengths are counted in the server's tokens. Windows repeat until their throughputs agree or
`selfcheck.measure_s` has gone; the figure is their geometric mean with a 95% CI, and a verdict below
pass needs the whole CI under its threshold (issue 12: one short run on a busy host was called degraded).

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
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapper.events.payloads import SelfCheckFigures, Unit, Verdict
from wrapper.profiles.schema import SelfCheckSpec
from wrapper.tuning.records import t95

if TYPE_CHECKING:
    # Imported where used: `wrapper serve` loads this module at start, and a start must stay quick; the
    # load generator is needed only once llama-server is ready.
    from wrapper.measure import loadgen, sizing

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
    prompt_words: int | None = None  # repeat exactly this corpus bucket (a tuned cell's load), if it fits


class SelfCheckResult(SelfCheckFigures):
    key: str
    exit_requested: bool = False  # verdict fail and selfcheck.on_fail == "exit": the supervisor should stop
    finished_at: datetime


def judge(throughput: float, expected: float | None, errors: int, requests: int,
          spec: SelfCheckSpec, *, ci_high: float | None = None) -> tuple[Verdict, float | None, str]:
    """Pure verdict: pass / degraded / fail, the ratio and the reason in words. With `ci_high` (the upper
    95% bound of the measured throughput) a verdict below pass needs the whole interval under its
    threshold: one noisy window on a busy host is not a slow server."""
    if requests in (0, errors) or throughput <= 0:
        return "fail", None, f"{errors}/{requests} requests failed; nothing measured"
    if expected is None or expected <= 0:
        verdict: Verdict = "degraded" if errors else "pass"
        return verdict, None, "no expected figures yet: this run becomes the baseline" + (
            f"; {errors}/{requests} requests failed" if errors else "")
    ratio = throughput / expected
    best = max(ratio, ci_high / expected) if ci_high is not None else ratio
    upto = f" (at most {best:.2f} at 95%)" if ci_high is not None else ""
    if best < spec.fail_ratio:
        return "fail", ratio, f"{ratio:.2f} of expected{upto}, below fail_ratio {spec.fail_ratio}"
    if best < spec.degraded_ratio:
        return "degraded", ratio, f"{ratio:.2f} of expected{upto}, below degraded_ratio {spec.degraded_ratio}"
    if errors:
        return "degraded", ratio, f"{errors}/{requests} requests failed"
    if ratio < spec.degraded_ratio:
        return "pass", ratio, f"{ratio:.2f} of expected, within the noise (up to {best:.2f} at 95%)"
    return "pass", ratio, f"{ratio:.2f} of expected"


def clearly_below(result: SelfCheckFigures, low: float) -> bool:
    """The measured throughput is below `low` beyond its own noise: its whole 95% interval is under it."""
    high = result.ci_high if result.ci_high is not None else result.throughput_tps
    return high < low


def window_stats(rates: list[float]) -> tuple[float, float | None, float | None]:
    """Geometric mean of the windows' throughputs and its 95% CI, on the log scale so a noisy run never gets a
    negative lower bound; (mean, None, None) with fewer than two positive windows."""
    positive = [r for r in rates if r > 0]
    if not positive:
        return 0.0, None, None
    logs = [math.log(r) for r in positive]
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), None, None
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


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

    def measure(self, load: loadgen.LoadSpec, warmup: int, measure_s: float, timeout_s: float) -> Windows:
        """Warm up, then measured windows (see Windows.settled); on timeout the windows done so far."""
        windows = Windows()

        async def main() -> None:
            with self._lock:
                if self.cancelled:
                    raise Cancelled
                self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_measure(load, warmup, measure_s, windows), timeout_s)
            if not windows.finished:
                windows.timed_out = True

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            raise Cancelled from None
        finally:
            with self._lock:
                self._loop = self._task = None
        return windows


# Stop early once this many windows agree to within REL_HALF_WIDTH (95% CI half-width / mean).
MIN_WINDOWS = 4
REL_HALF_WIDTH = 0.03
WINDOW_SHARE = 0.125  # a window's target length as a share of selfcheck.measure_s


@dataclass
class Windows:
    """Repeated closed-loop windows of the same load: each gives one throughput; their spread is the noise."""

    results: list[loadgen.RequestResult] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    finished: bool = False
    timed_out: bool = False
    # The requests of the load in flight (each added as it is sent): what a timeout leaves behind.
    phase: list[loadgen.RequestResult] = field(default_factory=list)
    warming_up: bool = False

    async def run_async(self, load: loadgen.LoadSpec) -> list[loadgen.RequestResult]:
        """One run of `load`, its requests kept in `phase` while it runs."""
        from wrapper.measure import loadgen

        self.phase = []
        return await loadgen.run_async(load, into=self.phase)

    def settled(self, elapsed_s: float, budget_s: float) -> bool:
        if elapsed_s >= budget_s and len(self.rates) >= 2:
            return True
        mean, low, high = window_stats(self.rates)
        return (len(self.rates) >= MIN_WINDOWS and low is not None and high is not None
                and (high - low) / 2 <= REL_HALF_WIDTH * mean)


def _rate(load: loadgen.LoadSpec, summary: loadgen.Summary) -> float:
    """A window's figure: output tokens per second, or items per second for embedding and rerank."""
    from wrapper.measure import loadgen

    return summary.items_per_s if load.endpoint in loadgen.ITEM_ENDPOINTS else summary.throughput_tps


async def _measure(load: loadgen.LoadSpec, warmup: int, measure_s: float, out: Windows) -> None:
    from wrapper.measure import loadgen

    if warmup:
        # Every slot in use once before measuring: first-use allocations and cold caches stay out of it.
        out.warming_up = True
        await out.run_async(replace(load, requests=warmup * load.concurrency, seed=load.seed + 7919))
        out.warming_up = False
    started = time.monotonic()
    async with loadgen.LoopLag() as lag:
        out.lag_ms = lag.samples_ms
        # A first window times the load; later windows are sized to about WINDOW_SHARE of the budget, so a
        # fast server is not judged on many tiny windows dominated by their ramp-down tails. The sizing
        # window is not counted: its tail share differs from the rest.
        first = await out.run_async(replace(load, seed=load.seed + 104729))
        took = max(1e-3, time.monotonic() - started)
        per_window = round(load.requests * WINDOW_SHARE * measure_s / took / load.concurrency) * load.concurrency
        load = replace(load, requests=max(load.requests, per_window))
        out.results += first  # its requests and tokens are reported; its throughput only when it is alone
        if not any(r.ok for r in first) or took >= measure_s / 2:
            out.rates.append(_rate(load, loadgen.summarize(first)))
            if not any(r.ok for r in first) or took >= measure_s:
                out.finished = True
                return
        started = time.monotonic()
        while True:
            results = await out.run_async(replace(load, seed=load.seed + len(out.rates)))
            out.results += results
            summary = loadgen.summarize(results)
            out.rates.append(_rate(load, summary))
            if summary.ok == 0 or out.settled(time.monotonic() - started, measure_s):
                break  # nothing answered: more windows would only repeat the errors
    out.finished = True


def run(target: Target, expected: float | None = None, *, concurrency: int | None = None,
        requests: int | None = None, save: bool = True, expected_source: str | None = None,
        handle: Run | None = None) -> SelfCheckResult:
    """Measure the server at target.url and judge it. Raises ServerFailed when the server does not answer
    and Cancelled when `handle.cancel()` was called."""
    from wrapper.measure import loadgen, sizing

    spec = target.spec
    url = target.url.rstrip("/")
    started = time.monotonic()
    facts = sizing.server_facts(url, target.api_key)
    concurrency = concurrency or spec.concurrency or target.parallel or facts.slots or 1
    requests = requests or spec.requests or 2 * concurrency
    endpoint = _ENDPOINTS.get(target.task, "chat")
    items = endpoint in loadgen.ITEM_ENDPOINTS
    try:
        # Sized to the slot only where something is generated: embedding/rerank inputs keep their own sizing.
        sized = sizing.Sizing(spec.prompt_tokens, 0, spec.max_tokens, counted=False) if items else sizing.size(
            url, target.api_key, endpoint, facts.slot_ctx, prompt_tokens=spec.prompt_tokens,
            max_tokens=spec.max_tokens, prompt_words=target.prompt_words)
    except sizing.DoesNotFit as exc:
        return _unfit(target, facts, concurrency, str(exc), started)
    if sized.note:
        log.warning("selfcheck: %s", sized.note)
        if expected is not None and target.prompt_words is not None:
            # The tuned cell's load cannot be repeated here, so its figure says nothing about this run.
            log.warning("selfcheck: not comparing with %s: the load differs from the one it measured",
                        expected_source or "the given figure")
            expected = None
    load = loadgen.LoadSpec(url=url, endpoint=endpoint, requests=requests, concurrency=concurrency,
                            max_tokens=sized.max_tokens, prompt_words=sized.prompt_words, timeout_s=spec.timeout_s,
                            api_key=target.api_key)
    key = (f"{target.profile}|{target.sha256 or facts.identity}|{target.fingerprint}|c{concurrency}"
           f"|n{sized.max_tokens}|w{sized.prompt_words}|{load.endpoint}")

    shape = (f"{endpoint}, {load.batch} items each" if items else f"{sized.prompt_tokens}-token prompts, "
             f"{sized.max_tokens} output tokens; {facts.slot_ctx or '?'}-token slots")
    log.info("selfcheck: windows of %d requests at concurrency %d for up to %.0fs (%s)", requests, concurrency,
             spec.measure_s, shape)
    handle = handle or Run()
    windows = handle.measure(load, spec.warmup_requests, spec.measure_s, spec.timeout_s)
    unit: Unit = "items/s" if items else "tok/s"
    throughput, ci_low, ci_high = window_stats(windows.rates)
    part = None if windows.rates else partial(load, windows)
    results = part.finished if part is not None else windows.results
    summary = loadgen.summarize(results, windows.lag_ms)
    if part is not None:
        throughput = part.rate

    source = (expected_source or "given") if expected is not None else None
    store = _store_path(target.state_dir)
    if expected is None:
        previous = _load_store(store).get(key)
        if previous:
            expected, source = float(previous["throughput_tps"]), f"last self-check {previous['at']}"
    if part is not None:
        verdict, ratio, reason = judge_partial(part, expected, spec, items=items)
    else:
        verdict, ratio, reason = judge(throughput, expected, summary.errors, len(results) or requests, spec,
                                       ci_high=ci_high)
        if windows.timed_out:
            reason += f"; cut short at {spec.timeout_s:g}s (selfcheck.timeout_s)"
    result = SelfCheckResult(
        verdict=verdict, ratio=ratio, throughput_tps=throughput, unit=unit, expected_tps=expected,
        expected_source=source, key=key, concurrency=concurrency,
        requests=part.sent if part is not None else summary.requests or requests, errors=summary.errors,
        prompt_tokens=summary.prompt_tokens, ttft_p50_ms=summary.ttft_ms["p50"],
        completion_tokens=part.units if part is not None and not items else summary.completion_tokens,
        ttft_p95_ms=summary.ttft_ms["p95"], client_decode_tps=summary.client_decode_tps,
        server_decode_tps=summary.server_decode_tps, client_bound=summary.client_bound,
        duration_s=time.monotonic() - started, reason=reason, windows=len(windows.rates), ci_low=ci_low,
        ci_high=ci_high, slot_ctx=facts.slot_ctx, prompt_words=sized.prompt_words, max_tokens=sized.max_tokens,
        exit_requested=verdict == "fail" and spec.on_fail == "exit", finished_at=datetime.now(UTC))
    if save and verdict == "pass" and not result.errors and part is None:  # a partial figure is no baseline
        _save_baseline(store, key, result)
    level = logging.INFO if verdict == "pass" else logging.WARNING
    sure = f", 95% CI {ci_low:.1f}-{ci_high:.1f}" if ci_low is not None and ci_high is not None else ""
    log.log(level, "selfcheck: %s, %.1f %s at concurrency %d (%d windows%s; %s)%s", verdict, throughput, unit,
            concurrency, len(windows.rates), sure, reason,
            f"; the client was the bottleneck (median {summary.client_overhead or 0:.0%} of a request's time outside "
            f"the server, event loop late by {summary.loop_lag_ms_p95 or 0:.1f} ms p95)" if result.client_bound else "")
    if summary.error_samples:
        log.warning("selfcheck: errors: %s", "; ".join(summary.error_samples))
    return result


@dataclass(frozen=True)
class Partial:
    """What arrived before selfcheck.timeout_s when no window finished."""

    rate: float  # units / span_s: tokens streamed (items answered) per second, low confidence
    units: int
    span_s: float
    sent: int
    finished: list[loadgen.RequestResult]  # answered or failed; the rest were still running


def partial(load: loadgen.LoadSpec, windows: Windows) -> Partial:
    """The figure a timed-out check can still give: everything that arrived since the measured load began (or
    the warm-up, when it never got that far), in-flight requests' streamed tokens included. It runs low (the
    ramp-up and cut-off requests are in it), which is why it never makes a `fail`."""
    from wrapper.measure import loadgen

    pool = list({id(r): r for r in (windows.phase if windows.warming_up else [*windows.results, *windows.phase])
                 }.values())
    sent = [r for r in pool if r.sent]
    items = load.endpoint in loadgen.ITEM_ENDPOINTS
    units = sum(r.items if items else (r.completion_tokens or r.streamed) for r in sent if r.error is None)
    span = (max(r.end for r in sent) - min(r.intended for r in sent)) if sent else 0.0
    finished = [r for r in sent if r.error or r.completion_tokens or r.items]
    return Partial(units / span if span > 0 else 0.0, units, span, len(sent), finished)


def judge_partial(part: Partial, expected: float | None, spec: SelfCheckSpec, *,
                  items: bool = False) -> tuple[Verdict, float | None, str]:
    """A check with no finished window: `fail` only when nothing arrived at all (a healthy but busy server
    made progress, and calling that a fail was a false alarm); else the partial figure, `degraded` at most."""
    errors = sum(1 for r in part.finished if r.error)
    what = f"no window finished within selfcheck.timeout_s ({spec.timeout_s:g}s)"
    if part.units <= 0:
        failed = f"; {errors} of {part.sent} requests failed" if errors else ""
        return "fail", None, f"{what} and nothing arrived ({part.sent} requests sent){failed}"
    unfinished = part.sent - len(part.finished)
    basis = (f"{what}: a partial figure from {part.units} {'items' if items else 'tokens'} in {part.span_s:.1f}s "
             f"({unfinished} of {part.sent} requests unfinished), low confidence")
    if expected is None or expected <= 0:
        if errors:
            return "degraded", None, f"{basis}; {errors}/{part.sent} requests failed"
        return "pass", None, f"{basis}; no expected figure to compare with (not kept as the baseline)"
    ratio = part.rate / expected
    if ratio < spec.fail_ratio:
        return "degraded", ratio, (f"{basis}; {ratio:.2f} of expected, below fail_ratio {spec.fail_ratio} "
                                   "(a partial figure is never a fail)")
    if errors:
        return "degraded", ratio, f"{basis}; {errors}/{part.sent} requests failed"
    return "pass", ratio, f"{basis}; {ratio:.2f} of expected"


def _unfit(target: Target, facts: sizing.ServerFacts, concurrency: int, why: str, started: float) -> SelfCheckResult:
    reason = f"nothing sent: {why}; raise llamacpp.ctx_size or lower llamacpp.parallel"
    log.warning("selfcheck: fail (%s)", reason)
    return SelfCheckResult(
        verdict="fail", ratio=None, throughput_tps=0.0, key="-", concurrency=concurrency, requests=0, errors=0,
        prompt_tokens=0, completion_tokens=0, duration_s=time.monotonic() - started, reason=reason,
        slot_ctx=facts.slot_ctx, exit_requested=target.spec.on_fail == "exit", finished_at=datetime.now(UTC))
