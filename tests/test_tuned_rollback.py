"""serve --auto-tune re-checks the tuned config on start and rolls it back when it measures clearly below
the figure bench-profile recorded (issue 12, "Guards at every step"). Staged with a store entry that claims
an impossible throughput for the tiny model, on a real llama-server."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

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


def _registry(tmp_path: Path, model: Path, port: int, auto: bool = False) -> Path:
    profile = tiny_profile(model, port, parallel=1)
    if auto:
        profile["tuning"] = {"auto": True}
    profile["supervise"] = dict(FAST)
    profile["selfcheck"] = {"measure_s": 2.0, "timeout_s": 30.0}
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"tiny": profile}}, sort_keys=False))
    return path


def _stage_best(s: settings.Settings, model: Path, binary: str, run_id: str, tps: float = IMPOSSIBLE_TPS,
                values: dict[str, Any] | None = None) -> None:
    """A best config for exactly this start's tuning key, newer than any staged before, claiming `tps` at LOAD
    (IMPOSSIBLE_TPS: it will be rolled back; a fraction of a token a second: it will pass)."""
    values = values or {"llamacpp.parallel": 2}
    caps = flags.detect(binary, s.env.state_path() / "cache")
    key = tuning.key_for(s, model, None, hardware.for_settings(s).fingerprint, version=caps.version,
                         binary=caps.path)
    client = {"concurrency": LOAD.concurrency, "prompt_words": LOAD.prompt_words, "max_tokens": LOAD.max_tokens,
              "rate": None}
    cell_key = f"parallel=2|c={LOAD.concurrency},p={LOAD.prompt_words},n={LOAD.max_tokens}"
    baseline = tps / 2
    best = BestConfig(key, run_id, cell_key, values, tps, baseline, tps / baseline - 1, [], time.time(), LOAD)
    path = default_path(s.env.state_path())
    if run_id.startswith(tuning.FLEET_PREFIX):  # kept the way a config fetched from the fleet KV is kept
        tuning.keep_fleet_entry(path, key, replace(best, run_id=run_id.removeprefix(tuning.FLEET_PREFIX)))
        return
    with Store(path) as store:
        meta = RunMeta(run_id, key, "grid", "{}", "-", "-", 0)
        store.begin_run(meta)
        store.record_cell(meta, CellResult(cell_key, "parallel=2", values, client, "ok",
                                           reps=[tps * 0.99, tps * 1.01]))
        store.record_best(key, best)


def _auto_tuned(llama_server_bin: str, tiny_dense: Path, tmp_path: Path,
                by_profile: bool = False) -> tuple[Served, Path, settings.Settings]:
    """`wrapper serve --auto-tune` on the tiny profile (not started), its state directory and its settings;
    `by_profile`: auto-tune asked for by the profile's `tuning.auto: true` instead of the flag."""
    served = Served(tmp_path, llama_server_bin, tiny_dense)
    registry = _registry(tmp_path, tiny_dense, served.port, auto=by_profile)
    served.argv[-1] = str(registry)
    if not by_profile:
        served.argv.append("--auto-tune")
    state = tmp_path / "state"
    s = settings.build("tiny", str(registry), environ={"WRAPPER_STATE_DIR": str(state), "HOME": str(tmp_path),
                                                      "LLAMA_SERVER_BIN": llama_server_bin})
    return served, state, s


@pytest.mark.parametrize(("run_id", "by_profile"), [("run-impossible", False), ("fleet:run-impossible", False),
                                                   # review finding: serve ignored `tuning.auto: true`
                                                   ("run-impossible", True)])
def test_tuned_config_that_measures_badly_is_rolled_back(
    run_id: str, by_profile: bool, clean_env: pytest.MonkeyPatch, llama_server_bin: str, tiny_dense: Path,
    tmp_path: Path
) -> None:
    served, state, s = _auto_tuned(llama_server_bin, tiny_dense, tmp_path, by_profile)
    _stage_best(s, tiny_dense, llama_server_bin, run_id)
    served.start()
    try:
        status = served.wait_for(lambda st: bool(st["decisions"]) and st["decisions"][0].startswith(
            "auto-tune: rolled back") and st["state"] == "ready", timeout=120)
        parallel = {a["flag"]: a for a in status["llama_server"]["args"]}["--parallel"]
        assert parallel["value"] == "1" and parallel["origin"] == "profile"  # the profile's own config runs now
        check = status["selfcheck"]
        assert check["action"] == ("rolled back to the profile's own config (tuning.fallback): no earlier tuned "
                                   "config passed its self-check on this node")
        assert check["expected_tps"] == IMPOSSIBLE_TPS and check["ci_high"] < IMPOSSIBLE_TPS * 0.85
        assert run_id in status["decisions"][0] and "below" in status["decisions"][0]
        assert "now serving the profile's own config: no earlier tuned config passed" in status["decisions"][0]
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


def _args(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["flag"]: a for a in status["llama_server"]["args"]}


def _selfcheck_of(run_id: str) -> Any:
    return lambda st: (st["state"] == "ready" and st["selfcheck"] is not None
                       and st["selfcheck"]["expected_source"] == f"bench-profile {run_id}")


@pytest.mark.parametrize("previous_now_slow", [False, True])
def test_rollback_goes_to_the_previous_tuned_config_that_passed_here(
    previous_now_slow: bool, clean_env: pytest.MonkeyPatch, llama_server_bin: str, tiny_dense: Path, tmp_path: Path
) -> None:
    """issue 12: a rolled-back tuned config falls back to the previous config (or the profile's own)."""
    served, state, s = _auto_tuned(llama_server_bin, tiny_dense, tmp_path)
    good = {"llamacpp.parallel": 2, "llamacpp.batch_size": 256}
    _stage_best(s, tiny_dense, llama_server_bin, "run-good", tps=0.5, values=good)
    served.start()  # 1: run-good is applied and passes its self-check here
    try:
        status = served.wait_for(_selfcheck_of("run-good"), timeout=120)
        assert status["selfcheck"]["verdict"] == "pass" and status["selfcheck"]["action"] is None
    finally:
        served.stop()
    remembered = json.loads(rollback.good_path_in(state).read_text())
    assert [e["run_id"] for entries in remembered.values() for e in entries] == ["run-good"]

    if previous_now_slow:
        # The host got slower since run-good passed: its own check now lands below its (raised) figure too.
        with sqlite3.connect(default_path(state)) as db:
            db.execute("UPDATE best SET throughput_tps=? WHERE run_id='run-good'", (IMPOSSIBLE_TPS,))
            db.execute("UPDATE cells SET reps_json=? WHERE run_id='run-good'",
                       (json.dumps([IMPOSSIBLE_TPS * 0.99, IMPOSSIBLE_TPS * 1.01]),))
    time.sleep(0.01)  # strictly newer created_at
    _stage_best(s, tiny_dense, llama_server_bin, "run-bad", values={"llamacpp.parallel": 2})
    served.start()  # 2: the newer run-bad is applied, measures far below its figure and is rolled back
    try:
        rolled = served.wait_for(lambda st: st["selfcheck"] is not None and bool(st["selfcheck"]["action"]),
                                 timeout=120)
        assert rolled["selfcheck"]["expected_source"] == "bench-profile run-bad"
        assert rolled["selfcheck"]["action"].startswith(
            "rolled back to the previous tuned config run-good (tuning.fallback): it passed its self-check here")
        status = served.wait_for(_selfcheck_of("run-good"), timeout=120)
        decision = status["decisions"][0]
        assert decision.startswith("auto-tune: rolled back: run-bad measured") and "below" in decision
        assert "now serving the previous tuned config run-good: it passed its self-check here" in decision
        args = _args(status)
        assert args["--batch-size"]["value"] == "256" and args["--batch-size"]["origin"] == "tuning:run-good"
        assert any("applied run-good" in d and "passed its self-check on this node" in d
                   for d in status["decisions"])
        check = status["selfcheck"]
        if previous_now_slow:
            # Clearly below too, but a fallback is never rolled back in turn: it reports and keeps serving.
            assert check["verdict"] in ("degraded", "fail") and check["action"] is None
            time.sleep(1.0)
            assert served.status() is not None and served.proc is not None and served.proc.poll() is None
            assert _args(served.status() or {})["--batch-size"]["origin"] == "tuning:run-good"
        else:
            assert check["verdict"] == "pass" and check["action"] is None
        assert "stopping it and starting the previous tuned config run-good" in served.log
    finally:
        served.stop()
    ledger = json.loads(rollback.path_in(state).read_text())
    assert list(ledger) == ["run-bad"]  # run-good was never rolled back, even when it measured slow
    # A restart serves what the rollback fell back to, not the profile's own config.
    launch = prepare(s, auto_tune=True)
    assert launch.tuned is not None and launch.tuned.run_id == "run-good"
    assert launch.settings.server.batch_size == 256
    assert launch.settings.origin("llamacpp.batch_size") == "tuning:run-good"
    assert any("run-bad was rolled back on this node" in d for d in launch.decisions)
