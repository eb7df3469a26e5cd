"""The joint search: configurations that fit when no single knob does, ranked by predicted tok/s."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.placement_fixtures import Shape, write_header
from wrapper.model.gguf_meta import ModelMeta, read_local
from wrapper.plan import placement, search
from wrapper.plan.placement import PlanInputs

# Qwen2.5-32B's shapes (64 layers, GQA 40/8, 152k vocabulary), every matrix Q4_K: ~17.5 GiB of weights.
QWEN25_32B = Shape(arch="qwen2", n_layer=64, n_embd=5120, n_head=40, n_head_kv=8, n_ff=27648, n_vocab=152064,
                   n_ctx_train=131072)


@pytest.fixture(scope="module")
def qwen32(tmp_path_factory: pytest.TempPathFactory) -> ModelMeta:
    return read_local(write_header(tmp_path_factory.mktemp("h") / "qwen32.gguf", QWEN25_32B))


def _inputs() -> PlanInputs:
    # The profile says -ngl all and ctx 131072; the machine has 16 GiB of VRAM and 24 GiB of RAM.
    return PlanInputs(vram_mib=[16384], ram_mib=24576, ctx=131072, parallel=1, n_gpu_layers=10**6,
                      gpu_bandwidth_gbps=[576.0], cpu_bandwidth_gbps=60.0)


def test_qwen32b_at_128k_on_16gib_fits_only_by_turning_two_knobs(qwen32: ModelMeta) -> None:
    inp = _inputs()
    assert placement.plan(qwen32, inp).verdict == "refuse"
    for knob in search.ALL_KNOBS:
        assert search.search(qwen32, inp, knobs=[knob]) == [], f"{knob} alone should not fit"
    options = search.search(qwen32, inp)
    assert options, "a two-knob change fits"
    speeds = [o.tok_s_ceiling or 0 for o in options]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] > 0
    for o in options:
        assert len(o.changed) >= 2 and "offload" in o.changed, o
        again = placement.plan(qwen32, inp.model_copy(update={
            "ctx": o.ctx, "parallel": o.parallel, "n_gpu_layers": o.n_gpu_layers, "n_cpu_moe": o.n_cpu_moe,
            "cache_type_k": o.cache_type_k, "cache_type_v": o.cache_type_v}), explore=False)
        assert again.verdict == "ship", o
        assert any(w.startswith("ctx 131072 ->") or w.startswith("KV cache") for w in o.gives_up)
        assert any("layer(s) on the CPU" in w for w in o.gives_up)


def test_step_down_prefers_a_smaller_ctx_and_never_turns_a_knob_it_was_not_given(qwen32: ModelMeta) -> None:
    inp = PlanInputs(vram_mib=[24576], ram_mib=32768, ctx=131072, parallel=4, n_gpu_layers=10**6,
                     gpu_bandwidth_gbps=[1008.0], cpu_bandwidth_gbps=60.0)
    chosen = search.step_down(qwen32, inp, ["ctx", "parallel"], offload=(65, 0))
    assert chosen is not None and chosen.changed == ["ctx"] and chosen.parallel == 4
    assert chosen.n_gpu_layers == 65 and chosen.cache_type_k == "f16"
    assert search.step_down(qwen32, inp, ["parallel"], offload=(65, 0)) is None


def test_all_layers_is_spelled_like_wrapper_flags() -> None:
    assert search.spell_ngl(10**6, 64) == "999" and search.spell_ngl(65, 64) == "65"
    assert search.spell_ngl(40, 64) == "40"


def test_plan_cli_shows_options_the_ctx_warning_and_keeps_the_measured_bandwidth(tmp_path: Path, qwen32: ModelMeta,
                                                   clean_env: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from tests.conftest import free_port, tiny_profile, write_registry
    from wrapper.cli import main

    model = write_header(tmp_path / "qwen32.gguf", QWEN25_32B)
    reg = write_registry(tmp_path / "reg.yaml", {"q32": tiny_profile(model, free_port(), ctx_size=262144,
                                                                      n_gpu_layers="all")})
    clean_env.setenv("WRAPPER_STATE_DIR", str(tmp_path / "state"))
    args = ["plan", "--profile", "q32", "--config", str(reg), "--vram-mib", "16384", "--ram-mib", "24576",
            "--gpu", "RTX 4090 Laptop"]
    out = CliRunner().invoke(main, [*args, "--measure-bandwidth"])
    assert out.exit_code == 5, out.output
    assert (tmp_path / "state" / "host-facts.json").is_file()
    assert "exceeds the model's training context 131072" in out.output
    assert "-ngl 999" in out.output and "1000000" not in out.output
    assert "options  (fit together; fastest first)" in out.output and "gives up: ctx 262144 ->" in out.output
    assert "576 GB/s (spec sheet (RTX 4090 Laptop))" in out.output
    # Without --measure-bandwidth: the figure measured above on this host is used (kept in the state dir).
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert data["n_gpu_layers"] == 999 and data["options"] and data["options"][0]["tok_s_ceiling"] > 0
