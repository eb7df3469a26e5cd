"""Finding, downloading and verifying GGUF files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wrapper.errors import ModelUnavailable
from wrapper.settings import Settings


@dataclass(frozen=True)
class ModelFile:
    path: Path  # what llama-server gets: the file, or the first shard of a split GGUF
    shards: tuple[Path, ...] = ()
    sha256: str | None = None
    size: int = 0
    source: str = "local"  # local | downloaded | verified-cache
    notes: list[str] = field(default_factory=list)


def expected_path(s: Settings) -> Path:
    """Where the model file is (or will be once fetched): model_path, else model_root/hf_filename."""
    spec = s.server
    if spec.model_path:
        return Path(spec.model_path)
    assert spec.hf_filename is not None  # the schema requires model_path or hf_filename
    return Path(spec.model_root) / spec.hf_filename


def ensure(s: Settings) -> ModelFile:
    path = expected_path(s)
    if not path.is_file():
        raise ModelUnavailable(
            f"model file not found: {path}",
            hint="copy the GGUF there, or fix llamacpp.model_path / model_root + hf_filename",
        )
    return ModelFile(path=path, shards=(path,), size=path.stat().st_size)
