"""Hardware profile: recorded NVML readings, CUDA_VISIBLE_DEVICES, cgroups, no NVML, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from wrapper.cli import main
from wrapper.plan import hardware

DATA = Path(__file__).parent / "data"
HOST = {"cpu_model": "Test CPU", "cpu_cores_logical": 16, "cpu_cores_usable": 16, "ram_total_mib": 65536,
        "ram_available_mib": 60000}


def reading(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / f"nvml_{name}.json").read_text())
    return data


def test_recorded_reading_gives_every_field() -> None:
    hw = hardware.from_reading(reading("2x4090"), None, **HOST)
    assert [g.index for g in hw.gpus] == [0, 1]
    g = hw.gpus[0]
    assert (g.name, g.vram_total_mib, g.vram_free_mib, g.vram_reserved_mib) == (
        "NVIDIA GeForce RTX 4090", 24564, 24049, 318)
    assert g.compute_capability == "8.9"
    assert (hw.gpus[1].pcie_gen, hw.gpus[1].pcie_width) == (3, 8)
    assert g.mem_bandwidth_peak_gbps == pytest.approx(1008.1, abs=0.1)
    assert (hw.driver_version, hw.cuda_version) == ("550.54.15", "12.4")


def test_old_driver_unknowns_stay_null() -> None:
    hw = hardware.from_reading(reading("old_driver"), None, **HOST)
    g = hw.gpus[0]
    assert g.vram_reserved_mib is None and g.pcie_gen is None and g.mem_bandwidth_peak_gbps is None
    assert json.loads(hw.model_dump_json())["gpus"][0]["vram_reserved_mib"] is None


@pytest.mark.parametrize(("visible", "indices", "noted"), [
    (None, [0, 1], False),
    ("1", [1], False),
    ("1,0", [1, 0], False),
    ("GPU-9a8b", [1], False),
    ("GPU-", [], True),  # ambiguous prefix: CUDA refuses it, so do we
    ("0,7,1", [0], True),  # CUDA stops at the first unknown entry
    ("", [], True),
    ("-1", [], True),
])
def test_cuda_visible_devices(visible: str | None, indices: list[int], noted: bool) -> None:
    hw = hardware.from_reading(reading("2x4090"), visible, **HOST)
    assert [g.index for g in hw.gpus] == indices
    assert (hw.gpu_note is not None) == noted


def test_no_nvml_is_a_cpu_only_profile() -> None:
    hw = hardware.from_reading({"error": "NVML unavailable: NVML Shared Library Not Found"}, None, **HOST)
    assert hw.gpus == [] and "CPU-only" in (hw.gpu_note or "")
    live = hardware.detect()  # this machine: no GPU driver; must not raise
    assert live.ram_total_mib and live.cpu_cores_logical


def test_fingerprint_ignores_free_memory_and_tracks_the_machine() -> None:
    a = hardware.from_reading(reading("2x4090"), None, **HOST)
    busier = reading("2x4090")
    busier["devices"][0]["memory"]["free"] = 1 << 30
    b = hardware.from_reading(busier, None, **{**HOST, "ram_available_mib": 100})
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != hardware.from_reading(reading("2x4090"), "0", **HOST).fingerprint
    assert a.fingerprint != hardware.from_reading(reading("2x4090"), None, **{**HOST, "cpu_model": "x"}).fingerprint


def test_cgroup_v2_and_v1_limits(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")
    (v2 / "memory.current").write_text("1073741824\n")
    assert hardware.cgroup_memory(v2) == (8192, 1024)
    (v2 / "memory.max").write_text("max\n")
    assert hardware.cgroup_memory(v2) == (None, 1024)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("0\n")
    assert hardware.cgroup_memory(v1) == (None, 0)
    hw = hardware.Hardware(ram_available_mib=60000, cgroup_limit_mib=8192, cgroup_used_mib=1024)
    assert hw.ram_budget_mib == 7168


def test_measured_bandwidth_is_positive() -> None:
    assert hardware.measure_cpu_bandwidth(size_mib=16, repeats=2) > 0.1


def test_hw_cli_json(clean_env: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(main, ["hw", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["fingerprint"]) == 16 and data["cpu_bandwidth_gbps"] is None
    text = CliRunner().invoke(main, ["hw"])
    assert text.exit_code == 0 and "fingerprint" in text.output and "not measured" in text.output


def test_recorded_h200_reading() -> None:
    # Recorded on a lent GPU machine (benchmarks/gpu/nvml_dump.py): NVML v2 memory info reports the
    # driver's reservation separately; the peak bandwidth from clock x bus width matches the H200's 4.8 TB/s.
    reading = json.loads((DATA / "nvml_h200.json").read_text())
    hw = hardware.from_reading(reading)
    (gpu,) = hw.gpus
    assert gpu.name == "NVIDIA H200" and gpu.compute_capability == "9.0"
    assert gpu.vram_total_mib == 143771 and gpu.vram_reserved_mib == 615 and gpu.vram_used_mib == 0
    assert (gpu.pcie_gen, gpu.pcie_width) == (5, 16)
    assert gpu.mem_bandwidth_peak_gbps == pytest.approx(4814, rel=0.01)
    assert hw.cuda_version == "13.0" and hw.driver_version == "580.159.04"
    hidden = hardware.from_reading(reading, visible="")
    assert hidden.gpus == [] and hidden.fingerprint != hw.fingerprint
