"""Flag derivation: pure functions, tested with tables of exact argv against recorded `--help` texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wrapper import profiles, settings
from wrapper.errors import BinaryError
from wrapper.launch import flags

DATA = Path(__file__).parent / "data"
NEW = flags.Capabilities.from_help("/bin/llama-server", (DATA / "llama-server-help-new.txt").read_text(), "b-new")
OLD = flags.Capabilities.from_help("/bin/llama-server", (DATA / "llama-server-help-old.txt").read_text(), "b-old")
MODEL = Path("/m/a.gguf")
BASE = ["/bin/llama-server", "--model", "/m/a.gguf", "--host", "127.0.0.1", "--port", "8080"]


def make(llamacpp: dict[str, Any] | None = None, gpu: dict[str, Any] | None = None, **env: str) -> settings.Settings:
    body: dict[str, Any] = {"model_path": str(MODEL), "host": "127.0.0.1", "port": 8080, **(llamacpp or {})}
    profile = profiles.Profile.model_validate({"llamacpp": body, "gpu": gpu or {}})
    reg = profiles.Registry(path=Path("r.yaml"), profiles={"p": profile})
    # No status port: llama-server's --metrics (re-served there) would end every expected argv.
    return settings.build("p", environ={"WRAPPER_STATUS_PORT": "0", **env}, registry=reg)


def argv(s: settings.Settings, caps: flags.Capabilities = NEW) -> list[str]:
    return flags.derive(s, caps, MODEL).argv


def test_capabilities_from_recorded_help() -> None:
    assert NEW.spelling("parallel") == "--parallel" and OLD.spelling("parallel") == "--n-parallel"
    assert NEW.flash_attn_takes_value and not OLD.flash_attn_takes_value
    assert NEW.spelling("load_mode") == "--load-mode" and OLD.spelling("load_mode") is None
    assert NEW.spelling("fit") == "--fit"


@pytest.mark.parametrize(
    ("llamacpp", "expected_tail"),
    [
        ({}, []),
        ({"ctx_size": 4096}, ["--ctx-size", "4096"]),
        ({"parallel": 4, "batch_size": 512, "ubatch_size": 128},
         ["--parallel", "4", "--batch-size", "512", "--ubatch-size", "128"]),
        ({"threads": 8, "threads_batch": 16}, ["--threads", "8", "--threads-batch", "16"]),
        ({"n_gpu_layers": 33}, ["--n-gpu-layers", "33"]),
        ({"n_gpu_layers": "all"}, ["--n-gpu-layers", "999"]),
        ({"n_gpu_layers": "auto"}, ["--fit", "on"]),
        ({"n_gpu_layers": 0, "n_cpu_moe": 12}, ["--n-gpu-layers", "0", "--n-cpu-moe", "12"]),
        ({"cpu_moe": True}, ["--cpu-moe"]),
        ({"flash_attn": "on"}, ["--flash-attn", "on"]),
        ({"flash_attn": False}, ["--flash-attn", "off"]),
        ({"cache_type_k": "q8_0", "cache_type_v": "q4_0"}, ["--cache-type-k", "q8_0", "--cache-type-v", "q4_0"]),
        ({"cont_batching": False}, ["--no-cont-batching"]),
        ({"mlock": True}, ["--load-mode", "mmap+mlock"]),
        ({"mmap": False}, ["--load-mode", "none"]),
        ({"mmap": False, "mlock": True}, ["--load-mode", "mlock"]),
        ({"embeddings": True, "jinja": True}, ["--embeddings", "--jinja"]),
        ({"api_key_file": "/run/secrets/key"}, ["--api-key-file", "/run/secrets/key"]),
        ({"extra_args": ["--metrics", "--slots"]}, ["--metrics", "--slots"]),
    ],
)
def test_exact_argv_new_binary(llamacpp: dict[str, Any], expected_tail: list[str]) -> None:
    assert argv(make(llamacpp)) == BASE + expected_tail


@pytest.mark.parametrize(
    ("llamacpp", "expected_tail"),
    [
        ({"parallel": 2}, ["--n-parallel", "2"]),
        ({"n_gpu_layers": "auto"}, []),
        ({"flash_attn": "on"}, ["--flash-attn"]),
        ({"flash_attn": "off"}, []),
        ({"mlock": True, "mmap": False}, ["--mlock", "--no-mmap"]),
    ],
)
def test_exact_argv_old_binary_spellings(llamacpp: dict[str, Any], expected_tail: list[str]) -> None:
    assert argv(make(llamacpp), OLD) == BASE + expected_tail


def test_unsupported_knob_names_flag_and_version() -> None:
    with pytest.raises(BinaryError) as info:
        argv(make({"n_cpu_moe": 4}), OLD)
    msg = str(info.value)
    assert "llamacpp.n_cpu_moe=4" in msg and "--n-cpu-moe" in msg and "version b-old" in msg


def test_gpu_pinning_and_split() -> None:
    s = make(gpu={"device_ids": [0, 1], "tensor_split": [32, 24]})
    cmd = flags.derive(s, NEW, MODEL)
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert cmd.argv[len(BASE):] == ["--split-mode", "layer", "--tensor-split", "32,24"]
    single = flags.derive(make(gpu={"device_ids": [1]}), NEW, MODEL)
    assert single.env == {"CUDA_VISIBLE_DEVICES": "1"} and single.argv == BASE


def test_cuda_override_beats_profile_pin() -> None:
    cmd = flags.derive(make(gpu={"device_ids": [0]}, CUDA_VISIBLE_DEVICES_OVERRIDE="3"), NEW, MODEL)
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "3"}


def test_env_override_changes_argv_and_origin() -> None:
    cmd = flags.derive(make({"ctx_size": 2048}, LLAMACPP_CTX_SIZE_OVERRIDE="8192"), NEW, MODEL)
    assert cmd.argv[-2:] == ["--ctx-size", "8192"]
    arg = next(a for a in cmd.args if a.flag == "--ctx-size")
    assert arg.origin == "env:LLAMACPP_CTX_SIZE_OVERRIDE"


def test_inherited_llama_arg_variables_are_dropped() -> None:
    cmd = flags.derive(make(LLAMA_ARG_CTX_SIZE="99", LLAMA_API_KEY="k", PATH="/bin"), NEW, MODEL)
    assert cmd.dropped_env == ("LLAMA_API_KEY", "LLAMA_ARG_CTX_SIZE")
    env = flags.full_env(cmd, {"LLAMA_ARG_CTX_SIZE": "99", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        (["x", "--api-key", "sekrit", "--port", "1"], ["x", "--api-key", "***", "--port", "1"]),
        (["x", "--api-key=sekrit"], ["x", "--api-key=***"]),
        (["x", "--hf-token", "hf_x"], ["x", "--hf-token", "***"]),
    ],
)
def test_secrets_redacted_from_argv(given: list[str], shown: list[str]) -> None:
    assert flags.redact_argv(given) == shown


def test_find_binary_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BinaryError, match="LLAMA_SERVER_BIN=/nope: not an executable file"):
        flags.find_binary("/nope")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BinaryError, match="llama-server not found"):
        flags.find_binary(None)


def test_detect_real_binary_and_cache(llama_server_bin: str, tmp_path: Path) -> None:
    caps = flags.detect(llama_server_bin, tmp_path)
    assert caps.spelling("ctx_size") == "--ctx-size" and caps.spelling("port") == "--port"
    assert caps.version != "unknown"
    cached = list(tmp_path.glob("capabilities-*.json"))
    assert len(cached) == 1
    again = flags.detect(llama_server_bin, tmp_path)
    assert again == caps
