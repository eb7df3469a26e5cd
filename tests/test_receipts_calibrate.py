"""Receipts that calibrate: a real self-check on a real llama-server leaves predicted and measured tok/s and
memory, and `wrapper plan` then shows a calibrated band resting on it.

Regression (issue 14): 33 receipts written in one afternoon all had predicted_tok_s and measured_mem_mib
null, because the CPU bandwidth measured by one command was not kept and memory was never recorded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import write_registry
from tests.supervisor_fixtures import Served
from wrapper.cli import main
from wrapper.plan import receipts

pytestmark = [pytest.mark.llama, pytest.mark.slow]


def test_selfcheck_receipt_has_predicted_and_measured_speed_and_memory_and_plan_calibrates(
    llama_server_bin: str, tiny_dense: Path, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    served = Served(tmp_path, llama_server_bin, tiny_dense, ctx_size=1024, parallel=1,
                    env={"WRAPPER_STATE_DIR": str(state)})
    registry = tmp_path / "profiles.yaml"
    profiles = {"tiny": json.loads(json.dumps(_profile(registry)))}
    profiles["tiny"]["selfcheck"] = {"enabled": True, "max_tokens": 8, "prompt_tokens": 16, "requests": 2,
                                     "timeout_s": 60}
    write_registry(registry, profiles)
    served.start()
    try:
        served.wait_for(lambda s: s.get("selfcheck") is not None, timeout=120)
        file = receipts.path_in(state)
        deadline = time.monotonic() + 60
        while not receipts.load(file) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        served.stop()
    got = receipts.load(receipts.path_in(state))
    assert len(got) == 1, served.log[-2000:]
    r = got[0]
    assert r.kind == "selfcheck" and r.model == tiny_dense.name
    assert r.measured_tok_s > 0
    assert r.predicted_tok_s is not None and r.predicted_tok_s > 0, "the CPU bandwidth is measured and kept"
    assert r.measured_mem_mib is not None and r.measured_mem_mib > 1, "llama-server's peak RSS"
    assert r.predicted_mem_mib is not None and r.predicted_mem_mib > 0
    assert (state / "host-facts.json").is_file()

    clean_env.setenv("WRAPPER_STATE_DIR", str(state))
    out = CliRunner().invoke(main, ["plan", "--profile", "tiny", "--config", str(registry)])
    assert out.exit_code == 0, out.output
    assert "forecast " in out.output and "1 receipt(s) on this hardware (this model)" in out.output
    data = json.loads(CliRunner().invoke(main, ["plan", "--profile", "tiny", "--config", str(registry),
                                                "--json"]).stdout)
    assert data["forecast"]["receipts"] == 1 and data["forecast"]["low_tok_s"] > 0
    assert data["receipts_on_host"] == 1


def _profile(registry: Path) -> dict[str, object]:
    import yaml

    data = yaml.safe_load(registry.read_text())
    profiles = data.get("profiles", data)
    return dict(profiles["tiny"])
