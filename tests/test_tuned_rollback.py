"""serve --auto-tune re-checks the tuned config on start and rolls it back when it measures clearly below
the figure bench-profile recorded (issue 12, "Guards at every step"). Staged with a store entry that claims
an impossible throughput for the tiny model, on a real llama-server."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_profile
from tests.supervisor_fixtures import FAST, Served
from wrapper import settings
from wrapper.launch import flags, rollback
from wrapper.launch.prepare import prepare
from wrapper.plan import hardware
from wrapper.tuning import apply as tuning
from wrapper.tuning.records import CellResult, ClientLoad
from wrapper.tuning.store import BestConfig, RunMeta, Store, default_path

pytestmark = [pytest.mark.llama, pytest.mark.slow]

IMPOSSIBLE_TPS = 1e7  # no CPU decodes ten million tokens a second, however tiny the model
LOAD = ClientLoad(concurrency=2, prompt_words=16, max_tokens=16)


def _registry(tmp_path: Path, model: Path, port: int) -> Path:
    profile = tiny_profile(model, port, parallel=1)
    profile["supervise"] = dict(FAST)
    profile["selfcheck"] = {"measure_s": 2.0, "timeout_s": 30.0}
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"tiny": profile}}, sort_keys=False))
    return path


def _stage_best(s: settings.Settings, model: Path, binary: str, run_id: str) -> None:
    """A best config for exactly this start's tuning key, claiming IMPOSSIBLE_TPS at LOAD."""
    caps = flags.detect(binary, s.env.state_path() / "cache")
    key = tuning.key_for(s, model, None, hardware.for_settings(s).fingerprint, version=caps.version,
                         binary=caps.path)
    client = {"concurrency": LOAD.concurrency, "prompt_words": LOAD.prompt_words, "max_tokens": LOAD.max_tokens,
              "rate": None}
    cell_key = f"parallel=2|c={LOAD.concurrency},p={LOAD.prompt_words},n={LOAD.max_tokens}"
    best = BestConfig(key, run_id, cell_key, {"llamacpp.parallel": 2}, IMPOSSIBLE_TPS, 100.0,
                      IMPOSSIBLE_TPS / 100 - 1, [], time.time(), LOAD)
    path = default_path(s.env.state_path())
    if run_id.startswith(tuning.FLEET_PREFIX):  # kept the way a config fetched from the fleet KV is kept
        tuning.keep_fleet_entry(path, key, replace(best, run_id=run_id.removeprefix(tuning.FLEET_PREFIX)))
        return
    with Store(path) as store:
        meta = RunMeta(run_id, key, "grid", "{}", "-", "-", 0)
        store.begin_run(meta)
        store.record_cell(meta, CellResult(cell_key, "parallel=2", {"llamacpp.parallel": 2}, client, "ok",
                                           reps=[IMPOSSIBLE_TPS * 0.99, IMPOSSIBLE_TPS * 1.01]))
        store.record_best(key, best)


@pytest.mark.parametrize("run_id", ["run-impossible", "fleet:run-impossible"])
def test_tuned_config_that_measures_badly_is_rolled_back(
    run_id: str, clean_env: pytest.MonkeyPatch, llama_server_bin: str, tiny_dense: Path, tmp_path: Path
) -> None:
    served = Served(tmp_path, llama_server_bin, tiny_dense)
    registry = _registry(tmp_path, tiny_dense, served.port)
    served.argv[-1] = str(registry)
    served.argv.append("--auto-tune")
    state = tmp_path / "state"
    s = settings.build("tiny", str(registry), environ={"WRAPPER_STATE_DIR": str(state), "HOME": str(tmp_path),
                                                      "LLAMA_SERVER_BIN": llama_server_bin})
    _stage_best(s, tiny_dense, llama_server_bin, run_id)
    served.start()
    try:
        status = served.wait_for(lambda st: bool(st["decisions"]) and st["decisions"][0].startswith(
            "auto-tune: rolled back") and st["state"] == "ready", timeout=120)
        parallel = {a["flag"]: a for a in status["llama_server"]["args"]}["--parallel"]
        assert parallel["value"] == "1" and parallel["origin"] == "profile"  # the profile's own config runs now
        check = status["selfcheck"]
        assert check["action"] == "rolled back to the profile's own config (tuning.fallback)"
        assert check["expected_tps"] == IMPOSSIBLE_TPS and check["ci_high"] < IMPOSSIBLE_TPS * 0.85
        assert run_id in status["decisions"][0] and "below" in status["decisions"][0]
        log = served.log
        assert f"auto-tune: {run_id} measured" in log and "starting the profile's own config" in log
        assert f"auto-tune: applied {run_id}" in log  # it did start tuned before the check
    finally:
        served.stop()
    ledger = json.loads(rollback.path_in(state).read_text())
    assert run_id in ledger and "below" in ledger[run_id]["why"]
    # The next start leaves the rolled-back config out instead of starting it again.
    launch = prepare(s, auto_tune=True)
    assert launch.tuned is None and launch.settings.server.parallel == 1
    assert any(f"{run_id} was rolled back on this node" in d for d in launch.decisions)
