"""Record this machine's NVML readings as JSON (the test suite replays such recordings)."""

from __future__ import annotations

import json
import sys

import pynvml


def _try(fn, *args):  # type: ignore[no-untyped-def]
    try:
        value = fn(*args)
    except pynvml.NVMLError as exc:
        return {"error": str(exc)}
    return value.decode() if isinstance(value, bytes) else value


def main() -> None:
    pynvml.nvmlInit()
    out = {
        "driver_version": _try(pynvml.nvmlSystemGetDriverVersion),
        "cuda_driver_version": _try(pynvml.nvmlSystemGetCudaDriverVersion_v2),
        "nvml_version": _try(pynvml.nvmlSystemGetNVMLVersion),
        "devices": [],
    }
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        dev = {
            "index": i,
            "name": _try(pynvml.nvmlDeviceGetName, h),
            "uuid": _try(pynvml.nvmlDeviceGetUUID, h),
            "memory_v1": {"total": mem.total, "free": mem.free, "used": mem.used},
            "compute_capability": _try(pynvml.nvmlDeviceGetCudaComputeCapability, h),
            "pcie_gen_max": _try(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
            "pcie_gen_current": _try(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
            "pcie_width_max": _try(pynvml.nvmlDeviceGetMaxPcieLinkWidth, h),
            "pcie_width_current": _try(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h),
            "memory_bus_width": _try(pynvml.nvmlDeviceGetMemoryBusWidth, h),
            "max_mem_clock_mhz": _try(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
        }
        try:
            v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            dev["memory_v2"] = {"total": v2.total, "free": v2.free, "used": v2.used, "reserved": v2.reserved}
        except (pynvml.NVMLError, TypeError, AttributeError) as exc:
            dev["memory_v2"] = {"error": str(exc)}
        out["devices"].append(dev)
    json.dump(out, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
