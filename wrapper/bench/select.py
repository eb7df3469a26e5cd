"""Pure decisions of a sweep: confidence intervals, SLO checks, the best config, successive halving.

No I/O here, so every rule is tested on synthetic numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from wrapper.bench.spec import Slo
from wrapper.tuning.records import CellResult, mean_ci


def ci_tight(values: Sequence[float], rel: float, min_reps: int) -> bool:
    """Enough repetitions and a 95% CI half-width within `rel` of the mean."""
    if len(values) < max(2, min_reps):
        return False
    mean, lo, hi = mean_ci(values)
    return lo is not None and hi is not None and mean > 0 and (hi - lo) / 2 <= rel * mean


def slo_violation(r: CellResult, slo: Slo) -> str | None:
    if r.status != "ok":
        return r.reason or r.status
    if r.ttft_p95_ms is None or r.ttft_p95_ms > slo.ttft_p95_ms:
        return f"p95 TTFT {_ms(r.ttft_p95_ms)} > {slo.ttft_p95_ms:g} ms"
    if slo.min_decode_tps > 0 and (r.decode_tps is None or r.decode_tps < slo.min_decode_tps):
        rate = "n/a" if r.decode_tps is None else f"{r.decode_tps:.1f}"
        return f"per-stream decode {rate} tok/s < {slo.min_decode_tps:g}"
    return None


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


@dataclass(frozen=True)
class Selection:
    best: CellResult | None
    reason: str  # why this one, in words
    baseline: CellResult | None = None  # llama-server defaults at the best cell's client point
    gain: float | None = None  # best / baseline - 1
    tied: tuple[str, ...] = ()  # cells statistically tied with the fastest
    rejected: dict[str, str] = field(default_factory=dict)  # cell -> why it could not win


def select(results: Sequence[CellResult], slo: Slo) -> Selection:
    """Highest throughput meeting the SLO; overlapping CIs count as a tie, and a tie goes to the cheaper config."""
    rejected = {r.cell_key: why for r in results if (why := slo_violation(r, slo)) is not None}
    eligible = [r for r in results if r.cell_key not in rejected]
    if not eligible:
        measured = [r for r in results if r.status == "ok"]
        fastest = max(measured, key=lambda r: r.throughput_tps, default=None)
        detail = f"; fastest was {fastest.cell_key}: {rejected[fastest.cell_key]}" if fastest else ""
        return Selection(None, f"no cell met the SLO (p95 TTFT <= {slo.ttft_p95_ms:g} ms, per-stream decode >= "
                         f"{slo.min_decode_tps:g} tok/s){detail}", rejected=rejected)
    fastest = max(eligible, key=lambda r: r.throughput_tps)
    lo = fastest.ci[0]
    tied = [r for r in eligible if r is fastest or _overlaps(r, lo)]
    best = min(tied, key=lambda r: (r.cost, -r.throughput_tps))
    if best is fastest:
        reason = f"highest throughput meeting the SLO ({best.throughput_tps:.1f} tok/s)"
    else:
        reason = (f"statistically tied with the fastest ({fastest.cell_key}, {fastest.throughput_tps:.1f} tok/s; "
                  f"95% CIs overlap) and cheaper")
    base = next((r for r in results if r.baseline and r.client_key == best.client_key and r.status == "ok"), None)
    gain = best.throughput_tps / base.throughput_tps - 1 if base and base.throughput_tps > 0 else None
    return Selection(best, reason, base, gain, tuple(r.cell_key for r in tied), rejected)


def _overlaps(r: CellResult, fastest_lo: float | None) -> bool:
    hi = r.ci[1]
    return fastest_lo is not None and hi is not None and hi >= fastest_lo


def rank_key(r: CellResult, slo: Slo) -> tuple[int, float]:
    """Order for successive halving: cells that meet the SLO first, then by throughput."""
    return (0 if slo_violation(r, slo) is None else 1, -r.throughput_tps)


def survivors(results: Sequence[CellResult], keep: int, slo: Slo) -> list[CellResult]:
    """The `keep` best measured cells of a rung (failed cells never go on)."""
    alive = [r for r in results if r.status in ("ok", "errors") and not r.baseline]
    return sorted(alive, key=lambda r: rank_key(r, slo))[:max(1, keep)]


def halving_rungs(n: int, eta: int) -> list[int]:
    """How many cells each rung keeps: n, n/eta, n/eta^2, ... down to at most eta finalists."""
    rungs = [n]
    while rungs[-1] > eta:
        rungs.append(max(1, math.ceil(rungs[-1] / eta)))
    return rungs
