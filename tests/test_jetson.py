"""Jetson: no NVML, one memory for CPU and GPU. A recorded Orin (device tree + /proc/meminfo) gives a plan that
uses the GPU and splits the unified memory as one budget (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_profile, write_registry
from wrapper import settings
from wrapper.model import gguf_meta
from wrapper.plan import hardware, placement

ORIN = REPO / "tests" / "data" / "jetson_orin_64gb"
HOST = {"cpu_model": "ARMv8 Processor rev 1 (v8l)", "cpu_cores_logical": 12, "cpu_cores_usable": 12,
        "ram_total_mib": 62827, "ram_available_mib": 59805}


def test_orin_from_the_device_tree_and_meminfo() -> None:
    fields = hardware.jetson_fields(ORIN)
    assert fields is not None and fields["unified_memory"] is True
    [gpu] = fields["gpus"]
    assert gpu.name.startswith("Jetson Orin") and gpu.compute_capability == "8.7"
    assert gpu.vram_total_mib == 64335412 // 1024 and gpu.vram_free_mib == 61240996 // 1024


def test_detect_falls_back_to_the_device_tree_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "read_nvml", lambda: {"error": "NVML unavailable: libnvidia-ml.so not found"})
    original = hardware.jetson_fields
    monkeypatch.setattr(hardware, "jetson_fields", lambda root=ORIN: original(ORIN))
    hw = hardware.detect()
    assert hw.unified_memory and len(hw.gpus) == 1 and hw.gpu_note is None
    hidden = hardware.detect("-1")  # CUDA_VISIBLE_DEVICES=-1 hides the GPU on a Jetson too
    assert hidden.gpus == [] and not hidden.unified_memory


def test_recorded_orin_plans_the_gpu_with_unified_memory_as_one_budget(tmp_path: Path, tiny_dense: Path) -> None:
    """Regression: without NVML a Jetson was planned CPU-only although its profile says n_gpu_layers: all."""
    fields = hardware.jetson_fields(ORIN)
    assert fields is not None
    hw = hardware.Hardware(**fields, **HOST)
    registry = write_registry(tmp_path / "p.yaml", {"j": tiny_profile(tiny_dense, 18080, n_gpu_layers="all")})
    s = settings.build("j", str(registry), environ={})
    inp, notes = placement.inputs_for(s, hw)
    pool = min(61240996 // 1024, HOST["ram_available_mib"])
    assert inp.vram_mib == [int(pool * placement.UNIFIED_GPU_SHARE)]
    assert inp.vram_mib[0] + (inp.ram_mib or 0) == pool  # one budget, never counted twice
    assert any("unified memory" in n for n in notes)
    p = placement.plan(gguf_meta.read_local(tiny_dense), inp)
    assert p.verdict == "ship" and p.n_gpu_layers >= placement.NGL_ALL_PLANNED
    gpu = next(d for d in p.devices if d.device != "CPU")
    assert gpu.weights_mib > 0
