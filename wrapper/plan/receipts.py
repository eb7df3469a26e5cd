"""Receipts: measured vs predicted decode speed and memory, per hardware fingerprint.

The roofline ceiling is an upper bound; real decode reaches a fraction of it that depends on the machine
and the build. After a self-check or a bench cell the caller records a receipt; later plans for the same
fingerprint turn the recorded fractions into a forecast band and say how many receipts back it.
Stored as JSON lines under the state directory (append-only, one writer at a time via a file lock).
"""

from __future__ import annotations

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
                       hw: Hardware | None = None) -> Receipt | None:
    """Plan the effective settings on this hardware and record the measured per-stream decode rate beside
    the plan's ceiling. Best effort: a receipt that cannot be computed is skipped with a debug line."""
    from wrapper.model import gguf_meta
    from wrapper.plan import hardware, placement

    try:
        hw = hw or hardware.detect(settings.cuda_visible_devices)
        inp, _ = placement.inputs_for(settings, hw)
        p = placement.plan(gguf_meta.read_local(model_file), inp, explore=False)
        return record(path_in(settings.env.state_path()), Receipt(
            fingerprint=hw.fingerprint, model=model_file.name, kind=kind, n_gpu_layers=p.n_gpu_layers,
            n_cpu_moe=p.n_cpu_moe, ctx=p.ctx, parallel=p.parallel, predicted_tok_s=p.tok_s_ceiling,
            measured_tok_s=measured_tok_s, predicted_mem_mib=round(sum(d.total_mib for d in p.devices), 1)))
    except Exception:
        log.debug("no receipt recorded for %s", model_file.name, exc_info=True)
        return None


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
