"""Memory bandwidths the speed estimate rests on, and the estimate's parts that are not the roofline.

Decode reads every active weight once per token, so its ceiling is set by where the weights live: GPU
memory, host RAM (layers left on the CPU by -ngl, routed experts kept there by --n-cpu-moe), and the
PCIe link, which carries RAM-resident weights to the GPU when llama.cpp offloads a large batch's matmuls
(prompt processing). Every figure says where it came from: NVML's reported peak, a public spec sheet, or
a measurement on this host; a figure nobody knows stays None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wrapper.plan.hardware import Gpu

# Public spec-sheet memory bandwidth (GB/s) of the fleet's GPUs (seeds/hardware-profiles.md) and a few
# neighbours. Matched on the lower-cased NVML name, most specific pattern first ("4090 laptop" before
# "4090"). Jetson modules report no bus width through NVML, so for them the table is the only source.
GPU_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    (r"5090", 1792.0),
    (r"3090 ?ti", 1008.0),
    (r"3090", 936.0),
    (r"4090 laptop|4090 mobile", 576.0),
    (r"4090", 1008.0),
    (r"4080 laptop|4080 mobile", 432.0),
    (r"agx orin|orin \(?64|orin \(?32|jetson orin$|^orin$", 204.8),
    (r"orin nx", 102.4),
    (r"orin nano", 68.0),
    (r"h200", 4800.0),
    (r"h100.*(sxm|hbm3)", 3350.0),
    (r"h100", 2000.0),
    (r"a100.*80", 2039.0),
    (r"a100", 1555.0),
    (r"l40s|l40", 864.0),
)

# Host-to-device copies reach about 80% of the link's raw rate with pinned memory (planner facts: ~50-55
# GB/s on PCIe Gen5 x16, never the theoretical 64). Per lane, in GB/s, by generation.
_PCIE_LANE_GBPS = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PCIE_ACHIEVED = 0.82


@dataclass(frozen=True)
class Bandwidth:
    gbps: float | None
    basis: str  # "NVML peak", "spec sheet (RTX 5090)", "unknown"


def spec_bandwidth(name: str) -> float | None:
    """The spec-sheet figure for a GPU name (NVML's spelling or a short one like "rtx 4090 laptop")."""
    low = " ".join(name.lower().replace("nvidia", " ").replace("geforce", " ").split())
    for pattern, gbps in GPU_BANDWIDTH_GBPS:
        if re.search(pattern, low):
            return gbps
    return None


def gpu_bandwidth(gpu: Gpu | None = None, name: str | None = None) -> Bandwidth:
    """NVML's peak where the device reports it, else the spec sheet for its name, else unknown."""
    if gpu is not None and gpu.mem_bandwidth_peak_gbps:
        return Bandwidth(gpu.mem_bandwidth_peak_gbps, "NVML peak")
    label = name or (gpu.name if gpu is not None else None)
    if label:
        found = spec_bandwidth(label)
        if found:
            return Bandwidth(found, f"spec sheet ({label})")
    return Bandwidth(None, "unknown")


def gpu_bandwidths(gpus: list[Gpu], n_budgets: int, name: str | None = None) -> tuple[list[float | None], str]:
    """One bandwidth per VRAM budget. A named GPU (`plan --gpu`) wins; budgets given with --vram-mib for
    the detected GPUs keep those GPUs' figures (the slowest one, when the counts differ)."""
    if n_budgets == 0:
        return [], "no GPU"
    if name:
        bw = gpu_bandwidth(name=name)
        return [bw.gbps] * n_budgets, bw.basis
    if not gpus:
        return [None] * n_budgets, "unknown"
    found = [gpu_bandwidth(g) for g in gpus]
    if len(found) == n_budgets:
        return [b.gbps for b in found], ", ".join(sorted({b.basis for b in found}))
    known = [b.gbps for b in found if b.gbps]
    slowest = min(known) if known and len(known) == len(found) else None
    return [slowest] * n_budgets, "slowest detected GPU" if slowest else "unknown"


def pcie_gbps(gen: int | None, width: int | None) -> float | None:
    """Achieved host-to-device bandwidth of a link; None when the link was not reported."""
    if not gen or not width or gen not in _PCIE_LANE_GBPS:
        return None
    return round(_PCIE_LANE_GBPS[gen] * width * PCIE_ACHIEVED, 1)


def prefill_ceiling(cpu_weight_bytes: float, ubatch: int, link_gbps: float | None) -> float | None:
    """Prompt tok/s bound by the link when weights sit in RAM and a GPU does the batch's matmuls: every
    ubatch copies those weights across PCIe once. None without RAM-resident weights or a known link."""
    if cpu_weight_bytes <= 0 or not link_gbps:
        return None
    return ubatch / (cpu_weight_bytes / (link_gbps * 1e9))


def decode_ceiling(gpu_bytes: float, cpu_bytes: float, gpu_gbps: float | None,
                   cpu_gbps: float | None) -> float | None:
    """tok/s ≈ 1 / (bytes on GPU / GPU bandwidth + bytes on CPU / CPU bandwidth); None when a side that
    holds weights has no known bandwidth."""
    seconds = 0.0
    if gpu_bytes:
        if not gpu_gbps:
            return None
        seconds += gpu_bytes / (gpu_gbps * 1e9)
    if cpu_bytes:
        if not cpu_gbps:
            return None
        seconds += cpu_bytes / (cpu_gbps * 1e9)
    return 1.0 / seconds if seconds else None
