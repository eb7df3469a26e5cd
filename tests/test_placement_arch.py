"""The memory model on real architectures: tied heads, SWA, GQA/MQA, MLA, MoE with shared experts,
recurrent state, multimodal projectors, against numbers a real llama-server reported for the same shapes
(benchmarks/plan_families.py prints the full table; two families run here for real)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from tests.placement_fixtures import load_log
from wrapper import settings
from wrapper.model import family_models, gguf_meta
from wrapper.plan import hardware, placement
from wrapper.plan.placement import MIB, PlanInputs, plan

# KV MiB llama-server (CPU, -c 8192 -np 4, f16, fa on) logged for each family's full synthetic model:
# benchmarks/plan_families.py, docs/benchmarks.md.
REPORTED_KV_MIB = {"llama3": 256.0, "qwen2.5": 28.0, "qwen3": 288.0, "qwen3moe": 96.0, "gemma3": 304.0,
                   "mixtral": 128.0, "deepseek2": 243.0, "gpt-oss": 66.0, "phi": 192.0}


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, gguf_meta.ModelMeta]:
    d = tmp_path_factory.mktemp("families")
    return {f.key: gguf_meta.read_local(family_models.write(d / f"{f.key}.gguf", f, header_only=True))
            for f in family_models.FAMILIES}


@pytest.mark.parametrize("key", sorted(REPORTED_KV_MIB))
def test_kv_matches_llama_server_per_family(families: dict[str, gguf_meta.ModelMeta], key: str) -> None:
    p = plan(families[key], PlanInputs(ctx=8192, parallel=4))
    assert p.kv_bytes / MIB == pytest.approx(REPORTED_KV_MIB[key], abs=0.01)


def test_tied_embedding_is_not_copied_on_cpu(families: dict[str, gguf_meta.ModelMeta]) -> None:
    # Regression (issue 14): a Gemma-3 model with a 262k vocabulary planned +45 % on CPU, all of it a second
    # copy of token_embd that llama.cpp only makes when the output layer sits on another device.
    meta = families["gemma3"]
    assert meta.output_tied and meta.n_vocab == 262208
    cpu = plan(meta, PlanInputs(ctx=8192, parallel=4))
    assert cpu.weights_cpu_bytes == meta.tensor_bytes  # every tensor once, no copy
    gpu = plan(meta, PlanInputs(ctx=8192, parallel=4, vram_mib=[24000]))
    assert gpu.n_gpu_layers > meta.n_layer  # the head is offloaded: now the copy exists, on the GPU
    assert gpu.weights_gpu_bytes + gpu.weights_cpu_bytes == meta.tensor_bytes + meta.embeddings_bytes
    assert gpu.weights_cpu_bytes == meta.embeddings_bytes


def test_mla_caches_one_latent_and_no_v(families: dict[str, gguf_meta.ModelMeta]) -> None:
    meta = families["deepseek2"]
    assert meta.mla and meta.n_head_kv == [1] * 27 and (meta.head_dim_k, meta.head_dim_v) == (576, 512)
    for flash in (True, False):
        p = plan(meta, PlanInputs(ctx=4096, flash_attn=flash))
        assert p.kv_bytes == 27 * 4096 * 576 * 2  # kv_lora_rank 512 + rope 64, f16, K only


def test_cpu_moe_moves_routed_experts_and_keeps_shared_ones(families: dict[str, gguf_meta.ModelMeta]) -> None:
    meta = families["deepseek2"]
    assert meta.n_expert_shared == 2 and meta.n_ff_expert == 176
    shexp = 26 * 3 * 256 * 352 * 2  # ffn_{gate,up,down}_shexp of the 26 MoE layers (layer 0 is dense)
    p = plan(meta, PlanInputs(ctx=4096, vram_mib=[64000], n_gpu_layers=placement.ALL_LAYERS,
                              n_cpu_moe=placement.ALL_LAYERS))
    assert p.weights_cpu_bytes == meta.embeddings_bytes + meta.expert_bytes
    non_expert = sum(layer.non_expert for layer in meta.layers)
    assert non_expert > shexp
    assert p.weights_gpu_bytes == non_expert + meta.output_bytes + meta.other_bytes  # shexp stays on the GPU
    half = plan(meta, PlanInputs(ctx=4096, vram_mib=[64000], n_gpu_layers=placement.ALL_LAYERS, n_cpu_moe=10))
    assert half.weights_cpu_bytes == meta.embeddings_bytes + sum(x.experts for x in meta.layers[:10])


def test_moe_compute_uses_the_expert_width(families: dict[str, gguf_meta.ModelMeta]) -> None:
    # Qwen3-30B-A3B: feed_forward_length 6144 is not what its 8 active experts (768 wide) compute; counting
    # it put the compute buffer at 4.5x llama-server's (109.5 vs 24.0 MiB on the synthetic model).
    p = plan(families["qwen3moe"], PlanInputs(ctx=8192, parallel=4))
    assert 24.0 <= p.devices[-1].compute_mib <= 24.0 * 1.1


def test_mmproj_lands_where_it_loads(families: dict[str, gguf_meta.ModelMeta]) -> None:
    meta, proj = families["gemma3"], 800 * MIB
    base = plan(meta, PlanInputs(ctx=4096, vram_mib=[24000]))
    on_gpu = plan(meta, PlanInputs(ctx=4096, vram_mib=[24000], mmproj_bytes=proj))
    assert on_gpu.weights_gpu_bytes - base.weights_gpu_bytes == proj
    kept = plan(meta, PlanInputs(ctx=4096, vram_mib=[24000], mmproj_bytes=proj, mmproj_offload=False))
    assert kept.weights_cpu_bytes - base.weights_cpu_bytes == proj
    cpu = plan(meta, PlanInputs(ctx=4096, mmproj_bytes=proj))
    assert cpu.weights_cpu_bytes == meta.tensor_bytes + proj


def test_hybrid_recurrent_layers_hold_state_not_kv(tmp_path: Path) -> None:
    path = tmp_path / "hybrid.gguf"
    w = gguf.GGUFWriter(str(path), "granitehybrid")
    heads_kv = [0, 0, 0, 8]  # three Mamba-2 layers, one attention layer
    for key, value in {"block_count": 4, "embedding_length": 1024, "attention.head_count": 16,
                       "ssm.conv_kernel": 4, "ssm.inner_size": 2048, "ssm.state_size": 128,
                       "ssm.group_count": 1, "context_length": 131072}.items():
        w.add_uint32(f"granitehybrid.{key}", value)
    w.add_array("granitehybrid.attention.head_count_kv", heads_kv)
    w.add_tensor_info("token_embd.weight", (1000, 1024), np.dtype(np.float16), 1000 * 1024 * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    meta = gguf_meta.read_local(path)
    assert meta.recurrent_layers == [True, True, True, False]
    state = (3 * (2048 + 2 * 128) + 128 * 2048) * 4  # conv + ssm state, f32, per sequence
    p = plan(meta, PlanInputs(ctx=8192, parallel=2))
    assert p.kv_bytes == 3 * state * 2 + 8192 * 8 * 64 * 2 * 2


def test_ctx_above_training_context_is_one_decision(families: dict[str, gguf_meta.ModelMeta]) -> None:
    p = plan(families["phi"], PlanInputs(ctx=8192))
    assert [d for d in p.decisions if "training context" in d] == [
        "ctx 8192 exceeds the model's training context 4096: output past it degrades unless the model is "
        "meant to be rope-scaled"]
    assert not any("training context" in d for d in plan(families["phi"], PlanInputs(ctx=4096)).decisions)


def test_all_layers_spelled_once(tmp_path: Path, tiny_dense: Path) -> None:
    reg = write_registry(tmp_path / "reg.yaml", {"p": tiny_profile(tiny_dense, free_port(), n_gpu_layers="all")})
    s = settings.build("p", str(reg), environ={"WRAPPER_STATE_DIR": str(tmp_path / "state")})
    hw = hardware.from_reading({"error": "no NVML"}, None, ram_available_mib=16000)
    inp, _ = placement.inputs_for(s, hw, vram_mib=[8000])
    assert inp.n_gpu_layers == 999 == placement.ALL_LAYERS  # the number `wrapper flags` passes for "all"
    assert plan(gguf_meta.read_local(tiny_dense), inp).n_gpu_layers == 999


# --- against a real llama-server: the two families the seed bug and MLA are about ---------------------

_SIZE = re.compile(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB")


def _reported(binary: str, model: Path, args: list[str]) -> dict[str, float]:
    out = {"model": 0.0, "KV": 0.0, "compute": 0.0}
    for m in _SIZE.finditer(load_log(binary, model, *args)):
        out[m[2]] += float(m[3])  # summed: an iSWA model logs one KV buffer per cache
    return out


@pytest.mark.llama
@pytest.mark.slow
@pytest.mark.parametrize("key", ["gemma3", "deepseek2"])
def test_family_plan_within_5pct_of_llama_server(llama_server_bin: str, tmp_path: Path, key: str) -> None:
    # Smaller than the benchmark's models (hidden 128, fewer layers for Gemma) so the test writes ~70 MB;
    # vocabulary, heads, window and MLA ranks stay real.
    fam = family_models.BY_KEY[key]
    small = dataclasses.replace(fam, n_embd=128, n_ff=512, n_layer=6 if key == "gemma3" else fam.n_layer,
                                kv={**fam.kv, "expert_feed_forward_length": 32} if key == "deepseek2" else fam.kv)
    path = family_models.write(tmp_path / f"{key}.gguf", small)
    real = _reported(llama_server_bin, path, ["-c", "8192", "-np", "4", "-fa", "on"])
    p = plan(gguf_meta.read_local(path), PlanInputs(ctx=8192, parallel=4))
    cpu = p.devices[-1]
    assert cpu.weights_mib == pytest.approx(real["model"], abs=0.01)
    assert cpu.kv_mib == pytest.approx(real["KV"], abs=0.01)
    total = cpu.weights_mib + cpu.kv_mib + cpu.compute_mib
    assert total == pytest.approx(sum(real.values()), rel=0.05), (real, cpu)
    assert json.dumps(p.summary())  # the plan serialises with the new fields
