"""Event payloads: versioned pydantic models, one per subject (the publisher is wrapper.events.publisher).

Export the JSON schemas: `python -m wrapper.events --schemas docs/schemas/`.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("wrapper.events")

SCHEMA_VERSION = 1
BENCHMARK_STREAM = "LLAMA_BENCHMARK"  # created with subjects llama.benchmark.> when no stream covers them
Scalar = str | int | float | bool | None
E = TypeVar("E", bound="Event")


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
    fingerprint: str | None = None  # wrapper.plan.hardware's stable fingerprint (keys the tuning store)


class EventContext(BaseModel):
    """Who is speaking: the fields every event of one process shares."""

    instance_id: str
    host: str
    profile: str
    model: ModelRef | None = None
    hardware: HardwareSummary | None = None
    node_id: str | None = None  # NODE_NAME, else the hostname
    advertise_url: str | None = None  # where other nodes reach llama-server
    service_name: str | None = None  # SERVICE_NAME / SERVICE_VERSION (seed: orion-llamaccp)
    service_version: str | None = None

    def fields(self) -> dict[str, object]:
        return {"instance_id": self.instance_id, "host": self.host, "profile": self.profile, "model": self.model,
                "hardware": self.hardware, "node_id": self.node_id, "advertise_url": self.advertise_url,
                "service_name": self.service_name, "service_version": self.service_version}

    def make(self, cls: type[E], **fields: object) -> E:
        """An event of type cls from this context plus its own fields (validated like any payload)."""
        return cls.model_validate({**self.fields(), **fields})


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
    node_id: str | None = None
    advertise_url: str | None = None
    service_name: str | None = None
    service_version: str | None = None


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


Verdict = Literal["pass", "degraded", "fail"]
Unit = Literal["tok/s", "items/s"]


class SelfCheckFigures(BaseModel):
    """What a self-check measured and concluded: the result's fields and the event's payload."""

    verdict: Verdict
    ratio: float | None  # measured / expected throughput; None when there was nothing to compare with
    throughput_tps: float  # in `unit`: output tokens/s, or items/s for embedding and rerank profiles
    unit: Unit = "tok/s"
    expected_tps: float | None = None
    expected_source: str | None = None
    concurrency: int
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    client_decode_tps: float | None = None
    server_decode_tps: float | None = None
    client_bound: bool = False
    duration_s: float
    reason: str
    # How sure the figure is: measured windows and the 95% CI of their throughput (log scale: never < 0).
    windows: int = 0
    ci_low: float | None = None
    ci_high: float | None = None
    # The load as sized for this server: tokens one slot holds, corpus prompt bucket, output tokens.
    slot_ctx: int | None = None
    prompt_words: int | None = None
    max_tokens: int | None = None
    action: str | None = None  # what the wrapper did about it, e.g. rolled a tuned config back


class SelfCheck(Event, SelfCheckFigures):
    """The self-check's figures as an event."""

    SUBJECT: ClassVar[str] = "llama.selfcheck.v1"

    @classmethod
    def of(cls, context: EventContext, figures: SelfCheckFigures) -> SelfCheck:
        return context.make(cls, **{k: getattr(figures, k) for k in SelfCheckFigures.model_fields})


InstanceKind = Literal["ready", "restarted", "failed", "stopped"]


class InstanceEvent(Event):
    SUBJECT: ClassVar[str] = "llama.instance.{kind}.v1"
    kind: InstanceKind
    url: str | None = None  # llama-server's own address (clients talk to it directly)
    pid: int | None = None
    exit_code: int | None = None  # restarted/failed/stopped: llama-server's exit status
    exit_signal: int | None = None  # ... or the signal that ended it (then exit_code is null)
    restarts: int | None = None
    reason: str | None = None
    details: dict[str, Scalar] = Field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"llama.instance.{self.kind}.v1"


class NodeAnnounce(Event):
    SUBJECT: ClassVar[str] = "mesh.node.announce.v1"
    node_id: str  # always set here
    capabilities: list[str]
    services: list[str]
    load: float  # 1-minute load average / CPU count
    uptime_s: float


class NodeOffline(Event):
    """This instance is going away: sent once on the way out, after llama-server has stopped."""

    SUBJECT: ClassVar[str] = "mesh.node.offline.v1"
    node_id: str
    reason: str  # "stopped" (a clean stop), or why serving ended
    exit_code: int  # the wrapper's own exit code
    uptime_s: float


class GpuReading(BaseModel):
    index: int  # as the host numbers it (NVML), not as CUDA_VISIBLE_DEVICES renumbers it for the child
    name: str | None = None
    uuid: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_pct: int | None = None  # GPU busy time over NVML's last sample period
    memory_utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None


class GpuStatus(Event):
    """The GPUs this instance runs on, read from NVML with every heartbeat; never sent without NVML."""

    SUBJECT: ClassVar[str] = "mesh.gpu.status.v1"
    node_id: str
    gpus: list[GpuReading]


PAYLOADS: tuple[type[Event], ...] = (BenchmarkStarted, BenchmarkCell, BenchmarkCompleted, SelfCheck, InstanceEvent,
                                      NodeAnnounce, NodeOffline, GpuStatus)


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

