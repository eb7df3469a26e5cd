"""Event payloads (versioned pydantic models) and the NATS publisher that never blocks serving.

The publisher runs its own event loop in a daemon thread. `publish` only appends to a bounded buffer
(oldest dropped and counted when full) and returns; the thread connects with a short timeout, keeps
retrying in the background, and warns once per outage. Benchmark results go through JetStream when the
server has it (acknowledged, so they are not lost), otherwise plain publish.

Export the JSON schemas: `python -m wrapper.events --schemas docs/schemas/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from wrapper.selfcheck import SelfCheckFigures

log = logging.getLogger("wrapper.events")

SCHEMA_VERSION = 1
BENCHMARK_STREAM = "LLAMA_BENCHMARK"  # created with subjects llama.benchmark.> when no stream covers them
Scalar = str | int | float | bool | None


# ---------------------------------------------------------------- payloads


class ModelRef(BaseModel):
    name: str
    sha256: str | None = None
    size_bytes: int | None = None


class HardwareSummary(BaseModel):
    arch: str
    cpu_count: int
    ram_bytes: int | None = None
    gpus: list[str] = Field(default_factory=list)  # "NVIDIA GeForce RTX 5090 (32 GiB)"
    cuda: str | None = None  # driver's CUDA version, e.g. "12.8"
    capabilities: list[str] = Field(default_factory=list)  # ["gpu:rtx5090", "vram:32gb", "cuda:12.8"]
    fingerprint: str | None = None  # wrapper.hardware's stable fingerprint (keys the tuning store)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    SUBJECT: ClassVar[str] = ""

    schema_version: Literal[1] = 1
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    emitted_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    instance_id: str
    host: str
    profile: str
    model: ModelRef | None = None
    hardware: HardwareSummary | None = None


class BenchmarkStarted(Event):
    SUBJECT: ClassVar[str] = "llama.benchmark.started.v1"
    run_id: str
    grid: dict[str, list[Scalar]]  # swept knob -> values
    cells: int
    started_at: datetime


class BenchmarkCell(Event):
    SUBJECT: ClassVar[str] = "llama.benchmark.cell.v1"
    run_id: str
    index: int
    config: dict[str, Scalar]
    throughput_tps: float
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    decode_tps: float | None = None


class BenchmarkCompleted(Event):
    SUBJECT: ClassVar[str] = "llama.benchmark.completed.v1"
    run_id: str
    cells: int
    failed_cells: int
    best_config: dict[str, Scalar] | None = None
    best_throughput_tps: float | None = None
    results_path: str | None = None  # CSV/DB the results were written to
    duration_s: float


class SelfCheck(Event, SelfCheckFigures):
    """The self-check's figures (wrapper.selfcheck.SelfCheckFigures) as an event."""

    SUBJECT: ClassVar[str] = "llama.selfcheck.v1"


InstanceKind = Literal["ready", "restarted", "failed", "stopped"]


class InstanceEvent(Event):
    SUBJECT: ClassVar[str] = "llama.instance.{kind}.v1"
    kind: InstanceKind
    url: str | None = None  # llama-server's own address (clients talk to it directly)
    pid: int | None = None
    exit_code: int | None = None
    restarts: int | None = None
    reason: str | None = None
    details: dict[str, Scalar] = Field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"llama.instance.{self.kind}.v1"


class NodeAnnounce(Event):
    SUBJECT: ClassVar[str] = "mesh.node.announce.v1"
    node_id: str
    capabilities: list[str]
    services: list[str]
    load: float  # 1-minute load average / CPU count
    uptime_s: float


PAYLOADS: tuple[type[Event], ...] = (BenchmarkStarted, BenchmarkCell, BenchmarkCompleted, SelfCheck, InstanceEvent,
                                      NodeAnnounce)


def hardware_summary(visible: str | None = None) -> HardwareSummary:
    """Best effort, never raises: built from wrapper.hardware (the same fingerprint the tuning store uses)."""
    from wrapper import hardware

    try:
        hw = hardware.detect(visible)
    except Exception:
        log.debug("hardware detection failed", exc_info=True)
        return HardwareSummary(arch=platform.machine(), cpu_count=os.cpu_count() or 1)
    caps = [f"cpu:{platform.machine()}"]
    gpus = []
    for g in hw.gpus:
        gib = round(g.vram_total_mib / 1024) if g.vram_total_mib else None
        gpus.append(f"{g.name} ({gib} GiB)" if gib else g.name)
        slug = g.name.lower().replace("nvidia", "").replace("geforce", "").replace(" ", "")
        caps += [f"gpu:{slug}"] + ([f"vram:{gib}gb"] if gib else [])
    if hw.cuda_version:
        caps.append(f"cuda:{hw.cuda_version}")
    if hw.ram_total_mib:
        caps.append(f"ram:{round(hw.ram_total_mib / 1024)}gb")
    ram = hw.ram_total_mib * 2**20 if hw.ram_total_mib else None
    return HardwareSummary(arch=platform.machine(), cpu_count=hw.cpu_cores_usable or os.cpu_count() or 1,
                           ram_bytes=ram, gpus=gpus, cuda=hw.cuda_version, capabilities=list(dict.fromkeys(caps)),
                           fingerprint=hw.fingerprint)


def model_ref(model: Any) -> ModelRef | None:
    """From acquire.ModelFile (path, sha256, size) or anything shaped like it."""
    if model is None:
        return None
    if isinstance(model, Path):
        return ModelRef(name=model.name, size_bytes=model.stat().st_size if model.exists() else None)
    return ModelRef(name=Path(str(model.path)).name, sha256=getattr(model, "sha256", None),
                    size_bytes=getattr(model, "size", None) or None)


def instance_id_for(settings: Any) -> str:
    return str(settings.env.instance_id or f"{socket.gethostname()}-{settings.profile_name}")


def _redact_url(url: str) -> str:
    # NATS_URL may carry user:password@; never log it.
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"


# ---------------------------------------------------------------- publisher

Listener = Callable[[str, Mapping[str, Any]], None]
_TRANSITIONS: dict[str, InstanceKind] = {"ready": "ready", "restarting": "restarted", "failed": "failed",
                                         "stopped": "stopped"}


class Publisher:
    """Fire-and-forget NATS publisher. Every public method returns promptly and never raises."""

    def __init__(self, url: str, *, context: Mapping[str, Any], buffer_size: int = 1000,
                 connect_timeout_s: float = 2.0) -> None:
        self.url = url
        self.context = dict(context)  # instance_id, host, profile, model, hardware
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

    @classmethod
    def from_settings(cls, settings: Any, model: Any = None, **kwargs: Any) -> Publisher | None:
        """None when NATS_URL is unset: callers do `if pub: pub.publish(...)`."""
        if not settings.env.nats_url:
            return None
        context = {"instance_id": instance_id_for(settings), "host": socket.gethostname(),
                   "profile": settings.profile_name, "model": model_ref(model),
                   "hardware": hardware_summary(settings.cuda_visible_devices)}
        return cls(settings.env.nats_url, context=context, **kwargs)

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

    def instance_listener(self, settings: Any = None, model: Any = None) -> Listener:
        """A supervisor listener(event, info) that turns transitions into llama.instance.*.v1 events."""
        if model is not None:
            self.context["model"] = model_ref(model)
        url = f"http://{settings.server.host}:{settings.server.port}" if settings is not None else None

        def listener(event: str, info: Mapping[str, Any]) -> None:
            kind = _TRANSITIONS.get(event)
            if kind is None:
                return
            fields = ("pid", "exit_code", "restarts", "reason", "url")
            known: dict[str, Any] = {k: info[k] for k in fields if info.get(k) is not None}
            details = {k: v for k, v in info.items() if k not in known and isinstance(v, Scalar)}
            try:
                known.setdefault("url", url)
                self.emit(InstanceEvent(**self.context, kind=kind, details=details, **known))
            except Exception:
                log.exception("instance event %s not sent", event)

        return listener

    def start_heartbeat(self, interval_s: float = 30.0, services: list[str] | None = None,
                        load: Callable[[], float] | None = None) -> None:
        services = services or ["llama-server", f"profile:{self.context.get('profile')}"]
        asyncio.run_coroutine_threadsafe(self._heartbeat(interval_s, services, load or _load), self._loop)

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
                self.url, connect_timeout=self._connect_timeout, allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=1, error_cb=quiet, disconnected_cb=down, reconnected_cb=up, name="wrapper"))
            stop = asyncio.ensure_future(self._stop.wait())
            # nats-py keeps retrying an unreachable server inside connect() (max_reconnect_attempts=-1),
            # which is the background retry we want; warn once if it has not made it within the timeout.
            done, _ = await asyncio.wait({attempt, stop}, timeout=self._connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self._warn_down("not reachable")
                await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
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

    async def _heartbeat(self, interval_s: float, services: list[str], load: Callable[[], float]) -> None:
        hardware = self.context.get("hardware")
        caps = hardware.capabilities if isinstance(hardware, HardwareSummary) else []
        while not self._stop.is_set():
            # A stale heartbeat is worthless: send only while connected, never buffer it.
            if self._nc is not None and self._nc.is_connected:
                beat = NodeAnnounce(**self.context, node_id=str(self.context["instance_id"]), capabilities=caps,
                                    services=services, load=load(), uptime_s=time.monotonic() - self._started)
                try:
                    await self._nc.publish(NodeAnnounce.SUBJECT, beat.model_dump_json().encode())
                except Exception as exc:
                    log.debug("heartbeat not sent: %s", exc)
            await self._wait(self._stop, interval_s)

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


# ---------------------------------------------------------------- schemas


def subjects() -> dict[str, type[Event]]:
    out = {cls.SUBJECT: cls for cls in PAYLOADS if cls is not InstanceEvent}
    out.update({f"llama.instance.{k}.v1": InstanceEvent for k in ("ready", "restarted", "failed", "stopped")})
    return dict(sorted(out.items()))


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for subject, cls in subjects().items():
        schema = cls.model_json_schema()
        schema["$id"] = subject
        path = directory / f"{subject}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Export the event JSON schemas.")
    parser.add_argument("--schemas", type=Path, required=True, metavar="DIR")
    for p in write_schemas(parser.parse_args().schemas):
        print(p)
