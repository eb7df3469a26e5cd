"""Health probes of llama-server, run off the supervisor thread.

Readiness asks `/health`: llama-server answers 503 while it loads the model and 200 once it serves.
Liveness asks `/slots` where the server has it: `/health` is answered by the HTTP threads alone, so it
stays green while the inference loop is stuck, but `/slots` is a task that loop must pick up between
two decode steps, so it times out when inference hangs. A probe that cannot connect or
times out says nothing about loading progress (that is the log output's job) but, once ready, repeated
timeouts mean the server is hung or stopped (SIGSTOP keeps the socket accepting connections in the
kernel's backlog, so only a timeout shows it). Probes run in one worker thread so a probe waiting out its
timeout never delays the supervisor's reaction to a signal or a child exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True)
class ProbeResult:
    status: int | None  # HTTP status, None when no answer
    error: str  # "" when answered
    elapsed_s: float
    tag: int = 0  # which child it probed (the supervisor's spawn count); stale results are ignored

    @property
    def ready(self) -> bool:
        return self.status == 200

    @property
    def answered(self) -> bool:
        return self.status is not None


def probe(client: httpx.Client, url: str, timeout_s: float, path: str = "/health",
          headers: dict[str, str] | None = None) -> ProbeResult:
    import httpx

    start = time.monotonic()
    try:
        response = client.get(f"{url}{path}", timeout=timeout_s, headers=headers)
    except httpx.TimeoutException:
        return ProbeResult(None, f"no answer within {timeout_s:g}s", time.monotonic() - start)
    except httpx.HTTPError as exc:
        return ProbeResult(None, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    return ProbeResult(response.status_code, "", time.monotonic() - start)


class Prober:
    """At most one probe in flight; the result is picked up by the supervisor loop after `wake()`."""

    def __init__(self, url: str, wake: Callable[[], None], headers: dict[str, str] | None = None) -> None:
        self.url = url
        self._wake = wake
        self._headers = headers
        self._requests: queue.Queue[tuple[float, int, str] | None] = queue.Queue()
        self._result: ProbeResult | None = None
        self._busy = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="health-probe", daemon=True)
        self._thread.start()

    def request(self, timeout_s: float, tag: int = 0, path: str = "/health") -> bool:
        """Start a probe unless one is in flight. Returns whether one was started."""
        with self._lock:
            if self._busy:
                return False
            self._busy = True
        self._requests.put((timeout_s, tag, path))
        return True

    def take(self) -> ProbeResult | None:
        with self._lock:
            result, self._result = self._result, None
            return result

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=1.0)

    def _work(self) -> None:
        # No keep-alive: a fresh connection per probe, so a restarted child is never probed through a
        # socket that belonged to the previous one; trust_env=False keeps proxies out of a loopback call.
        # httpx is imported here, on the probe thread, while llama-server loads: not before its exec.
        import httpx

        with httpx.Client(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while (item := self._requests.get()) is not None:
                timeout_s, tag, path = item
                answer = probe(client, self.url, timeout_s, path, self._headers)
                result = ProbeResult(answer.status, answer.error, answer.elapsed_s, tag)
                with self._lock:
                    self._result, self._busy = result, False
                self._wake()
