"""The self-check tells the truth (issue 12): its load fits the server's own slots, counted in the server's
tokens; its figure comes with a 95% CI that never goes negative; a verdict below pass needs the whole CI
under the threshold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loadgen_fixtures import running_llama
from wrapper.measure import loadgen, selfcheck, sizing
from wrapper.profiles.schema import SelfCheckSpec

SPEC = SelfCheckSpec(degraded_ratio=0.85, fail_ratio=0.5)


@pytest.mark.parametrize(("tps", "ci_high", "verdict"), [
    (70.0, 95.0, "pass"),  # below degraded_ratio, but the interval reaches 0.95: noise, not a slow server
    (70.0, 80.0, "degraded"),  # the whole interval under 0.85
    (40.0, 60.0, "degraded"),  # under fail_ratio, but the interval reaches 0.6
    (40.0, 45.0, "fail"),
    (70.0, None, "degraded"),  # no interval (one window): the point estimate decides, as before
])
def test_judge_needs_the_whole_interval_below_a_threshold(tps: float, ci_high: float | None, verdict: str) -> None:
    got, ratio, reason = selfcheck.judge(tps, 100.0, 0, 8, SPEC, ci_high=ci_high)
    assert got == verdict and ratio == pytest.approx(tps / 100) and reason


def test_window_interval_is_never_negative_however_noisy() -> None:
    # The sweep's linear CIs reached [-1301, 3788] on the noisy host; the log scale cannot go below zero.
    mean, low, high = selfcheck.window_stats([5.0, 1000.0, 12.0, 800.0])
    assert low is not None and high is not None and 0 < low < mean < high
    assert selfcheck.window_stats([100.0]) == (pytest.approx(100.0), None, None)
    assert selfcheck.window_stats([]) == (0.0, None, None)


def test_clearly_below_uses_the_upper_bound() -> None:
    base = {"verdict": "pass", "ratio": None, "concurrency": 1, "requests": 1, "errors": 0, "prompt_tokens": 1,
            "completion_tokens": 1, "duration_s": 1.0, "reason": "-", "key": "-", "finished_at": "2026-01-01T00:00:00Z"}
    noisy = selfcheck.SelfCheckResult(**base, throughput_tps=70.0, ci_low=50.0, ci_high=95.0)
    slow = selfcheck.SelfCheckResult(**base, throughput_tps=70.0, ci_low=60.0, ci_high=79.0)
    assert not selfcheck.clearly_below(noisy, 80.0) and selfcheck.clearly_below(slow, 80.0)


@pytest.fixture(scope="module")
def small_slots(llama_server_bin: str, tiny_dense: Path) -> Iterator[str]:
    """llama-server as `ctx_size: 512, parallel: 2` runs it: 256 tokens a slot."""
    with running_llama(llama_server_bin, tiny_dense, "-c", "512", "-np", "2") as url:
        yield url


@pytest.mark.llama
def test_ctx512_parallel2_no_longer_fails_every_request(small_slots: str, tmp_path: Path) -> None:
    # Before: 128-word prompts (~750 byte-level tokens) in 256-token slots, every request HTTP 400, and a
    # healthy server published as `verdict: fail, throughput_tps: 0.0`.
    spec = SelfCheckSpec(measure_s=3.0)  # the shipped prompt_tokens 128 / max_tokens 64
    result = selfcheck.run(selfcheck.Target(url=small_slots, spec=spec, state_dir=tmp_path, parallel=2))
    assert result.verdict == "pass" and result.errors == 0 and result.throughput_tps > 0, result.reason
    assert result.slot_ctx == 256 and result.max_tokens == 64
    assert result.prompt_tokens / result.requests + 64 <= 256  # each request fitted its slot
    assert result.windows >= 2 and result.ci_low is not None and result.ci_high is not None
    assert 0 < result.ci_low <= result.throughput_tps <= result.ci_high
    assert result.duration_s < 30


@pytest.mark.llama
def test_prompt_tokens_are_counted_by_the_server_not_as_words(small_slots: str) -> None:
    facts = sizing.server_facts(small_slots, None)
    assert facts.slots == 2 and facts.slot_ctx == 256
    sized = sizing.size(small_slots, None, "chat", facts.slot_ctx, prompt_tokens=128, max_tokens=64)
    assert sized.counted and sized.prompt_tokens + 64 <= 256 - sizing.SLOT_MARGIN
    # The byte-level vocabulary spends several tokens a word: even the shortest bucket (16 words) is over 100
    # tokens, where a word count would have sent the 128-word bucket (~750 tokens, HTTP 400).
    assert sized.prompt_words == 16 and sized.prompt_tokens > 4 * sized.prompt_words
    results = loadgen.run(loadgen.LoadSpec(url=small_slots, requests=2, concurrency=2, max_tokens=8,
                                           prompt_words=sized.prompt_words))
    assert all(r.ok and r.prompt_tokens <= sized.prompt_tokens for r in results)
    # An output too long for the slot beside even the shortest prompt shrinks, and says so.
    longer = sizing.size(small_slots, None, "chat", facts.slot_ctx, prompt_tokens=128, max_tokens=500)
    assert longer.max_tokens + longer.prompt_tokens <= 256 - sizing.SLOT_MARGIN and longer.note
    with pytest.raises(sizing.DoesNotFit):
        sizing.size(small_slots, None, "chat", 64, prompt_tokens=128, max_tokens=64)

# Ten self-checks in a row under a CPU hog are benchmarks/selfcheck_under_hog.py's job (figures in
# docs/benchmarks.md): a timed test of verdicts on a shared, noisy machine would judge the neighbours.


@pytest.fixture(scope="module")
def one_long_slot(llama_server_bin: str, tiny_dense: Path) -> Iterator[str]:
    """One 4096-token slot: room for outputs far longer than a sub-second timeout lets finish."""
    with running_llama(llama_server_bin, tiny_dense, "-c", "4096", "-np", "1") as url:
        yield url


# Thousands of output tokens a request against a timeout under a second: no window can finish, however fast
# the host, while the tokens keep streaming (a healthy server that is merely slow for the budget given).
SLOW_LOAD = {"measure_s": 10.0, "timeout_s": 1.0, "warmup_requests": 0, "requests": 1, "max_tokens": 1800,
             "prompt_tokens": 16}


@pytest.mark.llama
@pytest.mark.parametrize(("expected", "verdict"), [(None, "pass"), (0.001, "pass"), (1e9, "degraded")])
def test_check_cut_short_before_a_window_reports_the_partial_figure_never_fail(
    one_long_slot: str, tmp_path: Path, expected: float | None, verdict: str
) -> None:
    # Before: "timed out after 1s before a window finished", verdict fail and every request counted an error.
    spec = SelfCheckSpec(**SLOW_LOAD)
    result = selfcheck.run(selfcheck.Target(url=one_long_slot, spec=spec, state_dir=tmp_path, parallel=1),
                           expected)
    assert result.verdict == verdict, result.reason
    assert result.windows == 0 and result.ci_low is None and result.ci_high is None  # no window: low confidence
    assert result.throughput_tps > 0 and result.completion_tokens > 0 and result.errors == 0
    assert "no window finished within selfcheck.timeout_s (1s): a partial figure from" in result.reason
    assert "low confidence" in result.reason
    if expected is None:
        assert "not kept as the baseline" in result.reason
        assert not (tmp_path / "selfcheck" / "expected.json").exists()  # a partial figure is no baseline
    else:
        assert result.ratio == pytest.approx(result.throughput_tps / expected)
    if verdict == "degraded":
        assert "a partial figure is never a fail" in result.reason


@pytest.mark.llama
def test_check_that_gets_nothing_before_the_timeout_still_fails(one_long_slot: str, tmp_path: Path) -> None:
    # The only slot is held by a long generation: the check's request queues and nothing arrives in time.
    import threading

    import httpx

    started, release = threading.Event(), threading.Event()

    def hold_the_slot() -> None:
        body = {"prompt": "hold", "n_predict": 4000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=one_long_slot, timeout=60) as client, \
                client.stream("POST", "/completion", json=body) as response:
            for _ in response.iter_lines():
                started.set()
                if release.is_set():
                    break  # closing the stream makes llama-server cancel the generation

    holder = threading.Thread(target=hold_the_slot, daemon=True)
    holder.start()
    try:
        assert started.wait(30)
        spec = SelfCheckSpec(**{**SLOW_LOAD, "max_tokens": 64, "timeout_s": 0.5})
        result = selfcheck.run(selfcheck.Target(url=one_long_slot, spec=spec, state_dir=tmp_path, parallel=1))
    finally:
        release.set()
        holder.join(30)
    assert result.verdict == "fail" and result.throughput_tps == 0.0 and result.windows == 0
    assert "no window finished within selfcheck.timeout_s (0.5s) and nothing arrived" in result.reason
