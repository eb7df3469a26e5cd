"""Stopping a sweep on SIGTERM, SIGINT or SIGHUP: the handler only records the signal; the sweep acts on it
between steps (or aborts the cell it is measuring), stops its servers with one SIGTERM each and keeps what it
measured. Acting inside the handler could interrupt a result file or the store mid-write, or a server start
mid-fork; recording lets every step finish or unwind through its own cleanup.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """Raised by the sweep when a stop was requested. A BaseException, like KeyboardInterrupt, so no
    `except Exception` between the check and the sweep's top level can swallow it."""


class StopRequest:
    """The signals received so far. A second one means "now": servers get SIGKILL instead of the grace."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def record(self, signum: int, _frame: object = None) -> None:
        self.signals.append(signum)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    @property
    def forced(self) -> bool:
        return len(self.signals) > 1

    @property
    def name(self) -> str:
        return signal.Signals(self.signals[0]).name if self.signals else ""

    def check(self) -> None:
        if self.signals:
            raise Stopped(self.name)


@contextlib.contextmanager
def recorded(stop: StopRequest) -> Iterator[StopRequest]:
    """Route the stop signals to `stop` for the duration; the previous handlers come back afterwards.
    Only the main thread may install handlers, and it is also the thread that forks the servers, which
    their parent-death signal is tied to."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop.record) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
