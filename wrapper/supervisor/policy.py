"""Restart decisions: pure functions of the failure history, so they are table-tested without processes.

Backoff doubles from `backoff_initial_s` up to `backoff_max_s`, with jitter so a fleet of wrappers that
lost the same GPU driver does not restart in lock-step. A run that stayed up for `stable_after_s` clears
the streak: a server that crashes once a day should restart quickly every time, not after the maximum
delay. More than `max_restarts` failures inside `restart_window_s` is a crash loop: give up (exit 4) so
Docker's restart policy and the operator see it, instead of restarting forever.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wrapper.profiles.schema import SuperviseSpec


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float
    reason: str


def backoff(streak: int, spec: SuperviseSpec, rand: Callable[[], float] = random.random) -> float:
    """Delay before restart number `streak` (1-based) of the current streak: full exponential, then
    jittered down by up to half so the delay stays within [base/2, base]."""
    if streak <= 0:
        return 0.0
    base = min(spec.backoff_max_s, spec.backoff_initial_s * 2.0 ** (streak - 1))
    return float(base * (0.5 + 0.5 * rand()))


def streak_after(streak: int, ran_for_s: float, spec: SuperviseSpec) -> int:
    """The consecutive-failure count after a run that lasted `ran_for_s` ended in a failure."""
    return 1 if ran_for_s >= spec.stable_after_s else streak + 1


def decide(
    *,
    retryable: bool,
    failures: Sequence[float],
    now: float,
    streak: int,
    spec: SuperviseSpec,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """`failures` are the monotonic times of every failure so far, this one included."""
    if not retryable:
        return Decision(False, 0.0, "not retryable: restarting would fail the same way")
    recent = [t for t in failures if now - t <= spec.restart_window_s]
    if len(recent) > spec.max_restarts:
        return Decision(
            False,
            0.0,
            f"crash loop: {len(recent)} failures in {spec.restart_window_s:g}s "
            f"(supervise.max_restarts={spec.max_restarts})",
        )
    delay = backoff(streak, spec, rand)
    return Decision(True, delay, f"restart {len(recent)}/{spec.max_restarts} in window, after {delay:.2f}s")
