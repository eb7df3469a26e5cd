"""Pure decisions of bench-profile on synthetic numbers: CI, SLO, best config, adaptive shortlist, pruning,
spec errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from wrapper.bench import fit
from wrapper.bench import report as bench_report
from wrapper.bench.measuring import warmup_streams
from wrapper.bench.select import (
    ci_tight,
    main_effects,
    paired_tie,
    race_leaders,
    race_order,
    screen_drop,
    select,
    shortlist,
)
from wrapper.bench.spec import (
    Slo,
    SweepSpec,
    grid_requests,
    load_spec,
    plan_cells,
    race_requests,
    screen_requests,
)
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


def screened(tps: float, *, ttft: float = 100.0, status: str = "ok", **knobs: int) -> CellResult:
    """One adaptive screen row: `c` is the client's concurrency, the other knobs are server knobs."""
    c = knobs.pop("c")
    key = ",".join(f"{k}={v}" for k, v in knobs.items())
    return CellResult(f"{key}|c={c},p=64,n=32", key, dict(knobs), {"concurrency": c, "prompt_words": 64,
                      "max_tokens": 32, "rate": None}, status, None, reps=[tps] if tps else [], ttft_p95_ms=ttft,
                      decode_tps=50.0)


def additive_grid(burst: dict[str, float] | None = None) -> list[CellResult]:
    """parallel x threads x concurrency with purely multiplicative effects; `burst` scales named cells (a
    neighbour's CPU use during their one screening run)."""
    effect_p, effect_t, effect_c = {1: 1.0, 2: 1.3, 4: 1.1}, {1: 1.0, 2: 0.7}, {4: 1.0, 8: 1.05}
    rows = []
    for p, fp in effect_p.items():
        for t, ft in effect_t.items():
            for c, fc in effect_c.items():
                row = screened(1000 * fp * ft * fc, parallel=p, threads=t, c=c)
                row.reps = [row.reps[0] * (burst or {}).get(row.cell_key, 1.0)]
                rows.append(row)
    return rows


def test_main_effects_predict_each_cell_from_the_others() -> None:
    rows = additive_grid()
    predicted = main_effects(rows)
    assert predicted.keys() == {r.cell_key for r in rows}
    for r in rows:
        assert predicted[r.cell_key] == pytest.approx(math.log(r.throughput_tps), abs=1e-9)
    # A burst in one cell's run leaves its own prediction where the others put it.
    sunk = additive_grid(burst={"parallel=4,threads=2|c=4,p=64,n=32": 0.5})
    assert main_effects(sunk)["parallel=4,threads=2|c=4,p=64,n=32"] == pytest.approx(math.log(770.0))
    # A knob value that only one cell has: the others cannot say anything about it.
    lone = [*rows, screened(5000, parallel=16, threads=1, c=4)]
    assert "parallel=16,threads=1|c=4,p=64,n=32" not in main_effects(lone)


def test_a_screen_run_sunk_by_a_burst_still_reaches_the_race() -> None:
    best = "parallel=2,threads=1|c=8,p=64,n=32"
    # The burst hit the config's one start, so both its loads: 1365 tok/s measured as 819, 1300 as 780.
    rows = additive_grid(burst={best: 0.6, "parallel=2,threads=1|c=4,p=64,n=32": 0.6})
    by_config: dict[str, CellResult] = {}
    for r in sorted(rows, key=lambda r: -r.throughput_tps):
        by_config.setdefault(r.server_key, r)
    by_own_figure = [r.cell_key for r in by_config.values()]
    picked = [r.cell_key for r in shortlist(rows, 3, Slo())]
    assert picked[:3] == by_own_figure[:3] and best not in by_own_figure[:3]
    assert picked[3] == best  # the other cells rate it above everything outside the top 3
    # Without the burst it is simply the fastest, and the rescue slot goes to the next cell by score.
    calm = [r.cell_key for r in shortlist(additive_grid(), 3, Slo())]
    assert calm[0] == best and len(calm) == 4


def test_the_model_adds_a_finalist_but_never_drops_one_the_screen_ranked_top() -> None:
    # An interaction no main effect explains (measured on the CPU: batch_size 64 hurts only parallel > 1):
    # the additive model over-rates every parallel=1 cell, yet the screen's three fastest all stay.
    rows = additive_grid()
    odd = next(r for r in rows if r.cell_key == "parallel=4,threads=2|c=8,p=64,n=32")
    odd.reps = [3000.0]
    picked = [r.cell_key for r in shortlist(rows, 2, Slo())]
    assert picked[0] == odd.cell_key and len(picked) == 3


def test_shortlist_never_races_failed_cells_and_ranks_slo_breakers_last() -> None:
    rows = [screened(0, status="failed", parallel=8, c=4), screened(900, parallel=1, c=4),
            screened(5000, ttft=99999, parallel=4, c=4), screened(800, parallel=2, c=4)]
    picked = [r.server_key for r in shortlist(rows, 2, Slo())]
    assert picked == ["parallel=1", "parallel=2"]  # and the SLO breaker is never the rescued one
    assert shortlist([screened(0, status="failed", parallel=8, c=4)], 3, Slo()) == []


def test_shortlist_races_each_config_once_at_its_best_ranked_load() -> None:
    # Two loads of one config measure alike on the CPU; they would take two of the race's places.
    rows = [screened(2000, parallel=1, c=4), screened(1990, parallel=1, c=8), screened(1900, parallel=2, c=8),
            screened(1850, parallel=2, c=4), screened(1500, parallel=4, c=4), screened(1400, parallel=4, c=8)]
    picked = shortlist(rows, 2, Slo())
    assert [r.cell_key for r in picked[:2]] == ["parallel=1|c=4,p=64,n=32", "parallel=2|c=8,p=64,n=32"]
    assert len({r.server_key for r in picked}) == len(picked) == 3  # the rescued one is a third config


def test_race_ties_are_judged_round_by_round() -> None:
    # Every round moved both alike (a neighbour's burst): unpaired, the two overlap; paired, the second is
    # 10% slower in every round.
    fast, slow = [2000.0, 1200.0, 1800.0, 1500.0], [1800.0, 1080.0, 1620.0, 1350.0]
    assert not paired_tie(slow, fast)
    assert paired_tie([1990.0, 1250.0, 1700.0, 1560.0], fast)  # slower in some rounds, faster in others
    assert not paired_tie(slow[:3], fast)  # a cell that left the race early is no tie
    assert not paired_tie([1800.0], [2000.0])
    rows = [cell("parallel=4", fast), cell("parallel=1", slow)]
    rows[0].rss_mb, rows[1].rss_mb = 22.2, 19.9  # the slower one is measurably cheaper
    unpaired = select(rows, Slo())
    assert unpaired.best is not None and unpaired.best.server_key == "parallel=1"  # tied on the loose CI
    raced = select(rows, Slo(), paired=True)
    assert raced.best is not None and raced.best.server_key == "parallel=4" and len(raced.tied) == 1
    rows[1].reps = [1990.0, 1250.0, 1700.0, 1560.0]  # a real tie: the cheaper one wins, as in a grid
    tied = select(rows, Slo(), paired=True)
    assert tied.best is not None and tied.best.server_key == "parallel=1"


def test_the_two_leaders_race_on_and_only_they_can_be_picked() -> None:
    # Round 2 was slow for everyone: the ranking is by the rounds, not by one round's luck.
    reps = {"a": [1000.0, 500.0, 1000.0], "b": [1100.0, 560.0, 1080.0], "c": [1050.0, 540.0, 800.0],
            "d": [0.0, 0.0, 0.0]}
    assert race_leaders(reps) == ["b", "a"]
    assert race_leaders({"a": [], "b": [900.0]}) == ["b"]
    # After the final rounds the leaders have more rounds than the others; the pick is one of them even where
    # a dropped cell's mean of its three rounds looks higher (its rounds fell in a fast stretch).
    rows = [cell("parallel=1", [1000, 1010, 990, 700, 720, 710, 690]),
            cell("parallel=2", [1100, 1080, 1090, 760, 770, 780, 750]),
            cell("parallel=4", [1050, 1040, 1060])]
    sel = select(rows, Slo(), paired=True)
    assert sel.best is not None and sel.best.server_key == "parallel=2"
    assert "parallel=4|c=4,p=64,n=32" not in sel.tied


def test_screen_drops_the_other_loads_of_a_clearly_slow_config() -> None:
    done = [screened(2000, parallel=1, c=4), screened(1900, parallel=1, c=8), screened(1800, parallel=2, c=4)]
    slow = screened(1000, parallel=4, c=4)
    why = screen_drop(slow, [*done, slow], 0.6)
    assert why is not None and "50% of the fastest screened there (2000)" in why and "c=4" in why
    assert screen_drop(screened(1300, parallel=4, c=4), done, 0.6) is None  # 65%: kept
    assert screen_drop(slow, done, 0) is None  # switched off
    assert screen_drop(slow, [slow], 0.6) is None  # nothing to compare with yet
    # Only the same load counts: a fast heavier load elsewhere says nothing about this one.
    assert screen_drop(slow, [screened(5000, parallel=1, c=8)], 0.6) is None
    assert screen_drop(screened(0, status="failed", parallel=8, c=4), done, 0.6) is None


def test_race_rounds_rotate_the_order() -> None:
    orders = [race_order(3, i) for i in range(3)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert {o[0] for o in orders} == {0, 1, 2}  # none always runs first, right after the warm-up
    assert race_order(1, 5) == [0] and race_order(0, 2) == []


def test_screen_runs_whole_waves_and_the_race_a_grid_repetition() -> None:
    spec = SweepSpec.model_validate({"mode": "adaptive"})
    for c in (1, 3, 4, 8, 16):
        n = screen_requests(spec.adaptive, c)
        assert n % c == 0 and n >= 2 * c  # the same number of requests on every stream, two at least
        assert race_requests(spec, c) == grid_requests(spec.repeat, c)  # a round is measured like the grid
    assert screen_requests(spec.adaptive, 4) == 8 and screen_requests(spec.adaptive, 8) == 16
    assert grid_requests(spec.repeat, 4) == 16 and grid_requests(spec.repeat, 16) == 32
    more = SweepSpec.model_validate({"adaptive": {"first_requests": 10, "race_requests": 6}})
    assert screen_requests(more.adaptive, 4) == 12  # 10 rounded up to whole waves of 4
    assert race_requests(more, 4) == 6 and race_requests(more, 8) == 8  # set: as asked, one per stream at least
    assert spec.adaptive.rounds == 3 and spec.adaptive.final_rounds == 3


def test_adaptive_warm_up_fills_each_slot_once() -> None:
    assert warmup_streams(8, None, 1) == 8  # slot count unknown (and in the grid): one request per stream
    assert warmup_streams(8, 2, 1) == 2 and warmup_streams(4, 16, 1) == 4
    assert warmup_streams(8, 2, 3) == 6  # each of three instances has two slots
    assert warmup_streams(8, 0, 1) == 1


def test_slots_and_slot_context_read_from_props() -> None:
    props = {"default_generation_settings": {"n_ctx": 512}, "total_slots": 4}
    assert fit.from_props(props) == fit.Served(512, 4)
    assert fit.from_props({"total_slots": 0}) == fit.Served(None, None)  # 0 or absent: unknown, never "no slots"
    assert fit.from_props({"default_generation_settings": None, "total_slots": True}) == fit.Served()
    assert fit.from_props(["not", "a", "mapping"]) == fit.Served()


def test_grid_runs_recorded_with_successive_halving_settings_still_resume() -> None:
    # run.json of a run recorded before the race carries adaptive.eta (the whole spec is saved, grid runs too);
    # --resume re-reads that spec. An adaptive run of that time is refused (test_bench.py).
    spec = SweepSpec.model_validate({"mode": "adaptive", "adaptive": {"eta": 3, "first_requests": 4}})
    assert spec.adaptive.first_requests == 4 and not hasattr(spec.adaptive, "eta")
    with pytest.raises(ConfigError, match=r"adaptive\.finalist"):
        load_spec(None, {"adaptive.finalist": 2})


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


@pytest.mark.parametrize(("layers", "gpus", "side_by_side"), [
    (0, 1, True),      # CPU-only servers on a GPU host: nothing to share
    (999, 0, True),    # offloading settings on a host without a GPU: they run on the CPU
    (999, 1, False),   # review finding: offloading side by side, the first started would take every layer
    (None, 1, False),  # llama-server's own default offloads on a GPU build
])
def test_offloading_finalists_are_not_raced_side_by_side_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, layers: int | None, gpus: int, side_by_side: bool
) -> None:
    from types import SimpleNamespace

    from wrapper.bench import race
    from wrapper.bench.spec import ServerConfig
    from wrapper.plan import hardware

    host = hardware.Hardware(gpus=[hardware.Gpu(index=i, name="NVIDIA GeForce RTX 4090") for i in range(gpus)])
    monkeypatch.setattr(hardware, "for_settings", lambda s: host)
    monkeypatch.setattr(hardware, "tegra_gpu", lambda: None)
    sw = SimpleNamespace(spec=load_spec(None, {"server.parallel": [1, 2], "mode": "adaptive"}), settings=None,
                         profile_values={"n_gpu_layers": layers})
    servers = [ServerConfig((("parallel", 1),)), ServerConfig((("parallel", 2),))]
    why = race._shares_a_gpu(sw, servers)  # type: ignore[arg-type]
    assert (why is None) is side_by_side
