"""Does the sweep's candidate really beat llama-server's defaults here? A paired, interleaved comparison.

The defaults (D) and the candidate (L) run alternately at the candidate's load, D L D L D ..., so a
neighbour's burst or a slow drift hits both sides of each pair; each L run is compared with the D runs on
either side of it, on the log scale (see select.paired_ratio). Both servers run side by side and take
turns (an idle llama-server uses no CPU); when the two do not fit at once, each run starts its own server.
Pairs are added until the ratio's 95% CI clears 1 (win) or falls below it (the defaults win), up to
`confirm.max_pairs` and `confirm.budget_s`; then the verdict is "inconclusive" and nothing is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from wrapper.bench import load
from wrapper.bench.select import paired_decision, paired_ratio
from wrapper.bench.servers import ServerGroup
from wrapper.bench.spec import Cell, ServerConfig, swept_dims
from wrapper.measure import loadgen

if TYPE_CHECKING:
    from wrapper.bench.sweep import Sweep

log = logging.getLogger("wrapper.bench")

Kind = Literal["win", "defaults", "inconclusive", "unchecked"]
ADVICE = ("more requests per run (--requests), a longer comparison (spec confirm.budget_s, "
          "confirm.max_pairs), or a quieter host (nothing else busy on these cores)")


@dataclass(frozen=True)
class Verdict:
    kind: Kind  # win: store it; unchecked: stored without a comparison (--no-baseline); else nothing stored
    reason: str
    ratio: float | None = None  # candidate / defaults throughput (geometric mean of the pairs)
    low: float | None = None  # its 95% CI
    high: float | None = None
    pairs: int = 0
    leader_reps: tuple[float, ...] = ()
    defaults_reps: tuple[float, ...] = ()
    advice: str = ""
    duration_s: float = 0.0

    @property
    def stores(self) -> bool:
        return self.kind in ("win", "unchecked")

    @property
    def gain(self) -> float | None:
        return None if self.ratio is None else self.ratio - 1

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.kind, "reason": self.reason, "advice": self.advice, "pairs": self.pairs,
                "gain": self.gain, "gain_low": None if self.low is None else self.low - 1,
                "gain_high": None if self.high is None else self.high - 1, "leader_reps": list(self.leader_reps),
                "defaults_reps": list(self.defaults_reps), "duration_s": round(self.duration_s, 2)}


class _RunFailed(Exception):
    pass


def compare(sw: Sweep, leader: Cell, base: Cell) -> Verdict:
    started = time.monotonic()
    try:
        with _group(sw, base.server, "confirm-defaults") as d, _group(sw, leader.server, "confirm-best") as b:
            failure = d.failure or b.failure
            if failure is None:
                for group, cell in ((d, base), (b, leader)):
                    _warm(sw, group, cell)
                return _pairs(sw, leader, lambda i: _run(sw, d, base, i), lambda i: _run(sw, b, leader, i),
                              started=started, how="side by side")
    except _RunFailed as exc:
        return _undecided(leader, f"a paired run failed ({exc})", started)
    log.warning("confirm: the defaults and %s do not run side by side (%s); one server at a time",
                leader.server.key, failure)
    try:
        return _pairs(sw, leader, lambda i: _fresh(sw, base, i), lambda i: _fresh(sw, leader, i),
                      started=started, how="one server at a time")
    except _RunFailed as exc:
        return _undecided(leader, f"a paired run failed ({exc})", started)


def _pairs(sw: Sweep, leader: Cell, defaults: Callable[[int], float], best: Callable[[int], float], *,
           started: float, how: str) -> Verdict:
    c = sw.spec.confirm
    d_reps, l_reps = [defaults(0)], list[float]()
    decision = None
    while decision is None:
        if len(l_reps) >= c.max_pairs or time.monotonic() - started >= c.budget_s:
            break
        l_reps.append(best(len(l_reps)))
        d_reps.append(defaults(len(d_reps)))
        decision = paired_decision(l_reps, d_reps, min_pairs=c.min_pairs, min_gain=c.min_gain)
    ratio, lo, hi, n = paired_ratio(l_reps, d_reps)
    figures = f"{_pct(ratio)} (95% CI {_pct(lo)} to {_pct(hi)}, {n} paired runs {how})"
    where = f"{leader.server.key} vs llama-server's defaults at {leader.client.key}"
    measured = Verdict("inconclusive", "", ratio=ratio, low=lo, high=hi, pairs=n, leader_reps=tuple(l_reps),
                       defaults_reps=tuple(d_reps), duration_s=time.monotonic() - started)
    if decision == "win":
        return replace(measured, kind="win", reason=f"{where}: {figures}")
    if decision == "defaults":
        return replace(measured, kind="defaults",
                       reason=f"{where}: {figures}: the defaults are faster; nothing stored, keep them")
    spent = f"{measured.duration_s:.0f} s"
    return replace(measured, advice=ADVICE, reason=f"{where}: {figures} in {spent}: the difference is within the "
                   "noise; nothing stored, applied or shared")


def _undecided(leader: Cell, why: str, started: float) -> Verdict:
    return Verdict("inconclusive", f"{leader.server.key} vs llama-server's defaults: {why}; nothing stored, "
                   "applied or shared", advice=ADVICE, duration_s=time.monotonic() - started)


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def _group(sw: Sweep, server: ServerConfig, tag: str) -> ServerGroup:
    values = server.settings_values(swept_dims(sw.spec))
    return ServerGroup(sw.settings, sw.caps, sw.model_file, values=values, origin=f"bench:{sw.meta.run_id}",
                       instances=server.instances, log_dir=sw.out_dir / "logs" / tag,
                       start_timeout_s=sw.spec.repeat.start_timeout_s,
                       stop_grace_s=sw.settings.profile.supervise.stop_grace_s, stop=sw.stop)


def _warm(sw: Sweep, group: ServerGroup, cell: Cell) -> None:
    n = sw.spec.repeat.warmup_requests
    if n:
        load.run(group.urls, cell.client, n * cell.client.concurrency, sw.spec.seed + 7919,
                 timeout_s=sw.spec.repeat.request_timeout_s, stop=sw.stop, max_tokens=4)


def _run(sw: Sweep, group: ServerGroup, cell: Cell, index: int) -> float:
    """One run's throughput; the same prompts for both sides of a pair (seeded by the pair's index)."""
    sw.stop.check()
    if (dead := group.dead()) is not None:
        raise _RunFailed(dead)
    requests = max(sw.spec.repeat.requests, cell.client.concurrency * 2)
    results = load.run(group.urls, cell.client, requests, sw.spec.seed + 4099 + index,
                       timeout_s=sw.spec.repeat.request_timeout_s, stop=sw.stop)
    summary = loadgen.summarize(results)
    if summary.errors:
        raise _RunFailed(f"{cell.server.key}: {summary.errors}/{summary.requests} requests failed: "
                         + "; ".join(summary.error_samples[:1]))
    return summary.throughput_tps


def _fresh(sw: Sweep, cell: Cell, index: int) -> float:
    with _group(sw, cell.server, f"confirm-{index}") as group:
        if group.failure is not None:
            raise _RunFailed(group.failure)
        _warm(sw, group, cell)
        return _run(sw, group, cell, index)
