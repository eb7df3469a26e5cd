"""Event payloads: versioned pydantic models, one per subject (the publisher is wrapper.events.publisher).

Export the JSON schemas: `python -m wrapper.events.payloads --schemas docs/schemas/`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from wrapper.measure.selfcheck import SelfCheckFigures

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
    fingerprint: str | None = None  # wrapper.plan.hardware's stable fingerprint (keys the tuning store)


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
    """The self-check's figures (wrapper.measure.selfcheck.SelfCheckFigures) as an event."""

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
    """Best effort, never raises: built from wrapper.plan.hardware (the same fingerprint the tuning store uses)."""
    from wrapper.plan import hardware

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

