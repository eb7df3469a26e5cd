"""The NATS publisher that never blocks serving.

It runs its own event loop in a daemon thread. `publish` only appends to a bounded buffer (oldest dropped
and counted when full) and returns; the thread connects with a short timeout, keeps retrying in the
background, and warns once per outage. Benchmark results go through JetStream when the server has it
(acknowledged, so they are not lost), otherwise plain publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wrapper.errors import ConfigError
from wrapper.events.payloads import (
    BENCHMARK_STREAM,
    BenchmarkCell,
    Event,
    EventContext,
    GpuReading,
    GpuStatus,
    InstanceEvent,
    NodeAnnounce,
)
from wrapper.settings import Environment

log = logging.getLogger("wrapper.events")


@dataclass(frozen=True)
class NatsAccess:
    """How this process reaches NATS: the URL plus, optionally, a credentials file (NATS_CREDS: JWT and
    nkey seed, from `nsc`) and TLS files (NATS_TLS_CA to verify the server, NATS_TLS_CERT/KEY for mutual
    TLS). Used by the event publisher and the fleet tuning client alike."""

    url: str
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, env: Environment) -> NatsAccess:
        """Checked at start: a missing credentials or TLS file is a configuration error, not an outage."""
        if not env.nats_url:
            raise ConfigError("NATS_URL is not set", hint="set NATS_URL=nats://HOST:4222")
        access = cls(env.nats_url, env.nats_creds, env.nats_tls_ca, env.nats_tls_cert, env.nats_tls_key)
        for name, path in (("NATS_CREDS", access.creds), ("NATS_TLS_CA", access.tls_ca),
                           ("NATS_TLS_CERT", access.tls_cert), ("NATS_TLS_KEY", access.tls_key)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{name}={path}: not a readable file",
                                  hint=f"mount the file there, or unset {name}")
        return access

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (nats-py's `user_credentials` and `tls`)."""
        opts: dict[str, Any] = {}
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.tls_ca or self.tls_cert:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = context
        return opts

    def __str__(self) -> str:
        return _redact_url(self.url)


def _redact_url(url: str) -> str:
    # NATS_URL may carry user:password@; never log it.
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"


class Publisher:
    """Fire-and-forget NATS publisher. Every public method returns promptly and never raises."""

    def __init__(self, url: str | NatsAccess, *, context: EventContext, buffer_size: int = 1000,
                 connect_timeout_s: float = 2.0) -> None:
        self.access = url if isinstance(url, NatsAccess) else NatsAccess(url)
        self.url = self.access.url
        self.context = context
        self.dropped = 0
        self.published = 0
        self.jetstream = False
        self._buffer: deque[tuple[str, bytes]] = deque()
        self._size = buffer_size
        self._lock = threading.Lock()
        self._connect_timeout = connect_timeout_s
        self._warned = False
        self._nc: Any = None
        self._js: Any = None
        self._started = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._grace_until = 0.0
        self._thread = threading.Thread(target=self._run, name="wrapper-events", daemon=True)
        self._thread.start()

    # -- what callers use

    def publish(self, subject: str, payload: Event) -> None:
        try:
            data = payload.model_dump_json().encode()
        except Exception:
            log.exception("event %s could not be serialised; dropped", subject)
            return
        with self._lock:
            if len(self._buffer) >= self._size:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append((subject, data))
        self._poke()

    def emit(self, payload: Event) -> None:
        subject = payload.subject if isinstance(payload, InstanceEvent) else payload.SUBJECT
        self.publish(subject, payload)

    def start_heartbeat(self, interval_s: float = 30.0, services: list[str] | None = None,
                        load: Callable[[], float] | None = None,
                        gpus: Callable[[], list[GpuReading]] | None = None) -> None:
        """Announce at once (as soon as connected), then every interval_s; with `gpus`, a GPU status beside
        each announce when the reader returns any GPU."""
        services = services or ["llama-server", f"profile:{self.context.profile}"]
        asyncio.run_coroutine_threadsafe(self._heartbeat(interval_s, services, load or _load, gpus), self._loop)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (within timeout), drain, stop the thread."""
        if not self._thread.is_alive():
            return
        self._grace_until = time.monotonic() + timeout
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout + 2)
        if self._buffer:
            log.warning("events: %d event(s) not sent at shutdown", len(self._buffer))

    # -- the thread

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            log.exception("events: publisher thread stopped")
        finally:
            # Leftover nats-py tasks (a connect still retrying at shutdown) are cancelled and reaped here,
            # so nothing reports "Task exception was never retrieved" at interpreter exit.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.wait(pending))
            self._loop.close()

    def _poke(self) -> None:
        # RuntimeError: the loop is closed (we are shut down); the event stays unsent.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _main(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            if self._nc is None:
                if await self._connect():
                    backoff = 0.5
                else:
                    await self._wait(self._stop, backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
            if self._nc.is_connected:
                await self._flush()
            await self._wait(self._wake, 1.0)
            self._wake.clear()
        await self._shutdown()

    async def _connect(self) -> bool:
        import nats

        async def quiet(exc: Exception) -> None:
            log.debug("nats: %s", exc)

        async def down() -> None:
            if not self._stop.is_set():
                self._warn_down("connection lost")

        async def up() -> None:
            log.info("events: NATS reconnected at %s", _redact_url(self.url))
            self._warned = False
            self._poke()

        try:
            attempt = asyncio.ensure_future(nats.connect(
                self.url, **self.access.options(), connect_timeout=self._connect_timeout, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=1,
                error_cb=quiet, disconnected_cb=down, reconnected_cb=up, name="wrapper"))
            stop = asyncio.ensure_future(self._stop.wait())
            # nats-py keeps retrying an unreachable server inside connect() (max_reconnect_attempts=-1),
            # which is the background retry we want; warn once if it has not made it within the timeout.
            done, _ = await asyncio.wait({attempt, stop}, timeout=self._connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self._warn_down("not reachable")
                await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not attempt.done() and self._buffer:
                # Stopping with events still to send (a node that goes offline moments after it started): the
                # connect gets what is left of close()'s grace to deliver them.
                await asyncio.wait({attempt}, timeout=max(0.0, self._grace_until - time.monotonic()))
            if not attempt.done():
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                return False
            self._nc = attempt.result()
        except Exception as exc:
            self._warn_down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False
        log.info("events: NATS connected at %s", _redact_url(self.url))
        self._warned = False
        await self._setup_jetstream()
        return True

    async def _setup_jetstream(self) -> None:
        from nats.js.errors import NotFoundError

        js = self._nc.jetstream(timeout=2)
        try:
            await js.account_info()
        except Exception:
            log.info("events: NATS has no JetStream; benchmark results use plain publish")
            return
        try:
            try:
                await js.find_stream_name_by_subject(BenchmarkCell.SUBJECT)
            except NotFoundError:
                await js.add_stream(name=BENCHMARK_STREAM, subjects=["llama.benchmark.>"])
                log.info("events: created JetStream stream %s for llama.benchmark.>", BENCHMARK_STREAM)
            self._js, self.jetstream = js, True
        except Exception as exc:
            log.warning("events: JetStream unusable for benchmark results (%s); using plain publish", exc)

    def _warn_down(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("events: NATS at %s unavailable (%s); serving continues, events are buffered "
                        "(up to %d, oldest dropped) until it is reachable", _redact_url(self.url), why, self._size)

    async def _flush(self) -> None:
        while self._nc.is_connected:
            with self._lock:
                if not self._buffer:
                    return
                subject, data = self._buffer.popleft()
            try:
                if self._js is not None and subject.startswith("llama.benchmark."):
                    await self._js.publish(subject, data, timeout=2)
                else:
                    await self._nc.publish(subject, data)
                self.published += 1
            except Exception as exc:
                log.debug("events: publish %s failed (%s); kept for retry", subject, exc)
                with self._lock:
                    if len(self._buffer) >= self._size:
                        self.dropped += 1
                    else:
                        self._buffer.appendleft((subject, data))
                return

    async def _heartbeat(self, interval_s: float, services: list[str], load: Callable[[], float],
                         gpus: Callable[[], list[GpuReading]] | None) -> None:
        caps = self.context.hardware.capabilities if self.context.hardware is not None else []
        node = self.context.node_id or self.context.instance_id
        while not self._stop.is_set():
            # A stale heartbeat is worthless: send only while connected, never buffer it. Until connected,
            # look again shortly: the first beat used to wait a whole interval (30 s) after the start.
            if self._nc is None or not self._nc.is_connected:
                await self._wait(self._stop, min(0.1, interval_s))
                continue
            beat = self.context.make(NodeAnnounce, node_id=node, capabilities=caps, services=services, load=load(),
                                     uptime_s=time.monotonic() - self._started)
            await self._send_now(NodeAnnounce.SUBJECT, beat.model_dump_json().encode())
            readings = await asyncio.get_running_loop().run_in_executor(None, gpus) if gpus is not None else []
            if readings:
                status = self.context.make(GpuStatus, node_id=node, gpus=readings)
                await self._send_now(GpuStatus.SUBJECT, status.model_dump_json().encode())
            await self._wait(self._stop, interval_s)

    async def _send_now(self, subject: str, data: bytes) -> None:
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:
            log.debug("%s not sent: %s", subject, exc)

    async def _shutdown(self) -> None:
        if self._nc is None:
            return
        remaining = max(0.1, self._grace_until - time.monotonic())
        try:
            if self._nc.is_connected:
                await asyncio.wait_for(self._flush(), remaining)
            await asyncio.wait_for(self._nc.drain(), max(0.1, self._grace_until - time.monotonic()))
        except Exception as exc:
            log.debug("events: drain incomplete: %s", exc)
            await self._nc.close()

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


def _load() -> float:
    return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)


