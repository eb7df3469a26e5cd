"""Health probes of llama-server, run off the supervisor thread.

Readiness asks `/health`: llama-server answers 503 while it loads the model and 200 once it serves.
Liveness asks `/slots` where the server has it: `/health` is answered by the HTTP threads alone, so it
stays green while the inference loop is stuck, but `/slots` is a task that loop must pick up between
two decode steps, so it times out when inference hangs. A probe that cannot connect or
times out says nothing about loading progress (that is the log output's job) but, once ready, repeated
timeouts mean the server is hung or stopped (SIGSTOP keeps the socket accepting connections in the
kernel's backlog, so only a timeout shows it). Probes run in one worker thread so a probe waiting out its
timeout never delays the supervisor's reaction to a signal or a child exit.

The probe speaks through the standard library's http.client: one GET on a fresh loopback connection needs no
more, and importing an HTTP client library here cost ~0.15 s of CPU in the first moments of every start, taken
from llama-server's own load on a small machine (issue 16).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


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


def probe(url: str, timeout_s: float, path: str = "/health", headers: dict[str, str] | None = None) -> ProbeResult:
    """GET url+path on a fresh connection (never a socket that belonged to a previous child); proxies are not
    consulted, the call is to our own child."""
    import http.client  # on the probe thread, once llama-server is spawned (it pulls in ssl and email)

    parts = urlsplit(url)
    start = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
    except TimeoutError:
        return ProbeResult(None, f"no answer within {timeout_s:g}s", time.monotonic() - start)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: a header http.client refuses
        return ProbeResult(None, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    finally:
        conn.close()
    return ProbeResult(response.status, "", time.monotonic() - start)


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
        while (item := self._requests.get()) is not None:
            timeout_s, tag, path = item
            answer = probe(self.url, timeout_s, path, self._headers)
            result = ProbeResult(answer.status, answer.error, answer.elapsed_s, tag)
            with self._lock:
                self._result, self._busy = result, False
            self._wake()
