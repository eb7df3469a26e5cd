"""The CLI maps every bad input to one clear line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import tiny_profile, write_registry
from wrapper.cli import main

WRAPPER = str(Path(sys.executable).parent / "wrapper")


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACPP_", "LLM_", "WRAPPER_"))}
    full.update(env or {})
    return subprocess.run([WRAPPER, *args], capture_output=True, text=True, env=full, timeout=60, check=False)


BAD_REGISTRIES = {
    "empty": ("", "the file is empty"),
    "syntax": ("profiles:\n  p: {a: [1\n", "YAML syntax error"),
    "no-profiles": ("models: {}\n", "missing the top-level 'profiles:' key"),
    "wrong-type": ("profiles:\n  p:\n    llamacpp: {model_path: /m, ctx_size: lots}\n", "p.llamacpp.ctx_size"),
    "negative-port": ("profiles:\n  p:\n    llamacpp: {model_path: /m, port: -80}\n", "p.llamacpp.port"),
    "unknown-key": ("profiles:\n  p:\n    llamacpp: {model_path: /m, thread: 4}\n", "did you mean 'threads'"),
    "backend": ("profiles:\n  p:\n    backend: ollama\n    llamacpp: {model_path: /m}\n", "p.backend"),
    "traversal": ("profiles:\n  p:\n    llamacpp: {hf_repo_id: o/r, hf_filename: ../x.gguf}\n", "hf_filename"),
    "both-sources": ("profiles:\n  p:\n    llamacpp: {model_path: /m, hf_repo_id: o/r, hf_filename: x.gguf}\n",
                     "not both"),
    "duplicate": ("profiles:\n  p:\n    llamacpp: {model_path: /a}\n  p:\n    llamacpp: {model_path: /b}\n",
                  "duplicate key"),
}


@pytest.mark.parametrize("case", sorted(BAD_REGISTRIES))
def test_bad_registry_exit_2_one_message(case: str, tmp_path: Path) -> None:
    text, expected = BAD_REGISTRIES[case]
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["flags", "--config", str(path), "--profile", "p"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    assert expected in result.output
    assert "Traceback" not in result.output
    validate = CliRunner().invoke(main, ["profiles", "validate", str(path)])
    assert validate.exit_code == 2 and expected in validate.output


def test_missing_registry_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["flags", "--config", str(tmp_path / "nope.yaml"), "--profile", "p"])
    assert result.exit_code == 2
    assert "llm_profiles.yaml not found: --config=" in result.output


def test_profile_not_found_real_process(tmp_path: Path, tiny_dense: Path) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"tiny-dense": tiny_profile(tiny_dense, 8080)})
    proc = run(["flags"], {"LLM_PROFILES_CONFIG_PATH": str(reg), "LLM_PROFILE_NAME": "tiny-dens"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"error: LLM profile 'tiny-dens' not found in registry {reg}"
    assert "did you mean 'tiny-dense'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_override_env_real_process(tmp_path: Path, tiny_dense: Path) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"t": tiny_profile(tiny_dense, 8080)})
    proc = run(["flags", "--config", str(reg), "--profile", "t"], {"LLAMACPP_THREADS_OVERRIDE": "four"})
    assert proc.returncode == 2
    assert "LLAMACPP_THREADS_OVERRIDE='four'" in proc.stderr and "Traceback" not in proc.stderr


def test_flags_prints_exact_command(tmp_path: Path, tiny_dense: Path, llama_server_bin: str) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"t": tiny_profile(tiny_dense, 8099, ctx_size=256)})
    env = {"LLAMA_SERVER_BIN": llama_server_bin, "WRAPPER_STATE_DIR": str(tmp_path / "s")}
    proc = run(["flags", "--config", str(reg), "--profile", "t"], env)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout.strip().splitlines()[-1]) == [
        llama_server_bin, "--model", str(tiny_dense), "--host", "127.0.0.1", "--port", "8099",
        "--ctx-size", "256", "--parallel", "1", "--threads", "1",
        "--metrics",  # the status port (default 8201) re-serves llama-server's own metrics
    ]
    over = run(["flags", "--config", str(reg), "--profile", "t", "--json"],
               {**env, "LLAMACPP_CTX_SIZE_OVERRIDE": "512"})
    data = json.loads(over.stdout)
    ctx = next(o for o in data["origins"] if o["flag"] == "--ctx-size")
    assert ctx == {"flag": "--ctx-size", "value": "512", "setting": "llamacpp.ctx_size",
                   "origin": "env:LLAMACPP_CTX_SIZE_OVERRIDE"}


def test_profiles_show_prints_origins(tmp_path: Path, tiny_dense: Path) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"t": tiny_profile(tiny_dense, 8080)})
    proc = run(["profiles", "show", "t", "--config", str(reg), "--json"], {"LLAMACPP_PARALLEL_OVERRIDE": "3"})
    assert proc.returncode == 0, proc.stderr
    rows = {r["setting"]: r for r in json.loads(proc.stdout)["values"]}
    assert rows["llamacpp.parallel"]["value"] == 3
    assert rows["llamacpp.parallel"]["origin"] == "env:LLAMACPP_PARALLEL_OVERRIDE"
    assert rows["llamacpp.ctx_size"]["origin"] == "profile"
    assert rows["llamacpp.batch_size"]["origin"] == "default"
    text = run(["profiles", "show", "t", "--config", str(reg)])
    assert "llamacpp.ctx_size" in text.stdout and "(profile)" in text.stdout


def test_profiles_list_and_validate(tmp_path: Path, tiny_dense: Path) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"a": tiny_profile(tiny_dense, 1), "b": tiny_profile(tiny_dense, 2)})
    listed = CliRunner().invoke(main, ["profiles", "list", "--config", str(reg), "--json"])
    assert [p["name"] for p in json.loads(listed.output)["profiles"]] == ["a", "b"]
    ok = CliRunner().invoke(main, ["profiles", "validate", str(reg)])
    assert ok.exit_code == 0 and "2 profile(s): a, b" in ok.output


def test_missing_binary_is_a_clear_error(tmp_path: Path, tiny_dense: Path) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"t": tiny_profile(tiny_dense, 8080)})
    proc = run(["flags", "--config", str(reg), "--profile", "t"],
               {"LLAMA_SERVER_BIN": "", "PATH": str(tmp_path), "WRAPPER_STATE_DIR": str(tmp_path / "s")})
    assert proc.returncode == 2
    assert "llama-server not found" in proc.stderr and "scripts/build-llama-server.sh" in proc.stderr


def test_auto_layers_on_cpu_only_come_from_the_plan(tmp_path: Path, tiny_moe: Path, llama_server_bin: str) -> None:
    reg = write_registry(tmp_path / "r.yaml", {"t": tiny_profile(tiny_moe, 8098, n_gpu_layers="auto")})
    env = {"LLAMA_SERVER_BIN": llama_server_bin, "WRAPPER_STATE_DIR": str(tmp_path / "s"), "CUDA_VISIBLE_DEVICES": ""}
    proc = run(["flags", "--config", str(reg), "--profile", "t", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ngl = next(o for o in data["origins"] if o["setting"] == "llamacpp.n_gpu_layers")
    assert ngl["origin"] == "plan" and ngl["value"] == "0"
    assert any(d.startswith("placement from the plan: -ngl 0") for d in data["decisions"])
    pinned = run(["flags", "--config", str(reg), "--profile", "t", "--json"],
                 {**env, "LLAMACPP_N_GPU_LAYERS_OVERRIDE": "3"})
    ngl = next(o for o in json.loads(pinned.stdout)["origins"] if o["setting"] == "llamacpp.n_gpu_layers")
    assert ngl == {"flag": "--n-gpu-layers", "value": "3", "setting": "llamacpp.n_gpu_layers",
                   "origin": "env:LLAMACPP_N_GPU_LAYERS_OVERRIDE"}
