"""The start and stop paths of `wrapper serve` on a real llama-server: a stop in the middle of the self-check,
and the warning for a chat model without a chat template."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.supervisor_fixtures import Served
from wrapper.model import tiny_models

pytestmark = pytest.mark.llama


def _wait_log(s: Served, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in s.log:
            return
        assert s.proc is not None
        if s.proc.poll() is not None:
            pytest.fail(f"wrapper exited {s.proc.returncode}; log:\n{s.log[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {text!r} within {timeout}s; log:\n{s.log[-3000:]}")


def test_stop_during_the_selfcheck_is_quick_and_no_verdict(served: Callable[..., Served],
                                                          llama_server_bin: str, tiny_dense: Path) -> None:
    """Regression: SIGTERM while the self-check's requests were in flight made llama-server drain them for the
    whole grace (10 s), it got SIGKILL, and the interrupted check logged `selfcheck: fail, 0.0 tok/s`."""
    long_check = {"WRAPPER_SELFCHECK_ENABLED": "true", "WRAPPER_SELFCHECK_MAX_TOKENS": "400",
                  "WRAPPER_SELFCHECK_PROMPT_TOKENS": "16", "WRAPPER_SELFCHECK_REQUESTS": "40",
                  "WRAPPER_SELFCHECK_CONCURRENCY": "2", "WRAPPER_SELFCHECK_WARMUP_REQUESTS": "0"}
    s = served(llama_server_bin, tiny_dense, env=long_check, supervise={"stop_grace_s": 10}, ctx_size=1024,
               parallel=2)
    _wait_log(s, "selfcheck: windows of 40 requests")
    time.sleep(1.0)  # requests in flight
    assert s.proc is not None
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    code = s.wait_exit(timeout=15)
    took = time.monotonic() - started
    log = s.log
    assert code == 0, log[-3000:]
    assert took < 2.0, f"stop took {took:.2f}s; log:\n{log[-3000:]}"
    assert "SIGKILL" not in log and "forced=True" not in log
    assert "selfcheck: fail" not in log and "selfcheck: degraded" not in log
    assert "selfcheck: cancelled" in log


def test_chat_model_without_a_template_is_warned_once(served: Callable[..., Served],
                                                      llama_server_bin: str, tmp_path: Path) -> None:
    base = tiny_models.write(tmp_path / "tiny-base.gguf", dataclasses.replace(tiny_models.DENSE, chat_template=False))
    s = served(llama_server_bin, base)
    s.wait_ready()
    deadline = time.monotonic() + 5
    while "no tokenizer.chat_template" not in s.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.log.count("tiny-base.gguf has no tokenizer.chat_template") == 1
    assert "ChatML fallback" in s.log
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit() == 0


def test_chat_model_with_its_template_is_not_warned(served: Callable[..., Served],
                                                    llama_server_bin: str, tiny_dense: Path) -> None:
    s = served(llama_server_bin, tiny_dense)
    s.wait_ready()
    time.sleep(0.5)
    assert "chat_template" not in s.log
