"""Helpers for the acquisition tests: a profile pointing at the fake Hub, fast transfer options, split GGUFs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tests.hubserver import HubServer
from wrapper import settings
from wrapper.model import acquire
from wrapper.model.transfer import Transfer

REPO_ID = "org/tiny-GGUF"
FILE = "tiny-dense.gguf"
# Short stall and backoff so fault tests take seconds, not minutes.
FAST = acquire.Options(transfer=Transfer(stall_s=1.0, retries=3, backoff_s=0.05, progress_every_s=0.2),
                       lock_timeout_s=60)


def write_registry(path: Path, profiles: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"profiles": profiles}, sort_keys=False))
    return path


def hub_environ(tmp_path: Path, hub: HubServer, **extra: str) -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.url, "WRAPPER_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    env.update(extra)
    return env


def hub_settings(
    tmp_path: Path, hub: HubServer, environ: dict[str, str] | None = None, **llamacpp: Any
) -> settings.Settings:
    body: dict[str, Any] = {"hf_repo_id": REPO_ID, "hf_filename": FILE, "model_root": str(tmp_path / "models"),
                            "host": "127.0.0.1", "port": 18080, "threads": 1, "ctx_size": 256}
    body.update(llamacpp)
    if "model_path" in body:  # a profile names its model one way or the other, never both
        del body["hf_repo_id"], body["hf_filename"]
    registry = write_registry(tmp_path / "profiles.yaml", {"tiny": {"llamacpp": body}})
    return settings.build("tiny", str(registry), environ if environ is not None else hub_environ(tmp_path, hub))


def write_split(directory: Path, stem: str, tensors: int = 5, per_shard: int = 2) -> list[Path]:
    """A real split GGUF (split.count / split.no keys, one valid GGUF per shard)."""
    import gguf

    directory.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(directory / f"{stem}.gguf"), "llama", split_max_tensors=per_shard)
    w.add_name(stem)
    rng = np.random.default_rng(0)
    for i in range(tensors):
        w.add_tensor(f"t{i}", rng.normal(size=(64, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(directory.glob(f"{stem}-*-of-*.gguf"))
