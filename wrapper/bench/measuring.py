"""Measuring one cell on servers that are already up: a warm-up, repetitions of its client load, and the
row that goes to the store. Grid cells, the adaptive screen and the adaptive race all measure through here,
so a figure means the same in each."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wrapper.bench import load
from wrapper.bench.select import ci_tight
from wrapper.bench.servers import ServerGroup
from wrapper.bench.spec import Cell, ServerConfig, effective, grid_requests, screen_requests, swept_dims
from wrapper.measure import loadgen
from wrapper.tuning.records import CellResult
from wrapper.tuning.store import append_jsonl

if TYPE_CHECKING:
    from wrapper.bench.sweep import Sweep

log = logging.getLogger("wrapper.bench")


def servers(sw: Sweep, server: ServerConfig, log_dir: Path) -> ServerGroup:
    """The servers of one config, not started yet (a `with` block starts them and always stops them)."""
    return ServerGroup(sw.settings, sw.caps, sw.model_file, values=server.settings_values(swept_dims(sw.spec)),
                       origin=f"bench:{sw.meta.run_id}", instances=server.instances, log_dir=log_dir,
                       start_timeout_s=sw.spec.repeat.start_timeout_s,
                       stop_grace_s=sw.settings.profile.supervise.stop_grace_s, stop=sw.stop)


def base_result(sw: Sweep, cell: Cell, argv: list[str], status: str, reason: str | None) -> CellResult:
    merged = effective(cell.server, sw.profile_values, swept_dims(sw.spec))
    c = cell.client
    client = {"concurrency": c.concurrency, "prompt_words": c.prompt_words, "max_tokens": c.max_tokens, "rate": c.rate}
    return CellResult(cell.key, cell.server.key, cell.server.as_dict if not cell.server.baseline else {}, client,
                      status, reason, baseline=cell.server.baseline, cost=cell.server.cost(merged), argv=argv)


def failed(sw: Sweep, cell: Cell, argv: list[str], reason: str) -> CellResult:
    log.warning("cell %s failed: %s", cell.key, reason)
    return base_result(sw, cell, argv, "failed", reason)


def warm_up(sw: Sweep, urls: Sequence[str], group: Sequence[Cell], slots: int | None = None) -> None:
    """`repeat.warmup_requests` requests per stream of the widest load; with `slots` (the servers' slot
    count, each) no more streams than the servers have slots: one request in each slot warms it, the rest
    only queue (the adaptive screen and race, where a warm-up per config start is a large share of the
    time; the grid keeps its own)."""
    n = sw.spec.repeat.warmup_requests
    if n:
        widest = max(group, key=lambda c: c.client.concurrency).client
        streams = warmup_streams(widest.concurrency, slots, len(urls))
        load.run(urls, dataclasses.replace(widest, concurrency=streams), n * streams, sw.spec.seed + 7919,
                 timeout_s=sw.spec.repeat.request_timeout_s, stop=sw.stop, max_tokens=4)


def warmup_streams(concurrency: int, slots: int | None, instances: int) -> int:
    """Warm-up streams: the load's, capped at the slots of all instances when their count is known."""
    return concurrency if slots is None else max(1, min(concurrency, slots * max(1, instances)))


def rep(sw: Sweep, cell: Cell, servers: ServerGroup, requests: int, index: int) -> list[loadgen.RequestResult]:
    """One repetition: `requests` requests (at least one per stream), the prompts seeded by `index`, so the
    cells of one race round all get the same prompts."""
    requests = max(requests, cell.client.concurrency)
    results = load.run(servers.urls, cell.client, requests, sw.spec.seed + index,
                       timeout_s=sw.spec.repeat.request_timeout_s, stop=sw.stop)
    if load.transient(results) and servers.dead() is None:
        # A keep-alive connection the server dropped before answering is not the config's fault
        # (seen intermittently right after start); the repetition is run again once.
        log.warning("cell %s: connection dropped by a live server; repeating the repetition", cell.key)
        results = load.run(servers.urls, cell.client, requests, sw.spec.seed + index,
                           timeout_s=sw.spec.repeat.request_timeout_s, stop=sw.stop)
    _raw(sw, cell, index, results)
    return results


def measure(sw: Sweep, cell: Cell, servers: ServerGroup, *, screen: bool = False) -> CellResult:
    """`screen`: one run of whole waves (the adaptive screen); otherwise grid repetitions until the CI is
    tight or repeat.max_reps."""
    spec = sw.spec.repeat
    per_rep = (screen_requests(sw.spec.adaptive, cell.client.concurrency) if screen
               else grid_requests(spec, cell.client.concurrency))
    reps: list[float] = []
    all_results: list[loadgen.RequestResult] = []
    started = time.monotonic()
    while True:
        results = rep(sw, cell, servers, per_rep, len(reps))
        summary = loadgen.summarize(results)
        all_results.extend(results)
        reps.append(summary.throughput_tps)
        if summary.errors or screen or len(reps) >= spec.max_reps or ci_tight(reps, spec.ci_rel, spec.min_reps):
            break
    return result(sw, cell, servers, reps, all_results=all_results, duration_s=time.monotonic() - started)


def result(sw: Sweep, cell: Cell, servers: ServerGroup, reps: list[float], *,
           all_results: Sequence[loadgen.RequestResult], duration_s: float) -> CellResult:
    """The row of a measured cell: one throughput per repetition, the latency figures over all requests."""
    out = base_result(sw, cell, servers.argv, "ok", None)
    out.reps = reps
    out.rss_mb = load.rss_mb(servers)
    _fill_metrics(out, all_results)
    out.duration_s = duration_s
    if out.errors:
        dead = servers.dead()
        out.status = "failed" if dead else "errors"
        out.reason = dead or f"{out.errors}/{out.requests} requests failed: " + \
            "; ".join(loadgen.summarize(all_results).error_samples[:2])
    return out


def _fill_metrics(r: CellResult, results: Sequence[loadgen.RequestResult]) -> None:
    ok = [x for x in results if x.ok]
    ttft = [t for x in ok if (t := x.ttft_ms) is not None]
    e2e = [x.e2e_ms for x in ok]
    decode = [v for x in ok if (v := x.client_decode_tps) is not None]
    r.requests, r.errors = len(results), len(results) - len(ok)
    r.tokens = sum(x.completion_tokens for x in ok)
    r.prompt_tokens = sum(x.prompt_tokens for x in ok)
    r.ttft_p50_ms, r.ttft_p95_ms, r.ttft_p99_ms = (loadgen.percentile(ttft, q) for q in (50, 95, 99))
    r.latency_p50_ms, r.latency_p95_ms, r.latency_p99_ms = (loadgen.percentile(e2e, q) for q in (50, 95, 99))
    gaps = [g for x in ok for g in x.gaps_ms]
    r.itl_p50_ms, r.itl_p95_ms, r.itl_p99_ms = (loadgen.percentile(gaps, q) for q in (50, 95, 99))
    r.decode_tps = sum(decode) / len(decode) if decode else None


def _raw(sw: Sweep, cell: Cell, index: int, results: Sequence[loadgen.RequestResult]) -> None:
    append_jsonl(sw.out_dir / "requests.jsonl", (
        {"run_id": sw.meta.run_id, "cell": cell.key, "rep": index, "index": r.index, "prompt_id": r.prompt_id,
         "ttft_ms": r.ttft_ms, "e2e_ms": r.e2e_ms, "prompt_tokens": r.prompt_tokens,
         "completion_tokens": r.completion_tokens, "client_decode_tps": r.client_decode_tps,
         "server_decode_tps": r.server_decode_tps, "error": r.error} for r in results))


def slug(text: str) -> str:
    """A config's key as a folder name (server logs)."""
    return "".join(ch if ch.isalnum() or ch in "=-_" else "_" for ch in text)[:80]
