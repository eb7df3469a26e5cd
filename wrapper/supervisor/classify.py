"""Why did llama-server stop? Classify a failed start or a crash from its exit status and stderr tail.

The classification decides whether a restart can help: a bad flag or an unreadable model fails the same
way every time, so retrying only hides the cause behind a crash loop.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass

# The kernel's OOM killer sends SIGKILL and says nothing to the child: wrapper.supervisor.process adds this
# line to the stderr tail when the cgroup's oom_kill counter moved while llama-server ran.
OOM_KILLED = "killed by the kernel OOM killer"

# (kind, retryable, pattern, what it means). First match wins, so the specific causes come first.
# The spellings are llama.cpp's own messages (llama-server b6xxx and later, plus CUDA/ggml runtime text).
_RULES: tuple[tuple[str, bool, re.Pattern[str], str], ...] = (
    (
        "bad_argument",
        False,
        re.compile(r"invalid argument|unknown argument|error while handling argument|unrecognized option", re.I),
        "llama-server rejected an argument",
    ),
    (
        "address_in_use",
        False,
        re.compile(r"address already in use|couldn't bind HTTP server socket|EADDRINUSE", re.I),
        "llama-server's port is taken by another process",
    ),
    (
        # Its own kind, never retried blindly: the same launch runs out of memory the same way (a planner
        # step-down can key on it). OOM_KILLED is the line Child adds when the kernel's counter moved.
        "oom",
        False,
        re.compile(
            r"out of memory|cudaMalloc failed|failed to allocate .*buffer|std::bad_alloc|"
            r"unable to allocate|ErrorOutOfDeviceMemory|cannot allocate memory|" + OOM_KILLED,
            re.I,
        ),
        "not enough GPU or host memory for this model and configuration",
    ),
    (
        "model_unreadable",
        False,
        re.compile(
            r"missing tensor|failed to open GGUF|failed to read|gguf_init_from|invalid magic|"
            r"tensor .* data is not within|error loading model|failed to load model",
            re.I,
        ),
        "the model file cannot be read or is not a complete, supported GGUF",
    ),
)

# llama.cpp's "0.00.004.222 E ..." error level, or error words from ggml asserts and the C++ runtime.
_ERROR_LINE = re.compile(r"^[\d.]+ E |(?i:\b(error|fatal|abort|assert|segmentation fault|terminate called))")

HINTS = {
    "bad_argument": "check llamacpp.extra_args and the flags in `wrapper flags`; the binary may be older "
    "than the profile expects (LLAMA_SERVER_BIN)",
    "address_in_use": "stop the other process or change llamacpp.port (LLAMACPP_PORT_OVERRIDE)",
    "oom": "shrink what llama-server allocates: lower llamacpp.ctx_size, parallel or n_gpu_layers, or use a "
    "smaller quantization (see `wrapper plan`)",
    "model_unreadable": "re-fetch the model (`wrapper fetch`) and check llamacpp.model_path",
    "killed": "something outside the wrapper killed llama-server (the kernel OOM killer sends SIGKILL)",
    "crashed": "see the llama-server lines above",
}


@dataclass(frozen=True)
class Failure:
    kind: str  # bad_argument | address_in_use | oom | model_unreadable | killed | crashed | ...
    retryable: bool
    summary: str  # one line, for the error message and events
    lines: tuple[str, ...] = ()  # the stderr lines that show it, most relevant first

    @property
    def hint(self) -> str:
        return HINTS.get(self.kind, "")


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def classify(returncode: int | None, tail: Sequence[str], max_lines: int = 6) -> Failure:
    """Exit status + recent stderr lines -> Failure. Unknown causes are retryable crashes."""
    how = describe_exit(returncode)
    for kind, retryable, pattern, meaning in _RULES:
        hits = [line for line in tail if pattern.search(line)]
        if hits:
            return Failure(kind, retryable, f"{meaning} ({how})", tuple(_dedupe(hits)[-max_lines:]))
    errors = [line for line in tail if _ERROR_LINE.search(line)]
    lines = tuple(_dedupe(errors)[-max_lines:]) if errors else tuple(tail)[-3:]
    if returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
        return Failure("killed", True, f"llama-server was {how}", lines)
    return Failure("crashed", True, f"llama-server stopped unexpectedly ({how})", lines)


def _dedupe(lines: Sequence[str]) -> list[str]:
    # llama.cpp logs the same load error several times from different layers; show each once.
    seen: set[str] = set()
    out = []
    for line in lines:
        key = re.sub(r"^[\d.]+\s+", "", line).strip()
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out
