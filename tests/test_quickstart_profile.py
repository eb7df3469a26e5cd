"""The quick start's real-model profile is valid and plans without the Hub, from its recorded header."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import REPO, free_port
from wrapper.model import gguf_meta

SHA256 = "2fa3f013dcdd7b99f9b237717fa0b12d75bbb89984cc1274be1471a465bac9c2"
HEADER = REPO / "config" / "gguf-headers" / f"{SHA256}.gguf"
# The published file: 270,590,880 bytes with its tensor data starting at byte 1,787,040.
FILE_SIZE, DATA_OFFSET = 270_590_880, 1_787_040


def _wrapper(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACPP_", "LLM_", "WRAPPER_", "HF_"))}
    # Nothing listens on the endpoint: any attempt to reach the Hub fails at once.
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", LLM_CACHE_DIR=str(tmp_path / "cache"),
               WRAPPER_STATE_DIR=str(tmp_path / "state"))
    return subprocess.run([str(REPO / ".venv/bin/wrapper"), *args], cwd=REPO, env=env, capture_output=True, check=False,
                          text=True, timeout=60)


def test_shipped_registry_with_the_quickstart_profile_validates(tmp_path: Path) -> None:
    done = _wrapper("profiles", "validate", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "smollm2-360m" in done.stdout


def test_quickstart_profile_plans_from_its_recorded_header_when_the_hub_is_unreachable(tmp_path: Path) -> None:
    done = _wrapper("plan", "--profile", "smollm2-360m", "--json", "--vram-mib", "0", "--ram-mib", "4096",
                    tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    model = plan["model"]
    assert Path(model["source"]).name == HEADER.name
    assert (model["architecture"], model["n_layer"], model["n_embd"], model["n_head"]) == ("llama", 32, 960, 15)
    assert model["tensor_bytes"] == FILE_SIZE - DATA_OFFSET
    assert plan["verdict"] == "ship"
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_recorded_header_accounts_for_every_byte_of_the_pinned_file() -> None:
    # Rebuilt from published facts (scripts/record_smollm2_header.py): the tensor table it implies must
    # fill the file's data section exactly, or a type or shape in it is wrong.
    meta = gguf_meta.read_local(HEADER)
    assert meta.tensor_bytes == FILE_SIZE - DATA_OFFSET
    assert meta.n_tensors == 290 and meta.output_tied and meta.n_head_kv == [5] * 32
    assert meta.n_ctx_train == 8192 and meta.n_vocab == 49152 and meta.file_type == 15
