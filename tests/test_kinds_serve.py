"""Vision (with a projector), draft-model, embedding and rerank profiles each serve through `wrapper serve` on a
real llama-server and pass their self-check, on tiny models the suite writes (wrapper.model.tiny_models)."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import tiny_profile, write_registry
from tests.supervisor_fixtures import FAST, Served
from wrapper.model import tiny_models

SELFCHECK = {"enabled": True, "warmup_requests": 0, "requests": 4, "concurrency": 1, "max_tokens": 8,
             "prompt_tokens": 32, "timeout_s": 60}


@pytest.fixture(scope="session")
def kinds(tiny_dir: Path) -> dict[str, Path]:
    return tiny_models.ensure_kinds(tiny_dir)


@pytest.fixture
def serve_kind(clean_env: pytest.MonkeyPatch, tmp_path: Path, llama_server_bin: str) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(model: Path, profile: dict[str, Any], **llamacpp: Any) -> Served:
        s = Served(tmp_path, llama_server_bin, model, **llamacpp)
        # Served writes a plain profile; this kind's top-level keys (task_type, model_id, ...) go on top.
        body = tiny_profile(model, s.port, **llamacpp)
        body.update({"supervise": FAST, "selfcheck": SELFCHECK, **profile})
        write_registry(tmp_path / "profiles.yaml", {"tiny": body})
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()  # SIGKILL: the wrapper's parent-death signal takes llama-server with it


def _wait_selfcheck(s: Served) -> dict[str, Any]:
    status = s.wait_for(lambda st: st["selfcheck"] is not None, timeout=90)
    check: dict[str, Any] = status["selfcheck"]
    return check


def _api(s: Served, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"http://127.0.0.1:{s.port}{path}"
    r = httpx.post(url, json=body, timeout=30, trust_env=False) if body is not None else httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text[:300]
    data: dict[str, Any] = r.json()
    return data


def _png(width: int = 32, height: int = 32) -> bytes:
    """A grey RGB PNG, made by hand so the test needs no imaging library."""
    raw = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_embedding_profile_serves_and_selfchecks_in_items_per_second(
    serve_kind: Callable[..., Served], kinds: dict[str, Path]
) -> None:
    s = serve_kind(kinds["tiny-embed"], {"task_type": "embedding", "model_id": "tiny-embed"}, pooling="mean",
                   parallel=2)
    status = s.wait_ready(60)
    assert {"--embeddings", "--pooling", "--alias"} <= set(status["llama_server"]["argv"])
    assert _api(s, "/v1/models")["data"][0]["id"] == "tiny-embed"  # not the file path
    got = _api(s, "/v1/embeddings", {"input": ["hello world", "fast model"]})
    assert len(got["data"]) == 2 and len(got["data"][0]["embedding"]) == 64
    check = _wait_selfcheck(s)
    assert check["unit"] == "items/s" and check["throughput_tps"] > 0, check
    assert check["verdict"] == "pass" and check["errors"] == 0, check
    assert "selfcheck: pass" in s.log and "items/s" in s.log


def test_rerank_profile_serves_and_selfchecks_in_items_per_second(
    serve_kind: Callable[..., Served], kinds: dict[str, Path]
) -> None:
    s = serve_kind(kinds["tiny-rerank"], {"task_type": "rerank", "model_id": "tiny-rerank"})
    status = s.wait_ready(60)
    assert "--reranking" in status["llama_server"]["argv"]
    got = _api(s, "/v1/rerank", {"query": "fast", "documents": ["fast model", "slow water", "the day"]})
    assert sorted(r["index"] for r in got["results"]) == [0, 1, 2]
    check = _wait_selfcheck(s)
    assert check["unit"] == "items/s" and check["verdict"] == "pass" and check["throughput_tps"] > 0, check


def test_vision_profile_loads_the_projector_and_answers_an_image(
    serve_kind: Callable[..., Served], kinds: dict[str, Path], tiny_dense: Path
) -> None:
    s = serve_kind(tiny_dense, {"supports_vision": True, "model_id": "tiny-vision"},
                   mmproj=str(kinds["tiny-mmproj"]))
    status = s.wait_ready(60)
    argv = status["llama_server"]["argv"]
    assert argv[argv.index("--mmproj") + 1] == str(kinds["tiny-mmproj"])
    assert _api(s, "/props")["modalities"]["vision"] is True
    image = "data:image/png;base64," + base64.b64encode(_png()).decode()
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": image}}]
    answer = _api(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert answer["usage"]["prompt_tokens"] > 16  # the image's patches were encoded into the prompt
    check = _wait_selfcheck(s)
    assert check["unit"] == "tok/s" and check["verdict"] == "pass", check


def test_draft_profile_speculates_with_the_draft_model(
    serve_kind: Callable[..., Served], kinds: dict[str, Path], tiny_dense: Path
) -> None:
    s = serve_kind(tiny_dense, {"model_id": "tiny-spec"}, draft={"path": str(kinds["tiny-draft"]), "n_max": 4})
    status = s.wait_ready(60)
    argv = status["llama_server"]["argv"]
    assert argv[argv.index("--spec-draft-model") + 1] == str(kinds["tiny-draft"])
    assert argv[argv.index("--spec-draft-n-max") + 1] == "4"
    answer = _api(s, "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0})
    assert answer["timings"].get("draft_n", 0) > 0, answer["timings"]  # the draft model proposed tokens
    check = _wait_selfcheck(s)
    assert check["unit"] == "tok/s" and check["verdict"] == "pass", check
