"""Self-check verdicts (pure) and runs against a real llama-server, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import tiny_profile, write_registry
from wrapper import settings
from wrapper.cli import main
from wrapper.measure import selfcheck
from wrapper.profiles.schema import SelfCheckSpec

SPEC = SelfCheckSpec(degraded_ratio=0.85, fail_ratio=0.5)


@pytest.mark.parametrize(("tps", "expected", "errors", "verdict", "ratio"), [
    (100.0, None, 0, "pass", None),
    (100.0, 100.0, 0, "pass", 1.0),
    (86.0, 100.0, 0, "pass", 0.86),
    (84.0, 100.0, 0, "degraded", 0.84),
    (49.0, 100.0, 0, "fail", 0.49),
    (100.0, 100.0, 1, "degraded", 1.0),
    (0.0, 100.0, 4, "fail", None),
])
def test_judge(tps: float, expected: float | None, errors: int, verdict: str, ratio: float | None) -> None:
    got, got_ratio, reason = selfcheck.judge(tps, expected, errors, 4, SPEC)
    assert got == verdict and reason
    assert got_ratio == (pytest.approx(ratio) if ratio is not None else None)


def _settings(tmp_path: Path, llama_url: str, **block: Any) -> settings.Settings:
    port = int(llama_url.rsplit(":", 1)[1])
    profile = tiny_profile(Path("/unused.gguf"), port, parallel=2)
    profile["selfcheck"] = {"max_tokens": 8, "prompt_tokens": 16, **block}
    registry = write_registry(tmp_path / "profiles.yaml", {"tiny": profile})
    env = {"WRAPPER_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    return settings.build("tiny", str(registry), environ=env)


def _target(s: settings.Settings) -> selfcheck.Target:
    return selfcheck.Target(url=s.local_url, spec=s.profile.selfcheck, state_dir=s.env.state_path(),
                            parallel=s.server.parallel, profile=s.profile_name)


@pytest.mark.llama
def test_first_run_is_the_baseline_and_the_second_compares_with_it(tmp_path: Path, llama_url: str) -> None:
    s = _settings(tmp_path, llama_url)
    first = selfcheck.run(_target(s))
    assert first.verdict == "pass" and first.ratio is None and first.concurrency == 2 and first.requests >= 4
    assert first.completion_tokens == first.requests * 8 and first.prompt_tokens > 0 and first.throughput_tps > 0
    assert first.windows >= 1 and first.requests % 2 == 0
    assert first.duration_s < 30
    stored = json.loads((tmp_path / "state" / "selfcheck" / "expected.json").read_text())
    assert stored[first.key]["throughput_tps"] == first.throughput_tps
    second = selfcheck.run(_target(s))
    assert second.expected_tps == first.throughput_tps and second.ratio is not None
    assert second.expected_source and second.expected_source.startswith("last self-check")


@pytest.mark.llama
def test_far_below_expected_fails_and_asks_to_exit_when_the_profile_says_so(tmp_path: Path,
                                                                           llama_url: str) -> None:
    warn = selfcheck.run(_target(_settings(tmp_path, llama_url)), expected=1e9)
    assert warn.verdict == "fail" and warn.ratio is not None and warn.ratio < 0.5 and not warn.exit_requested
    strict = selfcheck.run(_target(_settings(tmp_path, llama_url, on_fail="exit")), expected=1e9)
    assert strict.verdict == "fail" and strict.exit_requested
    assert not (tmp_path / "state" / "selfcheck" / "expected.json").exists()  # a failure is never the baseline


@pytest.mark.llama
def test_cli_json_and_exit_status(tmp_path: Path, llama_url: str, clean_env: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["selfcheck", "--url", llama_url, "--concurrency", "1", "--requests", "2", "--json"],
                       catch_exceptions=False)
    # Default selfcheck block: 128-word prompts are ~750 byte-level tokens, inside a 1024-token slot.
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["requests"] >= 2 and data["concurrency"] == 1 and data["verdict"] == "pass"
    failed = runner.invoke(main, ["selfcheck", "--url", llama_url, "--requests", "2", "--expected", "1e9"])
    assert failed.exit_code == 1 and failed.stdout.startswith("fail:")
    down = runner.invoke(main, ["selfcheck", "--url", "http://127.0.0.1:1"])
    assert down.exit_code == 4 and "not answering" in down.output


@pytest.mark.llama
def test_selfcheck_leaves_a_receipt_beside_the_plan(tmp_path: Path, llama_url: str, tiny_dense: Path) -> None:
    from wrapper.plan import hardware, receipts

    s = _settings(tmp_path, llama_url)
    result = selfcheck.run(_target(s))
    measured = result.server_decode_tps or result.client_decode_tps
    assert measured
    receipts.record_measurement(s, tiny_dense, measured, kind="selfcheck", hw=hardware.for_settings(s))
    got = receipts.load(receipts.path_in(tmp_path / "state"))
    assert len(got) == 1
    r = got[0]
    assert r.kind == "selfcheck" and r.model == tiny_dense.name and r.parallel == 2
    assert r.measured_tok_s == (result.server_decode_tps or result.client_decode_tps) and r.measured_tok_s > 0
    assert r.predicted_mem_mib is not None and r.predicted_mem_mib > 0
