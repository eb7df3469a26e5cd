"""Header-only GGUFs of real model shapes (8B dense GQA, Mixtral-like MoE, gemma3-like SWA, ...).

Only the header is written (key/values + tensor infos), so a "70 GB" model costs a few KB on disk: the
planner reads nothing else. `expected_bytes` recomputes each tensor's size independently of gguf_meta.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tests.conftest import free_port

Q4_K = gguf.GGMLQuantizationType.Q4_K
F32 = gguf.GGMLQuantizationType.F32
BYTES = {Q4_K: (256, 144), F32: (1, 4), gguf.GGMLQuantizationType.F16: (1, 2),
         gguf.GGMLQuantizationType.Q8_0: (32, 34)}


@dataclass(frozen=True)
class Shape:
    arch: str = "llama"
    n_layer: int = 32
    n_embd: int = 4096
    n_head: int = 32
    n_head_kv: int = 8
    n_ff: int = 14336
    n_vocab: int = 128256
    n_expert: int = 0
    n_expert_used: int = 0
    tied: bool = False
    key_length: int | None = None
    value_length: int | None = None
    sliding_window: int | None = None
    swa_pattern: list[bool] | None = None
    qtype: gguf.GGMLQuantizationType = Q4_K
    n_ctx_train: int = 131072


DENSE_8B = Shape()
MOE_8X7B = Shape(n_expert=8, n_expert_used=2, n_vocab=32000, n_ctx_train=32768)
GEMMA3_LIKE = Shape(arch="gemma3", n_layer=12, n_embd=2560, n_head=8, n_head_kv=4, key_length=256,
                    value_length=256, n_ff=10240, n_vocab=262144, tied=True, sliding_window=1024)
MLA_LIKE = Shape(n_layer=4, n_embd=2048, n_head=16, n_head_kv=16, key_length=192, value_length=128,
                 n_ff=5632, n_vocab=32000)


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """(name, numpy-order shape, type) of every tensor, llama layout."""
    hk = s.key_length or s.n_embd // s.n_head
    hv = s.value_length or s.n_embd // s.n_head
    q = s.qtype
    out = [("token_embd.weight", (s.n_vocab, s.n_embd), q), ("output_norm.weight", (s.n_embd,), F32)]
    if not s.tied:
        out.append(("output.weight", (s.n_vocab, s.n_embd), q))
    for i in range(s.n_layer):
        b = f"blk.{i}"
        out += [(f"{b}.attn_norm.weight", (s.n_embd,), F32), (f"{b}.attn_q.weight", (s.n_head * hk, s.n_embd), q),
                (f"{b}.attn_k.weight", (s.n_head_kv * hk, s.n_embd), q),
                (f"{b}.attn_v.weight", (s.n_head_kv * hv, s.n_embd), q),
                (f"{b}.attn_output.weight", (s.n_embd, s.n_head * hv), q), (f"{b}.ffn_norm.weight", (s.n_embd,), F32)]
        if s.n_expert:
            out += [(f"{b}.ffn_gate_inp.weight", (s.n_expert, s.n_embd), F32),
                    (f"{b}.ffn_gate_exps.weight", (s.n_expert, s.n_ff, s.n_embd), q),
                    (f"{b}.ffn_up_exps.weight", (s.n_expert, s.n_ff, s.n_embd), q),
                    (f"{b}.ffn_down_exps.weight", (s.n_expert, s.n_embd, s.n_ff), q)]
        else:
            out += [(f"{b}.ffn_gate.weight", (s.n_ff, s.n_embd), q), (f"{b}.ffn_up.weight", (s.n_ff, s.n_embd), q),
                    (f"{b}.ffn_down.weight", (s.n_embd, s.n_ff), q)]
    return out


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = BYTES[qtype]
    return int(np.prod(shape)) // block * size


def expected_bytes(s: Shape) -> dict[str, int]:
    groups = {"embeddings": 0, "output": 0, "non_expert": 0, "experts": 0}
    for name, shape, q in tensors(s):
        n = nbytes(shape, q)
        if name.startswith("token_embd"):
            groups["embeddings"] += n
            if s.tied:
                groups["output"] += n
        elif name.startswith("output"):
            groups["output"] += n
        elif "_exps" in name:
            groups["experts"] += n
        else:
            groups["non_expert"] += n
    return groups


def write_header(path: Path, s: Shape, *, split: tuple[int, int] | None = None,
                 only: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] | None = None,
                 metadata: bool = True, pad_bytes: int = 0) -> Path:
    """A GGUF holding only the header (plus pad_bytes of zeros standing in for tensor data)."""
    w = gguf.GGUFWriter(str(path), s.arch)
    if metadata:
        w.add_name(f"synthetic-{s.arch}")
        w.add_context_length(s.n_ctx_train)
        w.add_embedding_length(s.n_embd)
        w.add_block_count(s.n_layer)
        w.add_feed_forward_length(s.n_ff)
        w.add_head_count(s.n_head)
        w.add_head_count_kv(s.n_head_kv)
        w.add_vocab_size(s.n_vocab)
        if s.key_length:
            w.add_key_length(s.key_length)
        if s.value_length:
            w.add_value_length(s.value_length)
        if s.n_expert:
            w.add_expert_count(s.n_expert)
            w.add_expert_used_count(s.n_expert_used)
        if s.sliding_window:
            w.add_sliding_window(s.sliding_window)
        if s.swa_pattern is not None:
            w.add_array(f"{s.arch}.attention.sliding_window_pattern", s.swa_pattern)
    if split:
        w.add_uint16("split.no", split[0])
        w.add_uint16("split.count", split[1])
    for name, shape, q in only if only is not None else tensors(s):
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    if pad_bytes:
        with path.open("ab") as fh:
            fh.write(b"\0" * pad_bytes)
    return path


def write_split(directory: Path, s: Shape, parts: int = 2) -> list[Path]:
    """model-0000i-of-0000N.gguf: the first shard has the metadata, the tensors are dealt out in order."""
    all_t = tensors(s)
    chunk = -(-len(all_t) // parts)
    paths = []
    for i in range(parts):
        p = directory / f"model-{i + 1:05d}-of-{parts:05d}.gguf"
        write_header(p, s, split=(i, parts), only=all_t[i * chunk:(i + 1) * chunk], metadata=i == 0)
        paths.append(p)
    return paths


def load_log(binary: str, model: Path, *args: str) -> str:
    """llama-server's verbose output from start until it listens (or exits): the buffer sizes it allocated."""
    cmd = [binary, "-m", str(model), "--port", str(free_port()), "--host", "127.0.0.1", "-t", "1", "-v",
           "--fit", "off", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line or "exiting" in line:
                break
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # drains and closes the pipe
    return "".join(lines)
