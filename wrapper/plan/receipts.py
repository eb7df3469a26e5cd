"""Receipts: measured vs predicted decode speed and memory, per hardware fingerprint.

The roofline ceiling is an upper bound; real decode reaches a fraction of it that depends on the machine
and the build. After a self-check or a bench cell the caller records a receipt; later plans for the same
fingerprint turn the recorded fractions into a forecast band and say how many receipts back it.
Stored as JSON lines under the state directory (append-only, one writer at a time via a file lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from wrapper.plan.hardware import Hardware
    from wrapper.settings import Settings

log = logging.getLogger("wrapper.receipts")

FILE_NAME = "receipts.jsonl"


class Receipt(BaseModel):
    fingerprint: str
    model: str  # file name of the model (first shard)
    kind: str = "selfcheck"  # selfcheck | bench
    n_gpu_layers: int | None = None
    n_cpu_moe: int | None = None
    ctx: int | None = None
    parallel: int | None = None
    predicted_tok_s: float | None = None  # the plan's ceiling
    measured_tok_s: float
    predicted_mem_mib: float | None = None
    measured_mem_mib: float | None = None
    at: float = 0.0

    @property
    def efficiency(self) -> float | None:
        if not self.predicted_tok_s:
            return None
        return self.measured_tok_s / self.predicted_tok_s


class Forecast(BaseModel):
    low_tok_s: float
    mid_tok_s: float
    high_tok_s: float
    receipts: int
    basis: str


def path_in(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def record(file: Path, receipt: Receipt) -> Receipt:
    if not receipt.at:
        receipt = receipt.model_copy(update={"at": time.time()})
    file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(file) + ".lock"), file.open("a") as fh:
        fh.write(receipt.model_dump_json() + "\n")
    return receipt


def record_measurement(settings: Settings, model_file: Path, measured_tok_s: float, *, kind: str,
                       hw: Hardware | None = None, pid: int | None = None) -> Receipt | None:
    """Plan the effective settings on this hardware and record the measured per-stream decode rate and the
    server's peak memory (`pid`: llama-server) beside the plan's ceiling and memory. Best effort: a receipt
    that cannot be computed is skipped with a debug line.

    Regression: receipts had predicted_tok_s null whenever the CPU bandwidth had not been measured by that
    very command; it is now the host's remembered figure, measured here once when there is none."""
    from wrapper.model import gguf_meta
    from wrapper.plan import hardware, placement

    try:
        state = settings.env.state_path()
        hw = hardware.with_host_facts(hw or hardware.detect(settings.cuda_visible_devices), state)
        if hw.cpu_bandwidth_gbps is None:
            measured_bw = hardware.measure_cpu_bandwidth()
            hw = hardware.with_host_facts(hw.model_copy(update={"cpu_bandwidth_gbps": measured_bw}), state)
        inp, _ = placement.inputs_for(settings, hw)
        p = placement.plan(gguf_meta.read_local(model_file), inp, explore=False)
        peak = peak_memory_mib(pid) if pid else None
        return record(path_in(state), Receipt(
            fingerprint=hw.fingerprint, model=model_file.name, kind=kind, n_gpu_layers=p.n_gpu_layers,
            n_cpu_moe=p.n_cpu_moe, ctx=p.ctx, parallel=p.parallel, predicted_tok_s=p.tok_s_ceiling,
            measured_tok_s=measured_tok_s, predicted_mem_mib=round(sum(d.total_mib for d in p.devices), 1),
            measured_mem_mib=peak))
    except Exception:
        log.debug("no receipt recorded for %s", model_file.name, exc_info=True)
        return None


def peak_memory_mib(pid: int) -> float | None:
    """The server's peak memory: resident set high-water mark (VmHWM; current RSS where the kernel has no
    such line) plus what NVML says the process holds on each GPU. None when the process is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        rss = float(proc.memory_info().rss)
    except (psutil.Error, OSError):
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = max(rss, float(line.split()[1]) * 1024)
    except OSError:
        pass
    return round((rss + _gpu_bytes(pid)) / (1 << 20), 1)


def _gpu_bytes(pid: int) -> float:
    """Device memory NVML attributes to pid (0 without NVML or where per-process figures are hidden)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0.0
    total = 0.0
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += float(proc.usedGpuMemory)
    except Exception:  # containers without the host PID namespace see no per-process rows
        log.debug("NVML has no per-process memory for pid %d", pid)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return total


def load(file: Path, fingerprint: str | None = None) -> list[Receipt]:
    if not file.is_file():
        return []
    out = []
    for line in file.read_text().splitlines():
        try:
            r = Receipt.model_validate(json.loads(line))
        except (ValueError, ValidationError):
            continue  # a torn last line from a crash must not hide the others
        if fingerprint is None or r.fingerprint == fingerprint:
            out.append(r)
    return out


def forecast(receipts: list[Receipt], ceiling: float | None, model: str | None = None) -> Forecast | None:
    """Ceiling x the efficiencies measured on this hardware (same model preferred): median and range.

    With fewer than three receipts the band is widened by 15% each way: two points are not a spread.
    """
    if not ceiling:
        return None
    same = [r for r in receipts if r.model == model and r.efficiency]
    pool, scope = (same, "this model") if same else ([r for r in receipts if r.efficiency], "other models")
    effs = sorted(r.efficiency for r in pool if r.efficiency)
    if not effs:
        return None
    lo, mid, hi = effs[0], statistics.median(effs), effs[-1]
    if len(effs) < 3:
        lo, hi = lo * 0.85, hi * 1.15
    return Forecast(
        low_tok_s=round(ceiling * lo, 2), mid_tok_s=round(ceiling * mid, 2), high_tok_s=round(ceiling * hi, 2),
        receipts=len(effs),
        basis=f"{len(effs)} receipt(s) on this hardware ({scope}): {mid:.0%} of the ceiling (median)",
    )
