"""Typed records of a sweep that the tuning store keeps: one measured cell and its throughput statistics.

They live here, below `bench/`, because the store (and auto-tune reading it) must not import the sweep.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); beyond that, the normal 1.96.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean and its 95% CI; the bounds are None with fewer than two values (no spread to judge)."""
    if not values:
        return 0.0, None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def log_ci(values: Sequence[float]) -> tuple[float | None, float | None]:
    """95% CI of a throughput on the log scale: multiplicative, so its bounds are never negative (issue 12:
    the additive CI of a noisy sweep read `[-1301, 3788]` tok/s). None with fewer than two values. A zero
    repetition (nothing came back) makes the lower bound 0."""
    if len(values) < 2:
        return None, None
    if min(values) <= 0:
        return 0.0, max(values)
    logs = [math.log(v) for v in values]
    centre = statistics.fmean(logs)
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(centre - half), math.exp(centre + half)


def ratio_ci(log_ratios: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Geometric-mean ratio of paired measurements and its 95% CI, from per-pair log ratios."""
    if not log_ratios:
        return 1.0, None, None
    centre = statistics.fmean(log_ratios)
    if len(log_ratios) < 2:
        return math.exp(centre), None, None
    half = t95(len(log_ratios) - 1) * statistics.stdev(log_ratios) / math.sqrt(len(log_ratios))
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


@dataclass
class CellResult:
    """One measured (or failed, or pruned) cell, as stored and reported."""

    cell_key: str
    server_key: str
    server: dict[str, Any]
    client: dict[str, Any]
    status: str  # ok | errors | failed | pruned
    reason: str | None = None
    baseline: bool = False
    reps: list[float] = field(default_factory=list)  # throughput of each repetition
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    errors: int = 0
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_p99_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    itl_p50_ms: float | None = None  # gaps between streamed tokens, over every request of the cell
    itl_p95_ms: float | None = None
    itl_p99_ms: float | None = None
    decode_tps: float | None = None  # mean per-stream decode rate
    duration_s: float = 0.0
    cost: tuple[float, ...] = ()
    rss_mb: float | None = None  # measured resident memory of the cell's servers: what "cheaper" means
    rung: int = 0  # adaptive: the last rung this cell ran in (grid: 0)
    argv: list[str] = field(default_factory=list)

    @property
    def throughput_tps(self) -> float:
        return mean_ci(self.reps)[0]

    @property
    def ci(self) -> tuple[float | None, float | None]:
        return log_ci(self.reps)

    @property
    def concurrency(self) -> int:
        return int(self.client.get("concurrency", 1))

    @property
    def client_key(self) -> str:
        return self.cell_key.split("|", 1)[1]


@dataclass(frozen=True)
class ClientLoad:
    """The client side of a measured cell: what the self-check repeats to judge a tuned server."""

    concurrency: int
    prompt_words: int
    max_tokens: int
    rate: float | None = None  # open loop (requests/s); the self-check only repeats closed-loop loads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientLoad:
        rate = data.get("rate")
        return cls(int(data["concurrency"]), int(data["prompt_words"]), int(data["max_tokens"]),
                   None if rate is None else float(rate))
