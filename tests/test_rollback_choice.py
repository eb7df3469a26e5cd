"""Which config a rolled-back tuned start falls back to (issue 12: "the previous config (or the profile's
own)"): the last tuned config that passed its self-check on this node, only while it is still stored, still
beats the defaults and was not rolled back itself."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from wrapper.launch import rollback
from wrapper.tuning.store import BestConfig, Store, TuningKey, default_path

KEY = TuningKey("tiny", "sha-model", "fp-host", "b1+abc")


def _best(run_id: str, tps: float = 120.0, key: TuningKey = KEY) -> BestConfig:
    return BestConfig(key, run_id, "parallel=2|c=2", {"llamacpp.parallel": 2}, tps, 100.0, tps / 100 - 1, [],
                      time.time())


def _stored(state: Path, *bests: BestConfig) -> None:
    with Store(default_path(state)) as store:
        for best in bests:
            store.record_best(best.key, best)


def test_falls_back_to_the_last_config_that_passed_here(tmp_path: Path) -> None:
    old, new = _best("run-old"), _best("run-new")
    _stored(tmp_path, old, new)
    rollback.record_good(tmp_path, old, "130.0 tok/s")
    rollback.record(tmp_path, "run-new", "measured 10 tok/s, below 100")
    got = rollback.fallback_for(tmp_path, new)
    assert got.run_id == "run-old" and got.target == "the previous tuned config run-old"
    assert "passed its self-check here" in got.why and "130.0 tok/s" in got.why


def test_profiles_own_config_when_no_previous_one_qualifies(tmp_path: Path) -> None:
    new = _best("run-new")
    assert rollback.fallback_for(tmp_path, new).run_id is None  # nothing ever passed here
    assert rollback.fallback_for(tmp_path, new).target == "the profile's own config"

    rollback.record_good(tmp_path, new, "130.0 tok/s")  # the rolled-back one itself is no fallback
    assert rollback.fallback_for(tmp_path, new).run_id is None

    old = _best("run-old")
    rollback.record_good(tmp_path, old, "130.0 tok/s")  # passed here, but no longer in the store
    got = rollback.fallback_for(tmp_path, new)
    assert got.run_id is None and "no longer in the tuning store" in got.why

    _stored(tmp_path, old)
    with sqlite3.connect(default_path(tmp_path)) as db:  # an older store may hold one below the defaults
        db.execute("UPDATE best SET throughput_tps=50, gain=-0.5 WHERE run_id='run-old'")
    got = rollback.fallback_for(tmp_path, new)
    assert got.run_id is None and "no longer beats the defaults" in got.why

    with sqlite3.connect(default_path(tmp_path)) as db:
        db.execute("UPDATE best SET throughput_tps=120, gain=0.2 WHERE run_id='run-old'")
    assert rollback.fallback_for(tmp_path, new).run_id == "run-old"
    rollback.record(tmp_path, "run-old", "measured 5 tok/s")
    got = rollback.fallback_for(tmp_path, new)
    assert got.run_id is None and "was rolled back since" in got.why


def test_last_good_is_kept_per_tuning_key(tmp_path: Path) -> None:
    other = TuningKey("tiny", "sha-model", "fp-other-host", "b1+abc")
    _stored(tmp_path, _best("run-here"), _best("run-there", key=other))
    rollback.record_good(tmp_path, _best("run-there", key=other), "90.0 tok/s")
    assert rollback.fallback_for(tmp_path, _best("run-new")).run_id is None
    rollback.record_good(tmp_path, _best("run-here"), "130.0 tok/s")
    assert rollback.fallback_for(tmp_path, _best("run-new")).run_id == "run-here"
    assert rollback.fallback_for(tmp_path, _best("run-new", key=other)).run_id == "run-there"


def test_a_config_that_passed_before_and_is_rolled_back_later_falls_back_past_itself(tmp_path: Path) -> None:
    """Review finding: with one remembered config per key, run-b passing once overwrote run-a, and rolling
    run-b back later went all the way to the profile's own config."""
    _stored(tmp_path, _best("run-a"), _best("run-b"), _best("run-c"))
    for run_id in ("run-a", "run-b", "run-c"):
        rollback.record_good(tmp_path, _best(run_id), "120.0 tok/s")
    rollback.record(tmp_path, "run-c", "measured 10 tok/s, below 100")  # run-c was rolled back earlier
    assert rollback.fallback_for(tmp_path, _best("run-b")).run_id == "run-a"
    rollback.record_good(tmp_path, _best("run-a"), "125.0 tok/s")  # passing again moves it first, no duplicate
    remembered = json.loads(rollback.good_path_in(tmp_path).read_text())
    assert [e["run_id"] for e in next(iter(remembered.values()))] == ["run-a", "run-c", "run-b"]


def test_the_one_entry_format_written_before_the_list_is_still_read(tmp_path: Path) -> None:
    _stored(tmp_path, _best("run-old"))
    path = rollback.good_path_in(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"tiny|sha-model|fp-host|b1+abc": {"run_id": "run-old", "at": "x", "measured": "1"}}))
    assert rollback.fallback_for(tmp_path, _best("run-new")).run_id == "run-old"
