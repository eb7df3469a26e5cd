"""GGUF header -> ModelMeta: shapes, exact tensor bytes by group, split files, Hub range reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hubserver import HubServer
from tests.placement_fixtures import (
    DENSE_8B,
    GEMMA3_LIKE,
    MLA_LIKE,
    MOE_8X7B,
    Shape,
    expected_bytes,
    write_header,
    write_split,
)
from wrapper.errors import ModelUnavailable, ModelVerificationFailed
from wrapper.model import gguf_header, gguf_meta


def groups(meta: gguf_meta.ModelMeta) -> dict[str, int]:
    return {"embeddings": meta.embeddings_bytes, "output": meta.output_bytes,
            "non_expert": sum(x.non_expert for x in meta.layers), "experts": meta.expert_bytes}


@pytest.mark.parametrize("shape", [DENSE_8B, MOE_8X7B, GEMMA3_LIKE, MLA_LIKE], ids=["dense", "moe", "swa", "kv-dims"])
def test_exact_bytes_by_group(tmp_path: Path, shape: Shape) -> None:
    meta = gguf_meta.read_local(write_header(tmp_path / "m.gguf", shape))
    assert groups(meta) == expected_bytes(shape)
    assert meta.n_layer == shape.n_layer and len(meta.layers) == shape.n_layer
    assert meta.n_head_kv == [shape.n_head_kv] * shape.n_layer
    assert meta.output_tied == shape.tied


def test_dense_8b_shape_and_size(tmp_path: Path) -> None:
    meta = gguf_meta.read_local(write_header(tmp_path / "m.gguf", DENSE_8B))
    assert (meta.architecture, meta.n_embd, meta.n_head, meta.head_dim_k, meta.head_dim_v) == (
        "llama", 4096, 32, 128, 128)
    assert (meta.n_ctx_train, meta.n_vocab, meta.n_expert, meta.is_moe) == (131072, 128256, 0, False)
    # 8.03B parameters at Q4_K's 4.5 bits: the file a real Q4_K-only 8B would have, ~4.2 GiB.
    assert 4.1 < meta.tensor_bytes / 2**30 < 4.4


def test_moe_experts_and_counts(tmp_path: Path) -> None:
    meta = gguf_meta.read_local(write_header(tmp_path / "m.gguf", MOE_8X7B))
    assert (meta.n_expert, meta.n_expert_used, meta.is_moe) == (8, 2, True)
    assert meta.expert_bytes > 0.9 * sum(x.non_expert + x.experts for x in meta.layers)


def test_sliding_window_builtin_and_explicit_patterns(tmp_path: Path) -> None:
    gemma = gguf_meta.read_local(write_header(tmp_path / "g.gguf", GEMMA3_LIKE))
    assert gemma.sliding_window == 1024
    assert gemma.swa_layers == [il % 6 < 5 for il in range(12)]  # llama.cpp's gemma3 pattern: 5 local, 1 global
    assert (gemma.head_dim_k, gemma.head_dim_v) == (256, 256)
    custom = Shape(n_layer=4, sliding_window=128, swa_pattern=[True, False, True, False], n_vocab=1000)
    meta = gguf_meta.read_local(write_header(tmp_path / "c.gguf", custom))
    assert meta.swa_layers == [True, False, True, False]
    unknown = Shape(n_layer=2, sliding_window=128, n_vocab=1000)
    meta = gguf_meta.read_local(write_header(tmp_path / "u.gguf", unknown))
    assert meta.swa_layers is None and "pattern is unknown" in meta.notes[0]


def test_key_and_value_head_dims_differ(tmp_path: Path) -> None:
    meta = gguf_meta.read_local(write_header(tmp_path / "m.gguf", MLA_LIKE))
    assert (meta.head_dim_k, meta.head_dim_v) == (192, 128)


def test_tiny_models_match_their_files(tiny_dense: Path, tiny_moe: Path) -> None:
    for path in (tiny_dense, tiny_moe):
        meta = gguf_meta.read_local(path)
        # Tensor data is the end of the file: what is left is the header and alignment padding.
        assert 0 < path.stat().st_size - meta.tensor_bytes < 16384
    assert gguf_meta.read_local(tiny_moe).is_moe and not gguf_meta.read_local(tiny_dense).is_moe


def test_split_gguf_sums_every_shard(tmp_path: Path) -> None:
    whole = gguf_meta.read_local(write_header(tmp_path / "whole.gguf", MOE_8X7B))
    shards = write_split(tmp_path, MOE_8X7B, parts=3)
    split = gguf_meta.read_local(shards[0])
    assert split.shards == 3
    assert groups(split) == groups(whole) and split.tensor_bytes == whole.tensor_bytes
    shards[2].unlink()
    with pytest.raises(ModelUnavailable, match="shard not found"):
        gguf_meta.read_local(shards[0])


def test_not_a_gguf_and_truncated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelVerificationFailed, match="bad magic"):
        gguf_meta.read_local(bad)
    good = write_header(tmp_path / "m.gguf", DENSE_8B)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelVerificationFailed, match="truncated"):
        gguf_meta.read_local(cut)


def test_remote_header_reads_only_the_header(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensor data stands in as 8 MiB of padding: the reader must stop long before it.
    local = write_header(tmp_path / "m.gguf", MOE_8X7B, pad_bytes=8 << 20)
    hub.add_file("org/moe", "m.gguf", local)
    monkeypatch.setattr(gguf_header, "_FIRST_READ", 4096)  # force the range to grow a few times
    meta = gguf_meta.read_remote(gguf_meta.hub_url(hub.url, "org/moe", "m.gguf"))
    assert groups(meta) == groups(gguf_meta.read_local(local))
    ranges = [r[2] for r in hub.body_requests() if r[1].startswith("/_lfs/")]
    assert len(ranges) >= 2 and all(r and r.startswith("bytes=0-") for r in ranges)
    biggest = max(int(r.split("-")[1]) for r in ranges if r)
    assert biggest < 1 << 20 < local.stat().st_size


def test_remote_split_and_gated(hub: HubServer, tmp_path: Path) -> None:
    for shard in write_split(tmp_path, DENSE_8B, parts=2):
        hub.add_file("org/split", shard.name, shard)
    meta = gguf_meta.read_remote(gguf_meta.hub_url(hub.url, "org/split", "model-00001-of-00002.gguf"))
    assert meta.shards == 2 and groups(meta) == expected_bytes(DENSE_8B)
    hub.gate("org/split", "sekrit")
    url = gguf_meta.hub_url(hub.url, "org/split", "model-00001-of-00002.gguf")
    with pytest.raises(ModelUnavailable, match="HTTP 401") as info:
        gguf_meta.read_remote(url)
    assert "HF_TOKEN" in info.value.hint and "sekrit" not in str(info.value)
    assert gguf_meta.read_remote(url, {"Authorization": "Bearer sekrit"}).shards == 2


def test_remote_server_ignoring_range_is_cut_off(hub: HubServer, tmp_path: Path) -> None:
    local = write_header(tmp_path / "m.gguf", DENSE_8B, pad_bytes=4 << 20)
    hub.add_file("org/d", "m.gguf", local)
    hub.faults.ignore_range = True
    meta = gguf_meta.read_remote(gguf_meta.hub_url(hub.url, "org/d", "m.gguf"))
    assert meta.tensor_bytes == gguf_meta.read_local(local).tensor_bytes
