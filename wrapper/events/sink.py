"""The small interface every event producer writes to (cheap to import: no asyncio, no NATS client)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from wrapper.events.payloads import Event


class EventSink(Protocol):
    """Where events go. `emit` returns at once and never raises; `close` sends what is buffered."""

    def emit(self, payload: Event) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class NullSink:
    """Events are off (no NATS_URL): everything is dropped."""

    def emit(self, payload: Event) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        pass
