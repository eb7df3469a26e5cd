"""`wrapper fleet`: the shipped profiles placed on the recorded announcements of the seed's fleet.

The Hub models are sized the way `wrapper plan` sizes them before a download: their GGUF headers read over
HTTP range requests, here from the local Hub stand-in serving header-only GGUFs with each model's real
shapes (layers, heads, vocabulary, experts), every matrix Q4_K.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from tests.hubserver import HubServer
from tests.placement_fixtures import DENSE_8B, Shape, write_header
from wrapper import settings
from wrapper.cli import main
from wrapper.plan import fleet

INVENTORY = REPO / "config" / "fleet" / "inventory.yaml"
REGISTRY = REPO / "config" / "llm_profiles.yaml"

SHAPES = {
    "qwen2.5-32b-5090": Shape(arch="qwen2", n_layer=64, n_embd=5120, n_head=40, n_head_kv=8, n_ff=27648,
                              n_vocab=152064, n_ctx_train=131072),
    "gpt-oss-20b-5090": Shape(arch="gpt-oss", n_layer=24, n_embd=2880, n_head=64, n_head_kv=8, key_length=64,
                              value_length=64, n_ff=2880, n_expert=32, n_expert_used=4, n_vocab=201088,
                              sliding_window=128, n_ctx_train=131072),
    "deepseek-70b-gguf-atlas": Shape(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672),
    "qwen3-30b-a3b-3090ti": Shape(arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
                                  key_length=128, value_length=128, n_ff=768, n_expert=128, n_expert_used=8,
                                  n_vocab=151936, n_ctx_train=40960),
    "qwen-7b": Shape(arch="qwen2", n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_ff=18944, n_vocab=152064,
                     n_ctx_train=32768),
    "llama3.1-8b-4090": DENSE_8B,
    "llama3.2-3b-jetson": Shape(n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192, tied=True),
    "qwen2.5-1.5b-cpu": Shape(arch="qwen2", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960,
                              n_vocab=151936, tied=True, n_ctx_train=32768),
    "nomic-embed-cpu": Shape(arch="nomic-bert", n_layer=12, n_embd=768, n_head=12, n_head_kv=12, n_ff=3072,
                             n_vocab=30522, tied=True, n_ctx_train=8192),
}


def test_inventory_reads_both_announcement_forms() -> None:
    nodes = {n.node_id: n for n in fleet.load_inventory(INVENTORY)}
    assert set(nodes) == {"pmoves-5090", "pmoves-3090ti", "pmoves-4090", "pmoves-jetson-1", "pmoves-jetson-2",
                          "pmoves-vps-kvm4-1", "pmoves-vps-kvm4-2", "pmoves-vps-kvm2"}
    gpu = nodes["pmoves-5090"].devices()[0]
    assert gpu.gpu == "NVIDIA GeForce RTX 5090" and gpu.vram_mib == 32768 and gpu.bandwidth_gbps == 1792.0
    laptop = nodes["pmoves-4090"].devices()[0]
    assert laptop.vram_mib == 16384 and laptop.bandwidth_gbps == 576.0
    orin = nodes["pmoves-jetson-1"]
    assert orin.unified_memory and orin.devices()[0].bandwidth_gbps == 204.8 and orin.gpus[0][1] == 65536
    assert nodes["pmoves-vps-kvm2"].gpus == [] and nodes["pmoves-vps-kvm2"].ram_mib == 4096


def test_fleet_places_the_shipped_profiles_on_the_recorded_fleet(hub: HubServer, tmp_path: Path,
                                                                 clean_env: pytest.MonkeyPatch) -> None:
    reg_env = settings.Environment.from_environ({})
    from wrapper.profiles import registry

    reg = registry.load(REGISTRY)
    for name, shape in SHAPES.items():
        spec = settings.build(name, registry=reg, env=reg_env).server
        assert spec.hf_repo_id and spec.hf_filename, name
        header = write_header(tmp_path / f"{name}.gguf", shape)
        hub.add_file(spec.hf_repo_id, spec.hf_filename, header, revision=spec.hf_revision or "main")
    clean_env.setenv("HF_ENDPOINT", hub.url)
    # The tiny profiles' model_path is relative to the working directory: run where no models/ folder is (the
    # quick start writes one into the checkout), so the test does not depend on what ran before it.
    clean_env.chdir(tmp_path)
    args = ["fleet", "--inventory", str(INVENTORY), "--config", str(REGISTRY)]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "node     pmoves-5090: NVIDIA GeForce RTX 5090 32768 MiB (1792.0 GB/s" in out.output
    assert "assign   (one profile per device" in out.output
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assigned = data["assignment"]
    # Every shipped profile with a model to size is placed, one per device (the registry's examples of other
    # kinds may be placed too when their repo has a header here).
    assert set(assigned) >= {*SHAPES, "smollm2-360m"}, data["nowhere"]
    where = {(f["node"], f["device"]) for f in assigned.values()}
    assert len(where) == len(assigned), "one profile per device"
    # The 70B (~40 GiB of weights, -ngl 80 in its profile) only fits as written where 40 GiB of GPU memory
    # is: the 64 GB Jetson's unified memory.
    assert (assigned["deepseek-70b-gguf-atlas"]["node"], assigned["deepseek-70b-gguf-atlas"]["device"]) == \
        ("pmoves-jetson-1", "GPU0")
    assert all(f["tok_s_ceiling"] > 0 for f in assigned.values() if f["device"] == "GPU0" and "999" in f["flags"])
    # The tiny profiles point at files that are not here and have no Hub source: said, not guessed.
    assert data["nowhere"]["tiny-dense"].startswith("cannot size its model")
    for f in data["fits"]:
        if f["node"].startswith("pmoves-vps") and f["profile"] == "qwen2.5-32b-5090":
            assert f["verdict"] == "no" and "CPU short by" in f["why"]
    assert f"{assigned['qwen3-30b-a3b-3090ti']['node']}" in out.output
