"""Out of memory at load ends in a served, smaller configuration (issue 14), not in a crash loop or exit 4.

The fault is staged by the fake llama-server: above FAKE_OOM_CTX it fails with llama.cpp's allocation error
for the KV cache, exactly as a real one does when the budget is smaller than the model needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_registry
from tests.supervisor_fixtures import Served, fake_binary
from wrapper.launch import stepdown

pytestmark = pytest.mark.slow


def _serve(tmp_path: Path, model: Path, **profile_changes: object) -> Served:
    served = Served(tmp_path, fake_binary(tmp_path), model, env={
        "FAKE_OOM_CTX": "1024", "FAKE_KV_BYTES_PER_CELL": "65536", "WRAPPER_STATE_DIR": str(tmp_path / "state")})
    import yaml

    registry = tmp_path / "profiles.yaml"
    profile = yaml.safe_load(registry.read_text())["profiles"]["tiny"]
    del profile["llamacpp"]["ctx_size"]  # left to the wrapper: the plan picks the model's 2048
    profile["llamacpp"].update(profile_changes)
    write_registry(registry, {"tiny": profile})
    return served.start()


def test_oom_at_load_steps_down_to_a_smaller_ctx_and_serves(tmp_path: Path, tiny_dense: Path,
                                                           clean_env: pytest.MonkeyPatch) -> None:
    served = _serve(tmp_path, tiny_dense)
    try:
        status = served.wait_for(lambda s: s["state"] == "ready", timeout=60)
        args = {a["flag"]: a for a in status["llama_server"]["args"]}
        ctx = int(args["--ctx-size"]["value"])
        assert ctx <= 1024 and args["--ctx-size"]["origin"] == stepdown.STEP_DOWN_ORIGIN
        step = status["extra"]["step_down"]
        assert any(g.startswith("ctx 2048 ->") for g in step["gave_up"])
        assert "CPU could not allocate 128 MiB" in step["reason"]
        assert any("step-down after out of memory" in d for d in status["decisions"])
        assert "failed to allocate buffer of size" in served.log and "retrying once with" in served.log
    finally:
        served.stop()


def test_oom_with_every_knob_set_by_the_profile_still_fails_once_with_exit_4(tmp_path: Path, tiny_dense: Path,
                                                                           clean_env: pytest.MonkeyPatch) -> None:
    served = _serve(tmp_path, tiny_dense, ctx_size=2048, parallel=1, cache_type_k="f16", cache_type_v="f16")
    assert served.wait_exit(timeout=60) == 4
    assert "nothing is left to the wrapper to shrink" in served.log
    assert served.log.count("failed to allocate buffer of size") >= 1 and "retrying once" not in served.log


def test_failed_allocation_reads_llama_cpp_sizes() -> None:
    cpu = ("E ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 134217728",)
    assert stepdown.failed_allocation(cpu) == (128.0, None, False)
    cuda = ("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 16384.00 MiB on device 1: cudaMalloc failed: "
            "out of memory",)
    assert stepdown.failed_allocation(cuda) == (16384.0, 1, True)
    assert stepdown.failed_allocation(("CUDA error: out of memory",)) == (None, None, True)
