"""Issue 15 item 14: `ctx_size: 2e9` made llama-server take ~24 GB until the OOM killer fired, the kill counted
as retryable and the same launch was repeated. Now the ctx is bounded by the model's n_ctx_train, and an
OOM kill is a start failure of its own kind ("oom") that is never retried blindly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from tests.supervisor_fixtures import Served
from wrapper.launch.prepare import CTX_TRAIN_FACTOR
from wrapper.model import tiny_models
from wrapper.supervisor.classify import classify
from wrapper.supervisor.process import oom_kills

WRAPPER = str(Path(sys.executable).parent / "wrapper")


def _serve(tmp_path: Path, model: Path, binary: str, ctx: int) -> subprocess.CompletedProcess[str]:
    registry = write_registry(tmp_path / "profiles.yaml", {"t": tiny_profile(model, free_port(), ctx_size=ctx)})
    env = {**os.environ, "LLAMA_SERVER_BIN": binary, "WRAPPER_STATUS_PORT": "0"}
    return subprocess.run([WRAPPER, "serve", "--profile", "t", "--config", str(registry)], check=False, env=env,
                          capture_output=True, text=True, timeout=60)


def test_ctx_size_far_above_n_ctx_train_is_refused_before_llama_server_starts(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, tiny_dense: Path
) -> None:
    marker = tmp_path / "served"
    binary = tmp_path / "llama-server"
    # Capability detection (--help, --version) is answered; a launch (it names --model) leaves a mark.
    binary.write_text(f'#!/bin/sh\ncase "$*" in *--model*) touch {marker}; exit 1;; esac\necho "--ctx-size N"\n')
    binary.chmod(0o755)
    done = _serve(tmp_path, tiny_dense, str(binary), 2_000_000_000)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    first = errors[0]
    assert first.startswith("error: llamacpp.ctx_size=2000000000 (profile) is more than 4 x the model's "
                            "n_ctx_train=2048"), first
    assert f"set llamacpp.ctx_size to {CTX_TRAIN_FACTOR * 2048} or less" in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize(("returncode", "tail", "kind"), [
    (-int(signal.SIGKILL), ["wrapper: llama-server was killed by the kernel OOM killer (cgroup oom_kill 0 -> 1)"],
     "oom"),
    (-int(signal.SIGKILL), ["llama_kv_cache: failed to allocate buffer for kv cache"], "oom"),
    (-int(signal.SIGKILL), ["0.01 I srv  update_slots: all slots are idle"], "killed"),  # someone's kill -9
])
def test_oom_is_its_own_kind_and_not_retryable(returncode: int, tail: list[str], kind: str) -> None:
    failure = classify(returncode, tail)
    assert failure.kind == kind
    assert failure.retryable is (kind != "oom")
    if kind == "oom":
        assert "lower llamacpp.ctx_size" in failure.hint


# -------- a real OOM kill, in a memory cgroup of its own (root and a writable cgroup hierarchy only) --------

def _memory_cgroup(limit: int) -> Path | None:
    """A fresh memory cgroup under ours with `limit` bytes, or None where this machine cannot make one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
            break
    else:
        unified = Path("/proc/self/cgroup").read_text().split("::", 1)[-1].strip().lstrip("/")
        base, limit_file = Path("/sys/fs/cgroup") / unified, "memory.max"
    group = base / f"wrapper-oom-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError:
        return None
    return group


@pytest.fixture
def small_cgroup() -> Iterator[Path]:
    group = _memory_cgroup(400 * 2**20) if os.getuid() == 0 else None
    if group is None:
        pytest.skip("needs root and a writable memory cgroup to stage a real OOM kill")
    yield group
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:  # busy until its last process is reaped
            time.sleep(0.1)


@pytest.mark.llama
def test_real_oom_kill_is_kind_oom_and_not_restarted(llama_server_bin: str, tmp_path: Path, small_cgroup: Path) -> None:
    # Trained on 4M tokens, so the ctx bound lets a 4M context through; its KV cache (~1 GB) is cleared page by
    # page at load, which runs into the cgroup's 400 MB: the kernel SIGKILLs llama-server.
    big_ctx = 1 << 22
    model = tiny_models.write(tmp_path / "long-ctx.gguf", tiny_models.TinySpec(n_ctx_train=big_ctx, seed=3))
    s = Served(tmp_path, llama_server_bin, model, ctx_size=big_ctx)
    # The wrapper joins the cgroup before it execs; llama-server inherits it.
    s.argv = ["sh", "-c", f'echo $$ > {small_cgroup}/cgroup.procs && exec "$@"', "sh", *s.argv]
    s.start()
    try:
        code = s.wait_exit(timeout=120)
    finally:
        s.stop()
    log = s.log
    assert code == 4, log[-3000:]
    assert "killed by the kernel OOM killer" in log and "kind=oom" in log
    assert "-> restarting" not in log, "an OOM kill must not be retried with the same launch"
    assert "lower llamacpp.ctx_size" in log
    assert oom_kills() is not None
