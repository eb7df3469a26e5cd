"""Pure decisions of a sweep: confidence intervals, SLO checks, the best config, the adaptive shortlist.

No I/O here, so every rule is tested on synthetic numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from wrapper.bench.spec import Slo
from wrapper.tuning.records import CellResult, log_ci, ratio_ci


def ci_tight(values: Sequence[float], rel: float, min_reps: int) -> bool:
    """Enough repetitions and a 95% CI (log scale) whose half-width is within `rel` of the mean."""
    if len(values) < max(2, min_reps):
        return False
    lo, hi = log_ci(values)
    mean = statistics.fmean(values)
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
    best: CellResult | None  # the candidate: what the paired comparison with the defaults then confirms
    reason: str  # why this one, in words
    baseline: CellResult | None = None  # llama-server defaults at the best cell's client point
    gain: float | None = None  # best / baseline - 1, from the sweep's own (unpaired) cells
    tied: tuple[str, ...] = ()  # cells within the fastest one's CI
    rejected: dict[str, str] = field(default_factory=dict)  # cell -> why it could not win


# A config counts as cheaper only when its servers measurably use less memory, by at least this share.
CHEAPER_BY = 0.10


def select(results: Sequence[CellResult], slo: Slo, *, paired: bool = False) -> Selection:
    """The fastest config meeting the SLO that is above llama-server's defaults at its own load.

    A config within the fastest one's 95% CI wins instead only when it is measurably cheaper (resident
    memory at least CHEAPER_BY lower) and is itself above the defaults. The old rule ("the cheapest config
    whose CI overlaps the fastest", cost = fewer slots) inverted a noisy sweep: its CIs never tightened, so
    parallel=1 was chosen at -88.9% vs the defaults (issue 12).

    `paired`: the rows are an adaptive race's, repetition i of every row measured in the same round, so a
    cell ties with the fastest only when their per-round ratios do not show it slower (paired_tie). The
    unpaired CI of two race rounds (t with one degree of freedom) spanned 61-46567 tok/s and tied every
    finalist, which handed the pick to the one using 10% less memory at 0.82 of the fastest's throughput."""
    rejected = {r.cell_key: why for r in results if (why := slo_violation(r, slo)) is not None}
    eligible = [r for r in results if r.cell_key not in rejected]
    if not eligible:
        measured = [r for r in results if r.status == "ok"]
        fastest = max(measured, key=lambda r: r.throughput_tps, default=None)
        detail = f"; fastest was {fastest.cell_key}: {rejected[fastest.cell_key]}" if fastest else ""
        return Selection(None, f"no cell met the SLO (p95 TTFT <= {slo.ttft_p95_ms:g} ms, per-stream decode >= "
                         f"{slo.min_decode_tps:g} tok/s){detail}", rejected=rejected)
    bases = {r.client_key: r for r in results if r.baseline and r.status == "ok"}

    def above_defaults(r: CellResult) -> bool:
        base = bases.get(r.client_key)
        return base is None or r.throughput_tps > base.throughput_tps

    tuned = [r for r in eligible if not r.baseline]
    contenders = [r for r in tuned if above_defaults(r)]
    if not contenders:
        if not tuned:
            return Selection(None, "only llama-server's defaults met the SLO; keep them", rejected=rejected)
        top = max(tuned, key=lambda r: r.throughput_tps)
        base = bases[top.client_key]
        return Selection(None, f"no config beat llama-server's defaults at its own load (fastest {top.cell_key}: "
                         f"{top.throughput_tps:.1f} tok/s vs defaults {base.throughput_tps:.1f}); keep the defaults",
                         base, top.throughput_tps / base.throughput_tps - 1, rejected=rejected)
    # Raced: the fastest of the cells that ran every round (the others left the race behind the leaders).
    most = max(len(c.reps) for c in contenders)
    pool = [r for r in contenders if len(r.reps) == most] if paired else contenders
    fastest = max(pool, key=lambda r: r.throughput_tps)
    lo = fastest.ci[0]
    tied = [r for r in contenders if r is fastest or (
        paired_tie(r.reps, fastest.reps) if paired else lo is not None and r.throughput_tps >= lo)]
    cheaper = [r for r in tied if _cheaper(r, fastest)]
    best = min(cheaper, key=lambda r: r.rss_mb or 0.0) if cheaper else fastest
    if best is fastest:
        reason = f"highest throughput meeting the SLO ({best.throughput_tps:.1f} tok/s)"
    else:
        reason = (f"within the fastest one's 95% CI ({fastest.cell_key}, {fastest.throughput_tps:.1f} tok/s) and "
                  f"uses {best.rss_mb:.0f} MB instead of {fastest.rss_mb:.0f} MB of memory")
    at_load = bases.get(best.client_key)
    gain = best.throughput_tps / at_load.throughput_tps - 1 if at_load and at_load.throughput_tps > 0 else None
    return Selection(best, reason, at_load, gain, tuple(r.cell_key for r in tied), rejected)


def paired_tie(reps: Sequence[float], fastest: Sequence[float]) -> bool:
    """Whether a raced cell is not shown slower than the fastest: the 95% CI of the geometric mean of their
    per-round ratios reaches 1. Rounds missing on either side (a cell dropped out of the race) do not tie."""
    if len(reps) != len(fastest) or len(reps) < 2 or min(*reps, *fastest) <= 0:
        return False
    _, _, hi = ratio_ci([math.log(a / b) for a, b in zip(reps, fastest, strict=True)])
    return hi is not None and hi >= 1


def _cheaper(r: CellResult, than: CellResult) -> bool:
    return r.rss_mb is not None and than.rss_mb is not None and r.rss_mb <= (1 - CHEAPER_BY) * than.rss_mb


Decision = Literal["win", "defaults"]


def paired_ratio(leader: Sequence[float], defaults: Sequence[float]) -> tuple[float, float | None, float | None, int]:
    """Best/defaults throughput ratio from interleaved runs D L D L D ...: each leader run is compared with
    the mean (on the log scale) of the defaults runs on either side of it, so a neighbour's burst or a
    drift hits both sides of a pair. Returns (ratio, CI low, CI high, pairs)."""
    logs = [math.log(max(v, 1e-9)) for v in leader]
    base = [math.log(max(v, 1e-9)) for v in defaults]
    pairs = [lv - (base[i] + base[i + 1]) / 2 for i, lv in enumerate(logs) if i + 1 < len(base)]
    ratio, lo, hi = ratio_ci(pairs)
    return ratio, lo, hi, len(pairs)


def paired_decision(leader: Sequence[float], defaults: Sequence[float], *, min_pairs: int,
                    min_gain: float = 0.0) -> Decision | None:
    """"win" once the ratio's 95% CI lies above 1 + min_gain, "defaults" once it lies below 1; None while
    the data cannot decide."""
    _, lo, hi, n = paired_ratio(leader, defaults)
    if n < max(2, min_pairs) or lo is None or hi is None:
        return None
    if lo > 1 + min_gain:
        return "win"
    if hi < 1:
        return "defaults"
    return None


def rank_key(r: CellResult, slo: Slo) -> tuple[int, float]:
    """Cells that meet the SLO first, then by throughput."""
    return (0 if slo_violation(r, slo) is None else 1, -r.throughput_tps)


# How much of a screened cell's blended score is its own short run; the rest is what the others predict for it.
OWN_WEIGHT = 0.5


def main_effects(results: Sequence[CellResult]) -> dict[str, float]:
    """Each cell's log throughput as the *other* cells predict it, with a main-effects model (one additive
    effect per value of each server knob and client-load dimension, least squares), left out one at a time.
    A cell's own run, sunk or lifted by a neighbour's burst, never moves its own prediction. A cell whose
    knob values no other cell shares has no prediction (the others know nothing about it). Cells without a
    positive figure are left out."""
    measured = [r for r in results if r.throughput_tps > 0]
    if not measured:
        return {}
    levels = sorted({_level(k, v) for r in measured for k, v in _factors(r)})
    column = {name: i + 1 for i, name in enumerate(levels)}
    x = np.zeros((len(measured), len(levels) + 1))
    x[:, 0] = 1.0
    for row, r in enumerate(measured):
        for k, v in _factors(r):
            x[row, column[_level(k, v)]] = 1.0
    y = np.log([r.throughput_tps for r in measured])
    # The pseudo-inverse copes with the one-hot columns of a factor summing to the intercept; the fitted
    # values and the leverages are unique all the same. Leave-one-out without refitting: (fit - h*y)/(1 - h).
    hat = x @ np.linalg.pinv(x)
    fitted, leverage = hat @ y, np.diag(hat)
    return {r.cell_key: float((f - h * v) / (1 - h))
            for r, f, h, v in zip(measured, fitted, leverage, y, strict=True) if h < 1 - 1e-6}


def _factors(r: CellResult) -> list[tuple[str, object]]:
    return [*r.server.items(), *((k, v) for k, v in r.client.items() if v is not None)]


def _level(k: str, v: object) -> str:
    return f"{k}={v}"


def screen_scores(results: Sequence[CellResult]) -> dict[str, float]:
    """Log-scale score of each screened cell: its own figure blended with what the others predict for it."""
    predicted = main_effects(results)
    return {r.cell_key: OWN_WEIGHT * math.log(r.throughput_tps)
            + (1 - OWN_WEIGHT) * predicted.get(r.cell_key, math.log(r.throughput_tps))
            for r in results if r.throughput_tps > 0}


def shortlist(results: Sequence[CellResult], k: int, slo: Slo) -> list[CellResult]:
    """The screened cells that go on to the race: the `k` fastest by their own figure (cells that meet the
    SLO first; failed cells never go on), plus the best of the rest by blended score: the cell the other
    cells rate highest although its own run came out lower, as one sunk by a neighbour's burst does. The
    model only adds a finalist, never removes one: knobs do interact (measured: batch_size 64 cost
    parallel 2 and 4 about 40% and parallel 1 nothing), and a model without interactions that picked all
    the finalists raced four parallel=1 cells while the grid's best was parallel=4 (92.6% of it).

    One cell per server config, its best-ranked load: what is tuned is the config, and two loads of one
    config took two of five race places in every run on the CPU (where concurrency 4 and 8 measure alike),
    leaving fewer configs to compare; where a higher load is faster (a GPU) it is that config's best cell
    anyway."""
    alive = [r for r in results if r.status in ("ok", "errors") and not r.baseline]
    score = screen_scores(alive)
    ranked, seen = [], set()
    for r in sorted(alive, key=lambda r: rank_key(r, slo)):
        if r.server_key not in seen:
            seen.add(r.server_key)
            ranked.append(r)
    picked = ranked[:max(1, k)]
    rest = [r for r in alive if r.server_key not in {p.server_key for p in picked} and slo_violation(r, slo) is None]
    rescued = max(rest, key=lambda r: score.get(r.cell_key, -math.inf), default=None)
    return picked if rescued is None else [*picked, rescued]


def race_leaders(reps: dict[str, list[float]], n: int = 2) -> list[str]:
    """The `n` cells ahead after the race's common rounds: by the mean of their log figures, which ranks them
    as their per-round ratios do, since every cell ran in every round. Cells with a non-positive figure (no
    tokens in a round) never lead."""
    ok = {k: v for k, v in reps.items() if v and min(v) > 0}
    return sorted(ok, key=lambda k: -statistics.fmean(math.log(x) for x in ok[k]))[:n]


def race_order(n: int, round_index: int) -> list[int]:
    """Positions of the finalists in one race round: rotated each round, so none always runs first (right
    after a warm-up or an idle pause) or always right after the same neighbour."""
    shift = round_index % n if n else 0
    return [*range(shift, n), *range(shift)]


def screen_drop(first: CellResult, screened: Sequence[CellResult], below: float) -> str | None:
    """Why a config's other client loads are left out of the screen, or None: its first (lightest) load ran
    below `below` x the fastest cell screened so far at that load. Its own cell stays in the screen, so the
    model can still rescue it and the race measure it at that load. On the CPU the cells this drops are mostly
    batch_size 64 ones (0.5 of the fastest in every grid), whose heavier loads were the screen's slowest runs;
    the screen is noisy all the same (the grid's best config screened at 0.61-1.07 of the fastest so far in
    six runs), so this can skip the heavier load of the best config: only that config's other loads are
    spared, never the config, which stays in the screen at its lightest load (on the CPU the loads of one
    config measure alike; on a GPU, where more slots can pay off only at the heavier load, this is untested:
    `adaptive.drop_below: 0` screens every cell)."""
    if below <= 0 or first.status != "ok" or first.throughput_tps <= 0:
        return None
    peers = [r.throughput_tps for r in screened if r.client_key == first.client_key and r.status == "ok"
             and r.cell_key != first.cell_key and not r.baseline]
    top = max(peers, default=0.0)
    if not peers or first.throughput_tps >= below * top:
        return None
    return (f"adaptive screen: its config ran {first.throughput_tps:.0f} tok/s at {first.client_key}, "
            f"{first.throughput_tps / top:.0%} of the fastest screened there ({top:.0f}); its other loads were "
            "left out")
