"""Loadable GGUFs with the shapes and metadata of real model families, for memory measurements only.

Each family keeps what decides memory in llama.cpp exactly as the published model has it: the vocabulary
size, head counts and head dims, KV heads (GQA/MQA/MLA), sliding-window layout, expert count and top-k,
shared experts, tied or separate output. Layer count and hidden/FFN sizes are cut by the factor in the
family's `cut` note (proportionally, so the ratios stay) so that every model writes in seconds and fits
the small machines the benchmark runs on. Weights are constant and written from a broadcast view, so a
model costs disk but almost no RAM. benchmarks/plan_families.py loads each one in llama-server and puts
the planner's numbers beside the buffer sizes llama-server reports.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wrapper.model.tiny_models import CHATML, add_vocabulary, vocabulary

Tensor = tuple[str, tuple[int, ...]]  # name, ne in ggml order (fastest dimension first)


@dataclass(frozen=True)
class Family:
    key: str  # file stem and table row id
    label: str  # the published model whose shape this is
    arch: str
    cut: str  # what was scaled down, in words
    n_vocab: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    tied: bool = False
    n_ctx_train: int = 131072
    kv: dict[str, Any] = field(default_factory=dict)  # extra `<arch>.` keys
    layer: Callable[[Family, int], list[Tensor]] | None = None


def _attn(f: Family, *, bias: bool = False, qk_norm: bool = False) -> list[Tensor]:
    q, kv = f.n_head * f.head_dim, f.n_head_kv * f.head_dim
    out: list[Tensor] = [("attn_norm.weight", (f.n_embd,)), ("attn_q.weight", (f.n_embd, q)),
                         ("attn_k.weight", (f.n_embd, kv)), ("attn_v.weight", (f.n_embd, kv)),
                         ("attn_output.weight", (q, f.n_embd))]
    if bias:
        out += [("attn_q.bias", (q,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
    if qk_norm:
        out += [("attn_q_norm.weight", (f.head_dim,)), ("attn_k_norm.weight", (f.head_dim,))]
    return out


def _ffn(e: int, ff: int, suffix: str = "") -> list[Tensor]:
    return [(f"ffn_gate{suffix}.weight", (e, ff)), (f"ffn_up{suffix}.weight", (e, ff)),
            (f"ffn_down{suffix}.weight", (ff, e))]


def _experts(f: Family, n_expert: int, ff: int) -> list[Tensor]:
    e = f.n_embd
    return [("ffn_gate_inp.weight", (e, n_expert)), ("ffn_gate_exps.weight", (e, ff, n_expert)),
            ("ffn_up_exps.weight", (e, ff, n_expert)), ("ffn_down_exps.weight", (ff, e, n_expert))]


def _llama(f: Family, il: int) -> list[Tensor]:
    moe = [] if not f.kv.get("expert_count") else _experts(f, f.kv["expert_count"], f.n_ff)
    return _attn(f) + [("ffn_norm.weight", (f.n_embd,))] + (moe or _ffn(f.n_embd, f.n_ff))


def _qwen2(f: Family, il: int) -> list[Tensor]:
    return [*_attn(f, bias=True), ("ffn_norm.weight", (f.n_embd,)), *_ffn(f.n_embd, f.n_ff)]


def _qwen3(f: Family, il: int) -> list[Tensor]:
    return [*_attn(f, qk_norm=True), ("ffn_norm.weight", (f.n_embd,)), *_ffn(f.n_embd, f.n_ff)]


def _qwen3moe(f: Family, il: int) -> list[Tensor]:
    return [*_attn(f, qk_norm=True), ("ffn_norm.weight", (f.n_embd,)),
            *_experts(f, f.kv["expert_count"], f.kv["expert_feed_forward_length"])]


def _gemma3(f: Family, il: int) -> list[Tensor]:
    e = f.n_embd
    return [*_attn(f, qk_norm=True), ("post_attention_norm.weight", (e,)), ("ffn_norm.weight", (e,)),
            ("post_ffw_norm.weight", (e,)), *_ffn(e, f.n_ff)]


def _phi3(f: Family, il: int) -> list[Tensor]:
    e, kv = f.n_embd, f.n_head_kv * f.head_dim
    return [("attn_norm.weight", (e,)), ("attn_qkv.weight", (e, e + 2 * kv)), ("attn_output.weight", (e, e)),
            ("ffn_norm.weight", (e,)), ("ffn_up.weight", (e, 2 * f.n_ff)), ("ffn_down.weight", (f.n_ff, e))]


def _deepseek2(f: Family, il: int) -> list[Tensor]:
    e, h, kv = f.n_embd, f.n_head, f.kv
    rank, rope = kv["attention.kv_lora_rank"], kv["rope.dimension_count"]
    k_mla, v_mla = kv["attention.key_length_mla"], kv["attention.value_length_mla"]
    out: list[Tensor] = [
        ("attn_norm.weight", (e,)), ("attn_kv_a_norm.weight", (rank,)), ("attn_q.weight", (e, h * k_mla)),
        ("attn_kv_a_mqa.weight", (e, rank + rope)), ("attn_k_b.weight", (k_mla - rope, rank, h)),
        ("attn_v_b.weight", (rank, v_mla, h)), ("attn_output.weight", (h * v_mla, e)), ("ffn_norm.weight", (e,))]
    if il < kv["leading_dense_block_count"]:
        return out + _ffn(e, f.n_ff)
    ff_exp = kv["expert_feed_forward_length"]
    return out + _experts(f, kv["expert_count"], ff_exp) + _ffn(e, ff_exp * kv["expert_shared_count"], "_shexp")


def _gpt_oss(f: Family, il: int) -> list[Tensor]:
    e, n, ff = f.n_embd, f.kv["expert_count"], f.kv["expert_feed_forward_length"]
    return [*_attn(f, bias=True), ("attn_output.bias", (e,)), ("attn_sinks.weight", (f.n_head,)),
            ("post_attention_norm.weight", (e,)), *_experts(f, n, ff), ("ffn_gate_inp.bias", (n,)),
            ("ffn_gate_exps.bias", (ff, n)), ("ffn_up_exps.bias", (ff, n)), ("ffn_down_exps.bias", (e, n))]


FAMILIES = [
    Family("llama3", "Llama 3.1 8B", "llama", "layers /4, hidden and FFN /8", 128256, 8, 512, 32, 8, 128, 1792,
           layer=_llama),
    Family("qwen2.5", "Qwen2.5 7B (MQA-like 7:1 GQA)", "qwen2", "layers /4, hidden, heads and FFN /4", 152064, 7,
           896, 7, 1, 128, 4736, n_ctx_train=32768, layer=_qwen2),
    Family("qwen3", "Qwen3 8B", "qwen3", "layers /4, hidden and FFN /4", 151936, 9, 1024, 32, 8, 128, 3072,
           n_ctx_train=40960, layer=_qwen3),
    Family("qwen3moe", "Qwen3 30B-A3B (128 experts, top 8)", "qwen3moe", "layers /8, hidden and expert FFN /4",
           151936, 6, 512, 32, 4, 128, 1536, n_ctx_train=40960,
           kv={"expert_count": 128, "expert_used_count": 8, "expert_feed_forward_length": 192}, layer=_qwen3moe),
    Family("gemma3", "Gemma 3 4B (tied, SWA 1024, 5:1 local:global)", "gemma3",
           "layers 34 -> 12 (pattern kept), hidden and FFN /4", 262208, 12, 640, 8, 4, 256, 2560, tied=True,
           kv={"attention.sliding_window": 1024}, layer=_gemma3),
    Family("mixtral", "Mixtral 8x7B (8 experts, top 2)", "llama", "layers /8, hidden and FFN /8", 32000, 4, 512,
           32, 8, 128, 1792, n_ctx_train=32768, kv={"expert_count": 8, "expert_used_count": 2}, layer=_llama),
    Family("deepseek2", "DeepSeek-V2-Lite (MLA, 64 experts top 6, 2 shared)", "deepseek2",
           "hidden and FFNs /8 (27 layers kept: llama.cpp detects the lite variant by layer count)", 102400, 27,
           256, 16, 1, 576, 1368, n_ctx_train=163840,
           kv={"attention.kv_lora_rank": 512, "rope.dimension_count": 64, "attention.key_length": 576,
               "attention.value_length": 512, "attention.key_length_mla": 192, "attention.value_length_mla": 128,
               "leading_dense_block_count": 1, "expert_count": 64, "expert_used_count": 6,
               "expert_shared_count": 2, "expert_feed_forward_length": 176, "expert_weights_scale": 1.0},
           layer=_deepseek2),
    Family("gpt-oss", "gpt-oss 20B (32 experts top 4, SWA 128 alternating)", "gpt-oss",
           "layers /4, hidden and expert FFN /8", 201088, 6, 360, 64, 8, 64, 360,
           kv={"expert_count": 32, "expert_used_count": 4, "expert_feed_forward_length": 360,
               "attention.sliding_window": 128}, layer=_gpt_oss),
    Family("phi", "Phi-3 mini (MHA, head dim 96)", "phi3", "layers, hidden, heads and FFN /4", 32064, 8, 768, 8,
           8, 96, 2048, n_ctx_train=4096, layer=_phi3),
]
BY_KEY = {f.key: f for f in FAMILIES}


def tensors(f: Family) -> list[Tensor]:
    assert f.layer is not None
    out: list[Tensor] = [("token_embd.weight", (f.n_embd, f.n_vocab)), ("output_norm.weight", (f.n_embd,))]
    if not f.tied:
        out.append(("output.weight", (f.n_embd, f.n_vocab)))
    for il in range(f.n_layer):
        out += [(f"blk.{il}.{name}", ne) for name, ne in f.layer(f, il)]
    return out


def _add(w: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_string(key, str(value))


def write(path: str | os.PathLike[str], f: Family, *, header_only: bool = False) -> Path:
    """Write the family's GGUF (f16 matrices, f32 vectors) atomically and return its path.

    header_only writes the key/values and tensor infos without the data: enough for the planner (it reads
    nothing else), a few MB however large the model, but not loadable."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tokens, scores, types = vocabulary()
    pad = f.n_vocab - len(tokens)
    tokens += [f"<pad{i}>" for i in range(pad)]
    scores += [-1e4] * pad
    types += [1] * pad
    w = gguf.GGUFWriter(str(tmp), f.arch)
    # Not the label: llama.cpp keys tokenizer fixes on the model name ("phi-3" expects its special tokens).
    w.add_name(f"synthetic {f.key}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    a = f.arch
    for key, value in {"context_length": f.n_ctx_train, "embedding_length": f.n_embd, "block_count": f.n_layer,
                       "feed_forward_length": f.n_ff, "attention.head_count": f.n_head,
                       "attention.head_count_kv": f.n_head_kv, "attention.key_length": f.head_dim,
                       "attention.value_length": f.head_dim, "rope.dimension_count": f.head_dim,
                       "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-5,
                       "vocab_size": f.n_vocab, **f.kv}.items():
        _add(w, f"{a}.{key}", value)
    if not header_only:  # the planner never reads the vocabulary itself (vocab_size says how big it is)
        add_vocabulary(w, tokens, scores, types)
        w.add_chat_template(CHATML)
    for name, ne in tensors(f):
        matrix = len(ne) > 1 and not name.endswith(".bias")  # ggml adds biases in f32 only
        dtype = np.dtype(np.float16 if matrix else np.float32)
        if header_only:
            w.add_tensor_info(name, tuple(reversed(ne)), dtype, int(np.prod(ne)) * dtype.itemsize)
            continue
        # A broadcast view: the writer streams it to disk without materialising the matrix.
        w.add_tensor(name, np.broadcast_to(np.ones((), dtype) * (0.01 if matrix else 1.0), tuple(reversed(ne))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if header_only:
        w.write_ti_data_to_file()
    else:
        w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
