"""GPU status for `mesh.gpu.status.v1`: memory, utilisation, temperature and power from NVML.

A host without NVML (CPU-only, or a Jetson, whose GPU NVML does not report) reads as no GPUs, and then no
event is sent at all: an empty or zero-filled GPU status would read as "idle GPU" on a dashboard.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from wrapper.events.payloads import GpuReading

log = logging.getLogger("wrapper.events")

Reader = Callable[[], list[GpuReading]]


def visible_indices(visible: str | None) -> set[int] | None:
    """Host indices the child sees, from its CUDA_VISIBLE_DEVICES (None: all; UUIDs count as all, since
    only the pinned ones would be read and NVML can map them, but a typo must not hide every GPU)."""
    if visible is None or not visible.strip():
        return None
    try:
        ids = {int(p) for p in visible.split(",") if p.strip()}
    except ValueError:
        return None
    return {i for i in ids if i >= 0}


def read(visible: str | None = None) -> list[GpuReading]:
    """One reading per GPU the instance uses; [] without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    wanted = visible_indices(visible)
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            if wanted is not None and i not in wanted:
                continue
            out.append(_one(pynvml, i))
    except pynvml.NVMLError as exc:
        log.debug("NVML reading failed: %s", exc)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return out


def _one(nvml: Any, index: int) -> GpuReading:
    h = nvml.nvmlDeviceGetHandleByIndex(index)

    def get(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(h, *args)
        except nvml.NVMLError:  # an unsupported query (e.g. power on some boards) leaves its field empty
            return None

    mem = get(nvml.nvmlDeviceGetMemoryInfo)
    util = get(nvml.nvmlDeviceGetUtilizationRates)
    power = get(nvml.nvmlDeviceGetPowerUsage)
    name, uuid = (_text(get(fn)) for fn in (nvml.nvmlDeviceGetName, nvml.nvmlDeviceGetUUID))
    return GpuReading(
        index=index,
        name=name,
        uuid=uuid,
        memory_used_bytes=int(mem.used) if mem is not None else None,
        memory_total_bytes=int(mem.total) if mem is not None else None,
        utilization_pct=int(util.gpu) if util is not None else None,
        memory_utilization_pct=int(util.memory) if util is not None else None,
        temperature_c=get(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
        power_w=round(power / 1000, 1) if power is not None else None,
    )


def _text(value: object) -> str | None:
    # Older pynvml releases return bytes for names and UUIDs.
    return value.decode(errors="replace") if isinstance(value, bytes) else (None if value is None else str(value))
