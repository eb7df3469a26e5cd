"""Pure decisions of bench-profile on synthetic numbers: CI, SLO, best config, halving, pruning, spec errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrapper.bench import report as bench_report
from wrapper.bench.select import ci_tight, halving_rungs, select, survivors
from wrapper.bench.spec import Slo, SweepSpec, load_spec, plan_cells
from wrapper.errors import ConfigError
from wrapper.tuning.records import CellResult, mean_ci


def cell(key: str, reps: list[float], *, ttft: float = 100.0, decode: float = 50.0, cost: float = 1.0,
         baseline: bool = False, status: str = "ok", client: str = "c=4,p=64,n=32") -> CellResult:
    return CellResult(f"{key}|{client}", key, {}, {"concurrency": 4}, status, None, baseline=baseline, reps=reps,
                      ttft_p95_ms=ttft, decode_tps=decode, latency_p95_ms=ttft * 3, cost=(cost,))


def test_mean_ci_matches_student_t() -> None:
    mean, lo, hi = mean_ci([10.0, 12.0, 14.0])
    assert mean == 12.0
    assert lo is not None and hi is not None
    assert hi - mean == pytest.approx(4.303 * 2.0 / 3 ** 0.5, rel=1e-3)
    assert mean_ci([5.0]) == (5.0, None, None)


def test_ci_tight_needs_min_reps_and_narrow_interval() -> None:
    assert not ci_tight([100.0, 100.0], 0.05, 3)
    assert ci_tight([100.0, 101.0, 99.0], 0.05, 3)
    assert not ci_tight([100.0, 150.0, 60.0], 0.05, 3)


def test_best_is_fastest_meeting_slo_and_gain_uses_same_load_baseline() -> None:
    results = [
        cell("defaults", [100, 101, 99], baseline=True),
        cell("parallel=4", [200, 201, 199], cost=4),
        cell("parallel=8", [300, 301, 299], ttft=5000, cost=8),  # fastest but breaks the TTFT SLO
    ]
    sel = select(results, Slo())
    assert sel.best is not None and sel.best.server_key == "parallel=4"
    assert "p95 TTFT" in sel.rejected["parallel=8|c=4,p=64,n=32"]
    assert sel.gain == pytest.approx(1.0)


def test_overlapping_cis_no_longer_go_to_fewer_slots() -> None:
    # Issue 12: "cheaper" was the cost order (fewer slots); now only measured memory counts (test_bench_stats).
    results = [cell("parallel=8", [200, 215, 190], cost=8), cell("parallel=2", [195, 205, 185], cost=2)]
    sel = select(results, Slo())
    assert sel.best is not None and sel.best.server_key == "parallel=8"
    assert sel.tied == ("parallel=8|c=4,p=64,n=32", "parallel=2|c=4,p=64,n=32")


def test_no_cell_meets_slo_says_why() -> None:
    sel = select([cell("parallel=1", [100, 100, 100], decode=1.0)], Slo(min_decode_tps=5))
    assert sel.best is None
    assert "per-stream decode 1.0 tok/s < 5" in sel.reason


def test_successive_halving_rungs_and_survivors() -> None:
    assert halving_rungs(27, 3) == [27, 9, 3]
    assert halving_rungs(16, 3) == [16, 6, 2]
    assert halving_rungs(3, 3) == [3]
    rung = [cell(f"p={i}", [float(i)]) for i in range(9)] + [cell("broken", [], status="failed")]
    rung.append(cell("slow-ttft", [1000.0], ttft=9999))
    kept = survivors(rung, 3, Slo())
    assert [r.server_key for r in kept] == ["p=8", "p=7", "p=6"]


def test_plan_prunes_ctx_per_slot_and_ubatch_over_batch_with_reasons() -> None:
    spec = SweepSpec.model_validate({"server": {"parallel": [1, 8], "ctx_size": [512], "ubatch_size": [64, 1024],
                                                "batch_size": [512]},
                                     "client": {"concurrency": [1], "prompt_words": [256], "max_tokens": [32]}})
    cells, pruned = plan_cells(spec, {"ctx_size": 512})
    reasons = {p.cell.server.key: p.reason for p in pruned}
    # 512 / 8 = 64, which llama-server rounds up to a 256-token slot; 256 words are >= 256 tokens.
    eight = reasons["parallel=8,batch_size=512,ubatch_size=64,ctx_size=512"]
    assert "> 256-token slot (ctx_size 512 / parallel 8" in eight
    assert "ubatch_size 1024 > batch_size 512" in reasons["parallel=1,batch_size=512,ubatch_size=1024,ctx_size=512"]
    assert [c.server.key for c in cells] == ["defaults", "parallel=1,batch_size=512,ubatch_size=64,ctx_size=512"]


def test_spec_typos_and_bad_values_are_errors_with_paths(tmp_path: Path) -> None:
    bad = tmp_path / "spec.yaml"
    bad.write_text("server:\n  paralel: [1, 2]\nclient:\n  concurrency: [0]\n")
    with pytest.raises(ConfigError) as err:
        load_spec(bad, {})
    assert "server.paralel" in str(err.value) and "client.concurrency.0" in str(err.value)
    spec = load_spec(None, {"server.parallel": [1, 2], "mode": "adaptive"})
    assert spec.server.parallel == [1, 2] and spec.mode == "adaptive"


def test_report_marks_the_frontier() -> None:
    cells = [cell("a", [100, 100]), cell("b", [200, 200], ttft=50), cell("c", [150, 150], ttft=500)]
    assert [c.server_key for c in bench_report.frontier(cells)] == ["b"]
    svg = bench_report.frontier_chart(cells, "b|c=4,p=64,n=32")
    assert svg.startswith("<svg") and 'r="6"' in svg


def test_cost_accepts_word_valued_knobs() -> None:
    # Regression: a profile with n_gpu_layers: all made every cell's cost computation raise ValueError.
    from wrapper.bench.spec import _cost_number

    assert _cost_number("all") == float("inf")
    assert _cost_number("auto") == 0.0
    assert _cost_number(None) == 0.0 and _cost_number(8) == 8.0 and _cost_number("16") == 16.0
