"""Adaptive search, second step: the screen's shortlist raced side by side.

The finalists' servers all run at once and take turns in rounds (an idle llama-server uses no CPU). Every
round runs each finalist once, all with the same prompts, in an order rotated each round, so a neighbour's
burst or a slow drift hits every finalist alike instead of whichever config happened to be measured during
it (successive halving ranked its first rung by exactly that: 57-74% of the grid best on a busy host), and
each config starts once for the whole race instead of once per rung. A round runs each finalist for as
many requests as a grid repetition (spec.race_requests), so the race ranks cells in the steady state the
grid measures: rounds of one wave rated parallel=1 cells well above their grid figures. After
`adaptive.rounds` rounds the two leaders race on alone for `adaptive.final_rounds`: the top configs are often
a few percent apart, within the noise of three rounds, and that is the choice the extra rounds decide.

Offloading finalists are not raced side by side on a GPU host (each would size itself to the memory the others
left); a stop during the race keeps the screen's rows and drops the rounds, which compare only as a whole, so
`--resume` runs the race again from its first round.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from wrapper.bench import fit, measuring
from wrapper.bench.select import race_leaders, race_order
from wrapper.bench.servers import ServerGroup
from wrapper.bench.spec import Cell, ServerConfig, effective, race_requests, swept_dims
from wrapper.measure import loadgen
from wrapper.tuning.records import CellResult

if TYPE_CHECKING:
    from wrapper.bench.sweep import Sweep

log = logging.getLogger("wrapper.bench")


def run(sw: Sweep, finalists: Sequence[Cell], rung: int) -> list[CellResult] | None:
    """One row per finalist, its repetitions being its race rounds; None when the finalists' servers do not
    all start side by side (too little memory for them at once): the caller then measures them one at a
    time."""
    by_server: dict[ServerConfig, list[Cell]] = {}
    for c in finalists:
        by_server.setdefault(c.server, []).append(c)
    if (why := _shares_a_gpu(sw, list(by_server))) is not None:
        log.info("adaptive: racing the finalists one at a time: %s", why)
        return None
    with contextlib.ExitStack() as stack:
        groups: dict[ServerConfig, ServerGroup] = {}
        for i, server in enumerate(by_server):
            sw.stop.check()
            log_dir = sw.out_dir / "logs" / f"race-r{rung}-{i:02d}-{measuring.slug(server.key)}"
            group = stack.enter_context(measuring.servers(sw, server, log_dir))
            if group.failure is not None:
                log.warning("adaptive: the %d finalist configs do not run side by side (%s: %s); measuring them "
                            "one at a time", len(by_server), server.key, group.failure)
                return None
            groups[server] = group
        for server, group in groups.items():
            measuring.warm_up(sw, group.urls, by_server[server], fit.served(group.urls[0]).slots)
        rows = _rounds(sw, finalists, groups)
    for row in rows:
        row.rung = rung
    return rows


def _shares_a_gpu(sw: Sweep, servers: Sequence[ServerConfig]) -> str | None:
    """Why the finalists must not run side by side, or None. Offloading servers started together each size
    themselves to the GPU memory the ones before left (`--fit`, n_gpu_layers: auto), so the first started
    would get every layer and win the race for it; on unified memory (Jetson) they share the one pool."""
    from wrapper.plan import hardware

    swept = swept_dims(sw.spec)
    if all(effective(server, sw.profile_values, swept).get("n_gpu_layers") == 0 for server in servers):
        return None
    host = hardware.for_settings(sw.settings)
    if host.gpus or hardware.tegra_gpu() is not None:
        return "they offload to a GPU, and side by side each would get only the memory the others left"
    return None


def _rounds(sw: Sweep, finalists: Sequence[Cell], groups: dict[ServerConfig, ServerGroup]) -> list[CellResult]:
    a = sw.spec.adaptive
    reps: dict[str, list[float]] = {c.key: [] for c in finalists}
    requests: dict[str, list[loadgen.RequestResult]] = {c.key: [] for c in finalists}
    spent = dict.fromkeys(reps, 0.0)
    out: dict[str, CellResult] = {}
    leaders: list[str] | None = None
    for index in range(a.rounds + a.final_rounds):
        alive = [c for c in finalists if c.key not in out]
        if index >= a.rounds:  # the final rounds: the two leaders alone
            leaders = leaders or race_leaders({c.key: reps[c.key] for c in alive})
            alive = [c for c in alive if c.key in leaders]
            if len(alive) < 2:
                break
        for c in (alive[i] for i in race_order(len(alive), index)):
            sw.stop.check()
            group = groups[c.server]
            if (dead := group.dead()) is not None:
                out[c.key] = measuring.failed(sw, c, group.argv, dead)
                continue
            started = time.monotonic()
            results = measuring.rep(sw, c, group, race_requests(sw.spec, c.client.concurrency), index)
            spent[c.key] += time.monotonic() - started
            requests[c.key] += results
            summary = loadgen.summarize(results)
            reps[c.key].append(summary.throughput_tps)
            if summary.errors:  # the row says why; a config that drops requests is out of the race
                out[c.key] = measuring.result(sw, c, group, reps[c.key], all_results=requests[c.key],
                                             duration_s=spent[c.key])
    for c in finalists:
        if c.key not in out:
            out[c.key] = measuring.result(sw, c, groups[c.server], reps[c.key], all_results=requests[c.key],
                                             duration_s=spent[c.key])
    log.info("adaptive race: %s", "; ".join(f"{c.key} {out[c.key].throughput_tps:.1f} tok/s" for c in finalists))
    return [out[c.key] for c in finalists]

