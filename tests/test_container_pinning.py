"""Fleet containers: the profile pins the GPU, claims cross containers by GPU UUID, the build's CUDA
architectures are checked against the pinned GPU, and the image's entrypoint runs any subcommand.

No Docker engine needed: compose files go through the real Compose loader (as in test_container.py), the
wrapper's own view through `wrapper flags --json` with the container's environment, GPUs through recorded
NVML readings. scripts/container-e2e.sh does the same under a real engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, free_port, tiny_profile, write_registry
from tests.supervisor_fixtures import fake_binary
from tests.test_container import ENTRYPOINT_SCRIPT, compose_bin, compose_config, image_env, instructions, stack
from wrapper import settings
from wrapper.cli import LAZY_COMMANDS
from wrapper.errors import BinaryError, ConfigError, exit_code_for
from wrapper.launch import cuda_arch, preflight
from wrapper.plan import hardware

__all__ = ["compose_bin", "stack"]  # fixtures shared with test_container.py

READING = json.loads((REPO / "tests" / "data" / "nvml_2x4090.json").read_text())
GPU1_UUID = READING["devices"][1]["uuid"]


# --- the pin under compose, as the wrapper sees it --------------------------------------------------------


def flags_in_container(tmp: Path, container_env: dict[str, str], model: Path) -> dict[str, Any]:
    registry = write_registry(tmp / "profiles.yaml", {
        "on-gpu1": {**tiny_profile(model, free_port()), "gpu": {"device_ids": [1]}},
    })
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "LLAMACPP_", "WRAPPER_", "CUDA_"))}
    env.update(container_env)
    env.update({"LLAMA_SERVER_BIN": str(fake_binary(tmp)), "WRAPPER_STATE_DIR": str(tmp / "state"),
                "LLM_CACHE_DIR": str(tmp / "models"), "LLM_PROFILES_CONFIG_PATH": str(registry)})
    done = subprocess.run([sys.executable, "-m", "wrapper", "flags", "--profile", "on-gpu1", "--json"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_profile_pins_the_gpu_under_compose(compose_bin: str, stack: Path, tmp_path: Path, tiny_dense: Path) -> None:
    code, data, err = compose_config(compose_bin, stack, {"LLM_PROFILE_NAME": "on-gpu1"})
    assert code == 0 and data is not None, err
    llm = data["services"]["llm"]
    (device,) = llm["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == -1  # every GPU: container indices are the host's
    view = flags_in_container(tmp_path, llm["environment"], tiny_dense)
    assert view["cuda_visible_devices"] == {"value": "1", "origin": "profile"}
    assert view["env"].get("CUDA_VISIBLE_DEVICES") == "1"


def test_an_override_in_the_service_env_file_still_wins(
    compose_bin: str, stack: Path, tmp_path: Path, tiny_dense: Path
) -> None:
    (stack / "service.env").write_text("LLM_PROFILE_NAME=on-gpu1\nCUDA_VISIBLE_DEVICES_OVERRIDE=0\n")
    code, data, err = compose_config(compose_bin, stack, {})
    assert code == 0 and data is not None, err
    view = flags_in_container(tmp_path, data["services"]["llm"]["environment"], tiny_dense)
    assert view["cuda_visible_devices"] == {"value": "0", "origin": "env:CUDA_VISIBLE_DEVICES_OVERRIDE"}


def test_every_instance_mounts_the_host_wide_claim_volume(compose_bin: str, stack: Path) -> None:
    code, data, err = compose_config(compose_bin, stack, {}, "--profile", "second", "--profile", "benchmarks")
    assert code == 0 and data is not None, err
    for name in ("llm", "llm2", "bench"):
        mounts = {v["target"]: v["source"] for v in data["services"][name]["volumes"]}
        assert mounts["/run/wrapper"] == "wrapper-instances", name
    assert data["volumes"]["wrapper-instances"]["name"] == "wrapper-instances"  # not project-prefixed
    assert image_env()["WRAPPER_RUNTIME_DIR"] == "/run/wrapper"


@pytest.mark.parametrize(("policy", "expected"), [(None, "on-failure:3"), ("unless-stopped", "unless-stopped")])
def test_restarts_are_bounded_unless_asked_otherwise(
    compose_bin: str, stack: Path, policy: str | None, expected: str
) -> None:
    env = {"LLM_RESTART_POLICY": policy} if policy else {}
    code, data, err = compose_config(compose_bin, stack, env, "--profile", "second")
    assert code == 0 and data is not None, err
    assert data["services"]["llm"]["restart"] == data["services"]["llm2"]["restart"] == expected


# --- GPU claims by UUID -------------------------------------------------------------------------------------


def _settings(tmp: Path, name: str, pin: str | None, runtime: Path) -> settings.Settings:
    registry = write_registry(tmp / f"{name}.yaml", {name: tiny_profile(tmp / "m.gguf", free_port())})
    environ = {"WRAPPER_RUNTIME_DIR": str(runtime), "WRAPPER_STATUS_PORT": "0", "PATH": os.environ["PATH"]}
    if pin is not None:
        environ["CUDA_VISIBLE_DEVICES_OVERRIDE"] = pin
    return settings.build(name, str(registry), environ=environ)


def _host(pin: str | None, reading: dict[str, Any] = READING) -> hardware.Hardware:
    return hardware.from_reading(reading, pin)


def test_one_gpu_spelt_two_ways_is_one_claim(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """Container-local indices cannot collide: a pin by index and one by UUID name the same GPU."""
    runtime = tmp_path / "run"
    first = _settings(tmp_path, "by-index", "1", runtime)
    with preflight.claim(first, _host("1")) as held:
        assert held.needs.devices == (GPU1_UUID,)
        second = _settings(tmp_path, "by-uuid", GPU1_UUID[:12], runtime)
        with pytest.raises(ConfigError, match=rf"CUDA device {GPU1_UUID} \(CUDA_VISIBLE_DEVICES=GPU-9a8b7c6d\): "
                           r"already pinned by wrapper instance 'by-index'") as refused:
            preflight.claim(second, _host(GPU1_UUID[:12]))
        assert exit_code_for(refused.value) == 2
        other = _settings(tmp_path, "other-gpu", "0", runtime)
        with preflight.claim(other, _host("0")):
            pass


def test_a_host_without_the_gpu_never_blocks(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """Regression: on a GPU-less host a claim on "device 0" blocked unrelated profiles."""
    runtime = tmp_path / "run"
    no_gpu = {"error": "NVML unavailable: NVML Shared Library Not Found"}
    with preflight.claim(_settings(tmp_path, "a", "0", runtime), _host("0", no_gpu)) as held:
        assert held.needs.devices == ()
        with preflight.claim(_settings(tmp_path, "b", "0", runtime), _host("0", no_gpu)):
            pass
        # A pin to a GPU this two-GPU host does not have claims nothing either.
        with preflight.claim(_settings(tmp_path, "c", "3", runtime), _host("3")) as third:
            assert third.needs.devices == ()


# --- the build's CUDA architectures against the pinned GPU ----------------------------------------------------


@pytest.mark.parametrize(
    ("info", "gpu", "ok"),
    [
        ("CUDA_ARCHITECTURES=86-real;89-real", "8.9", True),
        ("CUDA_ARCHITECTURES=86-real;89-real", "12.0", False),  # an RTX 5090 on a pre-Blackwell build
        ("CUDA_ARCHITECTURES=120-real", "8.9", False),  # a Blackwell-only build on an RTX 4090
        ("CUDA_ARCHITECTURES=80-virtual;89-real", "12.0", True),  # PTX the driver compiles
        ("CUDA_ARCHITECTURES=87-real", "8.6", False),  # SASS runs on minor >= its own only
        ("CUDA_ARCHITECTURES=86-real", "8.9", True),
        ("CUDA_ARCHITECTURES=120a-real", "12.1", False),  # arch-specific: that GPU only
        ("system_info: CUDA : ARCHS = 500,610,700,750,800,860,890 | USE_GRAPHS = 1", "12.0", True),
        ("system_info: CUDA : ARCHS = 1200", "8.9", False),
    ],
)
def test_build_architectures_against_compute_capability(tmp_path: Path, info: str, gpu: str, ok: bool) -> None:
    binary = tmp_path / "llama-server"
    cuda_arch.build_info_path(str(binary)).write_text(info + "\n")
    if ok:
        cuda_arch.check(str(binary), [("GPU", gpu)])
    else:
        with pytest.raises(BinaryError, match=rf"none of which runs on the pinned GPU \(compute capability {gpu}\)"):
            cuda_arch.check(str(binary), [("GPU", gpu)])


def test_unknown_architectures_are_said_not_refused(tmp_path: Path) -> None:
    note = cuda_arch.check(str(tmp_path / "llama-server"), [("GPU", "12.0")])
    assert note is not None and "unknown" in note


def test_ptx_only_match_is_noted(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    cuda_arch.build_info_path(str(binary)).write_text("CUDA_ARCHITECTURES=80-virtual;89-real\n")
    note = cuda_arch.check(str(binary), [("RTX 5090", "12.0")])
    assert note is not None and "PTX" in note


def test_serve_refuses_a_build_without_kernels_for_the_pinned_gpu(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, tiny_dense: Path
) -> None:
    """Exit 2 with one line before any download or launch, instead of llama-server crashing at load."""
    binary = fake_binary(tmp_path)
    cuda_arch.build_info_path(str(binary)).write_text("CUDA_ARCHITECTURES=120-real\n")
    registry = write_registry(tmp_path / "profiles.yaml", {
        "on-4090": {**tiny_profile(tiny_dense, free_port(), n_gpu_layers="all"), "gpu": {"device_ids": [1]}},
    })
    env = {**os.environ, "LLAMA_SERVER_BIN": str(binary), "WRAPPER_RUNTIME_DIR": str(tmp_path / "run")}
    shim = REPO / "tests" / "fakes" / "with_nvml.py"
    done = subprocess.run([sys.executable, str(shim), str(REPO / "tests/data/nvml_2x4090.json"), str(tmp_path / "n"),
                           "serve", "--profile", "on-4090", "--config", str(registry)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "none of which runs on the pinned NVIDIA GeForce RTX 4090 (compute capability 8.9)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "run").glob("instance-*.json"))


def test_jetson_gpu_from_the_device_tree(tmp_path: Path) -> None:
    tree = tmp_path / "proc" / "device-tree"
    tree.mkdir(parents=True)
    (tree / "compatible").write_bytes(b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0")
    assert hardware.tegra_gpu(tmp_path) == ("Jetson Orin (integrated GPU)", "8.7")
    assert hardware.tegra_gpu(tmp_path / "nowhere") is None


# --- the image: entrypoint and layers ---------------------------------------------------------------------


def test_entrypoint_knows_every_wrapper_command() -> None:
    line = next(ln for ln in ENTRYPOINT_SCRIPT.read_text().splitlines() if ln.startswith("COMMANDS="))
    assert set(line.split("=", 1)[1].strip('"').split()) == set(LAZY_COMMANDS)


@pytest.mark.parametrize(
    ("args", "ran"),
    [
        ([], "wrapper serve"),
        (["--profile", "tiny-dense"], "wrapper serve --profile tiny-dense"),
        (["hw"], "wrapper hw"),
        (["plan", "--profile", "x", "--json"], "wrapper plan --profile x --json"),
        (["wrapper", "hw", "--json"], "wrapper hw --json"),
        (["echo", "as given"], "as given"),
    ],
)
def test_entrypoint_runs_serve_by_default_and_any_subcommand(tmp_path: Path, args: list[str], ran: str) -> None:
    fake = tmp_path / "wrapper"
    fake.write_text('#!/bin/sh\necho "wrapper $*"\n')
    fake.chmod(0o755)
    done = subprocess.run([str(ENTRYPOINT_SCRIPT), *args], env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ran


def test_dependency_layer_is_independent_of_readme_and_code() -> None:
    items = instructions()
    deps_from = next(i for i, (w, r) in enumerate(items) if w == "FROM" and r.endswith("AS deps"))
    deps_end = next(i for i, (w, r) in enumerate(items) if w == "FROM" and r.endswith("AS project"))
    copies = [r for w, r in items[deps_from:deps_end] if w == "COPY" and not r.startswith("--from")]
    assert copies == ["pyproject.toml uv.lock ./"]
    sync = next(r for w, r in items[deps_from:deps_end] if w == "RUN" and "uv sync" in r)
    assert "--no-install-project" in sync and "--frozen" in sync
    assert "UV_COMPILE_BYTECODE=1" in next(r for w, r in items[deps_from:deps_end] if w == "ENV")
    # The runtime takes the dependencies whole, then only the project's own files.
    runtime = items[next(i for i, (w, r) in enumerate(items) if w == "FROM" and r.endswith("AS runtime")) :]
    assert ("COPY", "--from=deps /opt/wrapper/venv /opt/wrapper/venv") in runtime
    assert ("COPY", "--from=project /stage/ /opt/wrapper/venv/") in runtime


def test_image_user_and_group_are_10001_and_no_frontend_is_pulled() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert not text.startswith("# syntax=") and "\n# syntax=" not in text
    assert "ARG WRAPPER_UID=10001" in text
    assert 'groupadd --system --gid "${WRAPPER_UID}" wrapper' in text
    assert '--uid "${WRAPPER_UID}" --gid "${WRAPPER_UID}"' in text
    # The CA bundle is a build secret of the build stages, never a layer of the runtime.
    assert text.count("--mount=type=secret,id=ca_bundle") == 2
    runtime = text[text.index("AS runtime") :]
    assert "ca_bundle" not in runtime
