"""This machine's hardware profile: GPUs (NVML), CPU, RAM, the container's cgroup limit, a fingerprint.

NVML is read into a plain "reading" dict first (`read_nvml`), and `from_reading` turns a reading into the
model, so recorded readings (tests/data/nvml_*.json) exercise the same path as a live GPU. Values that
were not measured stay None: the planner then says what it does not know rather than guessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from wrapper import warm

if TYPE_CHECKING:
    from wrapper.events.payloads import HardwareSummary
    from wrapper.settings import Settings

log = logging.getLogger("wrapper.hardware")

MIB = 1 << 20
# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
_V1_UNLIMITED = 1 << 60


class Gpu(BaseModel):
    index: int  # NVML index (PCI bus order)
    uuid: str | None = None
    name: str
    vram_total_mib: int | None = None
    vram_free_mib: int | None = None
    vram_used_mib: int | None = None
    vram_reserved_mib: int | None = None  # driver-reserved (NVML v2 memory info); None on older drivers
    compute_capability: str | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    # Peak from NVML's memory clock and bus width: a device-reported ceiling, not a measurement.
    mem_bandwidth_peak_gbps: float | None = None


class Hardware(BaseModel):
    gpus: list[Gpu] = []
    gpu_note: str | None = None  # why there are no GPUs (no NVML, no devices, CUDA_VISIBLE_DEVICES hides them)
    visible_devices: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    cpu_model: str | None = None
    cpu_cores_logical: int | None = None
    cpu_cores_physical: int | None = None
    cpu_cores_usable: int | None = None  # scheduler affinity: what this process may actually use
    ram_total_mib: int | None = None
    ram_available_mib: int | None = None
    cgroup_limit_mib: int | None = None
    cgroup_used_mib: int | None = None
    cpu_bandwidth_gbps: float | None = None  # measured only (--measure-bandwidth)
    # Jetson: the integrated GPU and the CPU share one memory (the GPU entry's size is that pool); the planner
    # splits one budget between them instead of adding a VRAM budget to a RAM budget.
    unified_memory: bool = False

    @property
    def ram_budget_mib(self) -> int | None:
        """RAM this process can still use: host available, capped by the cgroup's remaining room."""
        budget = self.ram_available_mib
        if self.cgroup_limit_mib is not None:
            room = self.cgroup_limit_mib - (self.cgroup_used_mib or 0)
            budget = room if budget is None else min(budget, room)
        return budget

    @property
    def fingerprint(self) -> str:
        """Stable across runs: what the machine is, not how busy it is (no free memory in it)."""
        ram_gib = round((self.cgroup_limit_mib or self.ram_total_mib or 0) / 1024)
        ident = {
            "gpus": [[g.name, g.vram_total_mib] for g in self.gpus],
            "cpu": self.cpu_model,
            "cores": self.cpu_cores_usable or self.cpu_cores_logical,
            "ram_gib": ram_gib,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        data = self.model_dump()
        data["fingerprint"] = self.fingerprint
        data["ram_budget_mib"] = self.ram_budget_mib
        return data


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # any NVML call may be unsupported on a given GPU/driver
        return None


def read_nvml() -> dict[str, Any]:
    """A raw NVML reading (the format of tests/data/nvml_*.json), or {"error": why} without NVML."""
    # NVML talks to the driver through its device nodes: without one no GPU can be read, and importing NVML's
    # bindings is skipped (they cost a GPU-less host ~15 ms of every start, before llama-server's exec).
    if not warm.nvidia_driver():
        return {"error": f"NVML unavailable: no NVIDIA driver device ({' or '.join(warm.DRIVER_NODES)})"}
    try:
        import pynvml
    except ImportError:
        return {"error": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"error": f"NVML unavailable: {exc}"}
    try:
        reading: dict[str, Any] = {
            "driver_version": _safe(pynvml.nvmlSystemGetDriverVersion),
            "cuda_driver_version": _safe(pynvml.nvmlSystemGetCudaDriverVersion),
            "devices": [],
        }
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = _safe(lambda h=h: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2))
            v2 = mem is not None
            mem = mem or _safe(pynvml.nvmlDeviceGetMemoryInfo, h)
            cc = _safe(pynvml.nvmlDeviceGetCudaComputeCapability, h)
            reading["devices"].append({
                "index": i,
                "uuid": _safe(pynvml.nvmlDeviceGetUUID, h),
                "name": _safe(pynvml.nvmlDeviceGetName, h),
                "memory": None if mem is None else {
                    "total": mem.total, "free": mem.free, "used": mem.used,
                    "reserved": mem.reserved if v2 else None,
                },
                "cuda_capability": list(cc) if cc else None,
                "pcie_gen": _safe(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
                "pcie_width": _safe(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h),
                "pcie_gen_max": _safe(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                "pcie_width_max": _safe(pynvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                "mem_bus_width": _safe(pynvml.nvmlDeviceGetMemoryBusWidth, h),
                "mem_clock_max_mhz": _safe(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
            })
        return reading
    except pynvml.NVMLError as exc:
        return {"error": f"NVML query failed: {exc}"}
    finally:
        _safe(pynvml.nvmlShutdown)


def select_visible(devices: list[dict[str, Any]], visible: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """Apply CUDA_VISIBLE_DEVICES (indices or GPU-UUID prefixes, in the listed order) like the CUDA runtime.

    CUDA stops at the first entry it cannot resolve; so do we. Indices are matched against NVML's PCI-bus
    order, which is CUDA's order only with CUDA_DEVICE_ORDER=PCI_BUS_ID (the usual container setting).
    """
    if visible is None:
        return devices, None
    chosen: list[dict[str, Any]] = []
    for entry in (e.strip() for e in visible.split(",")):
        match = None
        if entry.lstrip("-").isdigit():
            match = next((d for d in devices if d.get("index") == int(entry)), None)
        elif entry.startswith("GPU-"):
            hits = [d for d in devices if str(d.get("uuid") or "").startswith(entry)]
            match = hits[0] if len(hits) == 1 else None
        if match is None or match in chosen:
            note = f"CUDA_VISIBLE_DEVICES={visible!r}: entry {entry!r} matches no GPU; later entries are ignored"
            return chosen, note if entry else None
        chosen.append(match)
    return chosen, None


# Jetson modules have no NVML: the SoC in the device tree names the integrated GPU's compute capability.
_TEGRA_GPUS = {
    "nvidia,tegra234": ("Jetson Orin (integrated GPU)", "8.7"),
    "nvidia,tegra194": ("Jetson Xavier (integrated GPU)", "7.2"),
    "nvidia,tegra186": ("Jetson TX2 (integrated GPU)", "6.2"),
    "nvidia,tegra210": ("Jetson Nano/TX1 (integrated GPU)", "5.3"),
}


def tegra_gpu(root: Path = Path("/")) -> tuple[str, str] | None:
    """(name, compute capability) of a Jetson's integrated GPU from the device tree; None elsewhere."""
    try:
        compatible = (root / "proc/device-tree/compatible").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in compatible:
        found = _TEGRA_GPUS.get(entry.decode(errors="replace").strip())
        if found:
            return found
    return None


def jetson_fields(root: Path = Path("/")) -> dict[str, Any] | None:
    """Hardware's GPU fields on a Jetson (no NVML there): the integrated GPU from the device tree, sized by the
    one memory it shares with the CPU (/proc/meminfo). None elsewhere."""
    tegra = tegra_gpu(root)
    if tegra is None:
        return None
    meminfo: dict[str, int] = {}
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB") and rest.split()[0].isdigit():
                meminfo[key] = int(rest.split()[0]) // 1024
    except OSError:
        pass
    name, cc = tegra
    gpu = Gpu(index=0, name=name, vram_total_mib=meminfo.get("MemTotal"), vram_free_mib=meminfo.get("MemAvailable"),
              compute_capability=cc)
    return {"gpus": [gpu], "gpu_note": None, "unified_memory": True}


def _mib(v: Any) -> int | None:
    return None if v is None else int(v) // MIB


def _gpu(d: dict[str, Any]) -> Gpu:
    mem = d.get("memory") or {}
    cc = d.get("cuda_capability")
    bus, clock = d.get("mem_bus_width"), d.get("mem_clock_max_mhz")
    # Double data rate: bytes/s = clock * 2 transfers * bus bits / 8.
    peak = round(clock * 1e6 * 2 * bus / 8 / 1e9, 1) if bus and clock else None
    name = d.get("name")
    return Gpu(
        index=int(d.get("index", 0)),
        uuid=d.get("uuid"),
        name=name.decode() if isinstance(name, bytes) else str(name or "unknown GPU"),
        vram_total_mib=_mib(mem.get("total")),
        vram_free_mib=_mib(mem.get("free")),
        vram_used_mib=_mib(mem.get("used")),
        vram_reserved_mib=_mib(mem.get("reserved")),
        compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        pcie_gen=d.get("pcie_gen"),
        pcie_width=d.get("pcie_width"),
        pcie_gen_max=d.get("pcie_gen_max"),
        pcie_width_max=d.get("pcie_width_max"),
        mem_bandwidth_peak_gbps=peak,
    )


def gpus_from_reading(reading: dict[str, Any], visible: str | None) -> dict[str, Any]:
    """The GPU part of Hardware's fields from a raw NVML reading."""
    if "error" in reading:
        return {"gpus": [], "gpu_note": f"{reading['error']}: CPU-only profile", "visible_devices": visible}
    devices, note = select_visible(list(reading.get("devices", [])), visible)
    if not devices and note is None:
        note = "no GPU visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    cuda = reading.get("cuda_driver_version")
    return {
        "gpus": [_gpu(d) for d in devices],
        "gpu_note": note,
        "visible_devices": visible,
        "driver_version": reading.get("driver_version"),
        "cuda_version": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, used) in MiB from cgroup v2, else v1; None when unlimited or not in a cgroup."""
    limit = _read_int(root / "memory.max")
    used = _read_int(root / "memory.current")
    if limit is None and used is None:
        limit = _read_int(root / "memory" / "memory.limit_in_bytes")
        used = _read_int(root / "memory" / "memory.usage_in_bytes")
        if limit is not None and limit >= _V1_UNLIMITED:
            limit = None
    return (None if limit is None else limit // MIB), (None if used is None else used // MIB)


def host_fields(cgroup_root: Path = Path("/sys/fs/cgroup")) -> dict[str, Any]:
    import psutil  # imported here: a plain `wrapper serve` measures the host only after llama-server started

    vm = psutil.virtual_memory()
    limit, used = cgroup_memory(cgroup_root)
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_usable": usable,
        "ram_total_mib": vm.total // MIB,
        "ram_available_mib": vm.available // MIB,
        "cgroup_limit_mib": limit,
        "cgroup_used_mib": used if limit is not None else None,
    }


def measure_cpu_bandwidth(size_mib: int = 256, repeats: int = 5) -> float:
    """Best-of-N numpy copy: bytes read + bytes written per second, in GB/s (a quick, honest floor)."""
    import numpy as np

    src = np.ones(size_mib * MIB // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return round(2 * src.nbytes / best / 1e9, 2)


def from_reading(reading: dict[str, Any], visible: str | None = None, **host: Any) -> Hardware:
    """A Hardware from a recorded NVML reading plus (optionally) given host fields."""
    return Hardware(**gpus_from_reading(reading, visible), **host)


def detect(visible: str | None = None, measure_bandwidth: bool = False) -> Hardware:
    """This machine now. `visible` is the CUDA_VISIBLE_DEVICES the child will get (None: all)."""
    reading = read_nvml()
    gpu_fields = gpus_from_reading(reading, visible)
    if "error" in reading and visible not in ("", "-1"):
        gpu_fields = jetson_fields() or gpu_fields  # Jetson has no NVML; its GPU is in the device tree
    hw = Hardware(**gpu_fields, **host_fields())
    if measure_bandwidth:
        hw = hw.model_copy(update={"cpu_bandwidth_gbps": measure_cpu_bandwidth()})
    log.debug("hardware %s: %d GPU(s), %s", hw.fingerprint, len(hw.gpus), hw.gpu_note or "")
    return hw


def for_settings(s: Settings, measure_bandwidth: bool = False) -> Hardware:
    """This machine as the profile's llama-server will see it: GPUs filtered by the one CUDA_VISIBLE_DEVICES
    decision (settings.visible_devices), so every consumer gets the same fingerprint. The CPU bandwidth is
    the one measured on this host before (state dir), unless measured now (then it is kept for later)."""
    hw = detect(s.cuda_visible_devices, measure_bandwidth)
    return with_host_facts(hw, s.env.state_path())


HOST_FACTS = "host-facts.json"


def with_host_facts(hw: Hardware, state_dir: Path) -> Hardware:
    """Keep a fresh CPU bandwidth measurement for this fingerprint, or fill it in from an earlier one.

    Regression: 33 receipts in one afternoon had predicted_tok_s null because the bandwidth measured by
    `plan --measure-bandwidth` died with that command, and every later plan had no CPU ceiling."""
    path = state_dir / HOST_FACTS
    if hw.cpu_bandwidth_gbps is not None:
        remember(path, hw.fingerprint, cpu_bandwidth_gbps=hw.cpu_bandwidth_gbps)
        return hw
    known = remembered(path, hw.fingerprint).get("cpu_bandwidth_gbps")
    if isinstance(known, int | float) and known > 0:
        return hw.model_copy(update={"cpu_bandwidth_gbps": float(known)})
    return hw


def remembered(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    facts = data.get(fingerprint) if isinstance(data, dict) else None
    return facts if isinstance(facts, dict) else {}


def remember(path: Path, fingerprint: str, **facts: Any) -> None:
    """Merge measured facts into the host-facts file (atomic replace; last writer wins per key)."""
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    found = data.get(fingerprint)
    entry: dict[str, Any] = found if isinstance(found, dict) else {}
    entry.update(facts, measured_at=time.time())
    data[fingerprint] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # a read-only state dir costs the memory of the figure, not the command
        log.warning("could not keep host facts in %s: %s", path, exc)


def event_summary(hw: Hardware) -> HardwareSummary:
    """The hardware block of every event, from the host measured once (same fingerprint as the tuning store)."""
    from wrapper.events.payloads import HardwareSummary

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
    ram = hw.ram_total_mib * MIB if hw.ram_total_mib else None
    return HardwareSummary(arch=platform.machine(), cpu_count=hw.cpu_cores_usable or os.cpu_count() or 1,
                           ram_bytes=ram, gpus=gpus, cuda=hw.cuda_version, capabilities=list(dict.fromkeys(caps)),
                           fingerprint=hw.fingerprint)
