"""Pure decision logic: restart policy and failure classification, as tables."""

from __future__ import annotations

import signal

import pytest

from wrapper.profiles.schema import SuperviseSpec
from wrapper.supervisor import policy
from wrapper.supervisor.classify import classify

SPEC = SuperviseSpec(max_restarts=3, restart_window_s=60, backoff_initial_s=1, backoff_max_s=8, stable_after_s=30)


@pytest.mark.parametrize(
    ("streak", "rand", "expected"),
    [
        (0, 0.0, 0.0),
        (1, 1.0, 1.0),
        (1, 0.0, 0.5),  # jitter takes at most half off
        (2, 1.0, 2.0),
        (3, 1.0, 4.0),
        (4, 1.0, 8.0),
        (5, 1.0, 8.0),  # capped at backoff_max_s
        (30, 0.5, 6.0),
    ],
)
def test_backoff_doubles_with_jitter_and_cap(streak: int, rand: float, expected: float) -> None:
    assert policy.backoff(streak, SPEC, lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("streak", "ran_for", "expected"),
    [(0, 1.0, 1), (3, 1.0, 4), (3, 29.9, 4), (3, 30.0, 1), (7, 3600.0, 1)],
)
def test_stable_run_resets_streak(streak: int, ran_for: float, expected: int) -> None:
    assert policy.streak_after(streak, ran_for, SPEC) == expected


@pytest.mark.parametrize(
    ("retryable", "failures", "now", "restart", "reason_part"),
    [
        (True, [100.0], 100.0, True, "restart 1/3"),
        (True, [98.0, 99.0, 100.0], 100.0, True, "restart 3/3"),
        (True, [97.0, 98.0, 99.0, 100.0], 100.0, False, "crash loop: 4 failures in 60s"),
        (True, [10.0, 20.0, 90.0, 100.0], 100.0, True, "restart 2/3"),  # old failures left the window
        (False, [100.0], 100.0, False, "not retryable"),
    ],
)
def test_decide(retryable: bool, failures: list[float], now: float, restart: bool, reason_part: str) -> None:
    decision = policy.decide(retryable=retryable, failures=failures, now=now, streak=1, spec=SPEC, rand=lambda: 1.0)
    assert decision.restart is restart
    assert reason_part in decision.reason
    assert decision.delay_s == (1.0 if restart else 0.0)


def test_zero_max_restarts_gives_up_on_first_failure() -> None:
    spec = SuperviseSpec(max_restarts=0)
    assert not policy.decide(retryable=True, failures=[5.0], now=5.0, streak=1, spec=spec).restart


LOAD_ERROR = [
    "0.00.004.222 E gguf_init_from_file: failed to open GGUF file '/m/x.gguf' (No such file or directory)",
    "0.00.004.342 E llama_model_load: error loading model: llama_model_loader: failed to load model from /m/x.gguf",
    "0.00.004.864 E srv  llama_server: exiting due to model loading error",
]


@pytest.mark.parametrize(
    ("returncode", "tail", "kind", "retryable"),
    [
        (1, ["error: invalid argument: --bogus"], "bad_argument", False),
        (1, ['error while handling argument "--ctx-size": stoi'], "bad_argument", False),
        (
            1,
            ["0.00.002.360 E srv  start: couldn't bind HTTP server socket, hostname: 0.0.0.0, port: 8080"],
            "address_in_use",
            False,
        ),
        (1, ["bind: Address already in use"], "address_in_use", False),
        (1, LOAD_ERROR, "model_unreadable", False),
        (1, ["llama_model_load: error loading model: missing tensor 'blk.0.attn_q.weight'"], "model_unreadable", False),
        (
            -6,
            [
                "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on device 0: cudaMalloc failed: "
                "out of memory"
            ],
            "oom",
            False,
        ),
        (-6, ["terminate called after throwing an instance of 'std::bad_alloc'"], "oom", False),
        (-int(signal.SIGKILL), ["0.01 I srv  update_slots: all slots are idle"], "killed", True),
        (-int(signal.SIGSEGV), ["0.01 I srv  update_slots: all slots are idle"], "crashed", True),
        (0, [], "crashed", True),
    ],
)
def test_classify(returncode: int, tail: list[str], kind: str, retryable: bool) -> None:
    failure = classify(returncode, tail)
    assert (failure.kind, failure.retryable) == (kind, retryable)
    if kind not in ("crashed", "killed"):
        assert failure.lines, "the lines that show the cause go into the error message"
        assert failure.hint


def test_classify_dedupes_repeated_load_errors_and_names_the_exit() -> None:
    failure = classify(1, LOAD_ERROR + LOAD_ERROR)
    assert len(failure.lines) == 2  # each cause once, though llama.cpp logs it twice
    assert "exit code 1" in failure.summary
    assert "SIGSEGV" in classify(-int(signal.SIGSEGV), []).summary
