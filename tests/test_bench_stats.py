"""Statistics that admit doubt and the guards around the best config, on synthetic numbers (issue 12)."""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from wrapper.bench import fit
from wrapper.bench.select import paired_decision, paired_ratio, select
from wrapper.bench.spec import Slo
from wrapper.tuning import fleet
from wrapper.tuning.records import CellResult, log_ci
from wrapper.tuning.store import BelowDefaults, BestConfig, Store, TuningKey, below_defaults

KEY = TuningKey("tiny", "sha", "hw", "b1")


def cell(key: str, reps: list[float], *, baseline: bool = False, rss: float | None = None,
         client: str = "c=4,p=64,n=32") -> CellResult:
    return CellResult(f"{key}|{client}", key, {}, {"concurrency": 4}, "ok", None, baseline=baseline, reps=reps,
                      ttft_p95_ms=100.0, decode_tps=50.0, latency_p95_ms=300.0, rss_mb=rss)


def best(tps: float, base: float | None, gain: float | None, run_id: str = "run-1") -> BestConfig:
    return BestConfig(KEY, run_id, "parallel=1|c=4,p=64,n=32", {"llamacpp.parallel": 1}, tps, base, gain, [],
                      time.time())


def test_regression_noisy_sweep_chose_parallel_1_at_minus_89_percent() -> None:
    # The shape of the sweep: CIs that never tightened, parallel=1 (fewest slots, "cheapest") far
    # below the defaults; the old rule picked it because its CI ([-1301, 3788]) overlapped the fastest.
    results = [
        cell("defaults", [1243.4, 300.0, 2186.8], baseline=True),
        cell("parallel=1", [138.3, 10.0, 266.6], rss=200),
        cell("parallel=2", [900.0, 150.0, 1650.0], rss=300),
        cell("parallel=4", [1300.0, 400.0, 2200.0], rss=400),
    ]
    sel = select(results, Slo())
    assert sel.best is not None and sel.best.server_key == "parallel=4"
    lo, hi = results[1].ci
    assert lo is not None and hi is not None and 0 < lo < 138.3 < hi  # log scale: never negative


def test_nothing_above_the_defaults_means_keep_the_defaults() -> None:
    results = [cell("defaults", [1000, 1010, 990], baseline=True), cell("parallel=1", [500, 510, 490], rss=100)]
    sel = select(results, Slo())
    assert sel.best is None and "keep the defaults" in sel.reason and sel.gain == pytest.approx(-0.5)


def test_cheaper_means_measured_memory_not_fewer_slots() -> None:
    fast = cell("parallel=8", [200, 215, 190], rss=1000)
    tied_small = cell("parallel=2", [195, 205, 185], rss=500)
    assert select([fast, tied_small], Slo()).best is tied_small
    # Without a measured saving, the fastest wins: a smaller slot count alone is not "cheaper".
    tied_same = cell("parallel=2", [195, 205, 185], rss=980)
    assert select([fast, tied_same], Slo()).best is fast
    assert select([fast, cell("parallel=2", [195, 205, 185])], Slo()).best is fast


def test_log_ci_is_never_negative_and_zero_run_gives_zero_floor() -> None:
    lo, hi = log_ci([5.0, 3000.0, 40.0])
    assert lo is not None and hi is not None and 0 < lo < hi
    assert log_ci([0.0, 100.0]) == (0.0, 100.0)
    assert log_ci([100.0]) == (None, None)


def test_paired_comparison_decides_only_beyond_the_noise() -> None:
    # D L D L D L D: the candidate 20% faster in every pair, while the host drifts 2x slower over time.
    defaults = [100.0, 90.0, 80.0, 70.0, 60.0]
    leader = [1.2 * (a + b) / 2 for a, b in itertools.pairwise(defaults)]
    ratio, lo, _, n = paired_ratio(leader, defaults)
    assert n == 4 and ratio == pytest.approx(1.2, rel=0.01) and lo is not None and lo > 1
    assert paired_decision(leader, defaults, min_pairs=3) == "win"
    assert paired_decision(leader[:2], defaults[:3], min_pairs=3) is None  # too few pairs yet
    assert paired_decision([0.7 * x for x in leader], defaults, min_pairs=3) == "defaults"
    noisy_l, noisy_d = [100.0, 130.0, 80.0, 120.0], [110.0, 90.0, 125.0, 95.0, 115.0]
    assert paired_decision(noisy_l, noisy_d, min_pairs=3) is None


def test_store_refuses_a_best_below_the_defaults(tmp_path: Path) -> None:
    assert below_defaults(best(138.3, 1243.4, -0.889)) is not None
    assert below_defaults(best(120.0, 100.0, 0.2)) is None
    assert below_defaults(best(120.0, None, None)) is None  # --no-baseline: not compared, said so in notes
    with Store(tmp_path / "t.sqlite") as store:
        with pytest.raises(BelowDefaults, match="below llama-server's defaults"):
            store.record_best(KEY, best(138.3, 1243.4, -0.889))
        assert store.best_for(KEY) is None


def test_fleet_never_shares_or_takes_a_best_below_the_defaults() -> None:
    # No NATS needed: the guard answers before any connection is tried.
    note = fleet.publish_best("nats://127.0.0.1:1", best(138.3, 1243.4, -0.889))
    assert note.startswith("fleet: best config not shared") and "below" in note
    raw = json.dumps({"key": KEY.__dict__, "run_id": "run-x", "cell_key": "c", "values": {"llamacpp.parallel": 1},
                      "throughput_tps": 138.3, "baseline_tps": 1243.4, "gain": -0.889, "argv": [],
                      "created_at": time.time()}).encode()
    with pytest.raises(fleet.Rejected) as err:
        fleet.decode(raw)
    assert err.value.field == "throughput_tps"


def test_older_store_with_a_best_below_defaults_is_not_applied(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port, tiny_profile, write_registry
    from wrapper import settings
    from wrapper.tuning import apply as tuning
    from wrapper.tuning.store import default_path

    reg = write_registry(tmp_path / "reg.yaml", {"tiny": tiny_profile(tmp_path / "m.gguf", free_port())})
    s = settings.build("tiny", str(reg), {"WRAPPER_STATE_DIR": str(tmp_path / "state")})
    path = default_path(s.env.state_path())
    Store(path).close()
    # An older version wrote this row (no guard then): parallel=1 at -88.9% vs the defaults.
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO best (profile, model_id, hardware_fp, build, run_id, cell_key, values_json,"
                   " throughput_tps, baseline_tps, gain, argv_json, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   ("tiny", "sha", "hw", "b1", "run-old", "parallel=1|c=4", json.dumps({"llamacpp.parallel": 1}),
                    138.3, 1243.4, -0.889, "[]", time.time()))
    values, origin, notes = tuning.tuning_layer(s, "sha", "hw", "b1")
    assert values == {} and origin == ""
    assert any("not applied" in n and "below llama-server's defaults" in n for n in notes)
    assert tuning.best_applied(s, TuningKey("tiny", "sha", "hw", "b1")) is None


@pytest.mark.parametrize(("ctx", "parallel", "streams", "slot"), [
    (512, 2, 1, 256), (500, 3, 1, 256), (700, 2, 1, 512), (300, 1, 1, 512), (100, 1, 1, 256),
    (1024, None, 1, 1024), (1024, None, 4, 256), (0, 2, 1, None),
])
def test_slot_context_as_llama_server_rounds_it(ctx: int, parallel: int | None, streams: int,
                                                slot: int | None) -> None:
    # Measured on the bundled build: /slots reports these n_ctx values for -c ctx -np parallel.
    assert fit.slot_ctx({"ctx_size": ctx, "parallel": parallel}, streams)[0] == slot


def test_fit_reason_counts_tokens_not_words() -> None:
    assert fit.reason(16, 16, 256, "x", None) is None  # 16 words: at least 16 tokens, fits
    why = fit.reason(16, 16, 256, "ctx_size 512 / parallel 2", {16: 300})
    assert why is not None and "300 prompt tokens + 16 output > 256-token slot" in why
