"""Write the recorded GGUF header of the quick start's model (config/gguf-headers/<sha256>.gguf).

`wrapper plan` sizes a model from its GGUF header: the local file, else a range read from the Hub. The
quick start's model must plan where the Hub cannot be reached, so its header ships with the registry,
named by the sha256 the profile pins (it describes exactly that file and no other).

The original bytes were not at hand, so the header is rebuilt from published facts about
bartowski/SmolLM2-360M-Instruct-GGUF @ 7be6f65f1db7, SmolLM2-360M-Instruct-Q4_K_M.gguf (270,590,880 bytes,
data section at 1,787,040, 290 tensors, llama: 32 layers, 960 wide, 15 heads / 5 KV heads, FFN 2560,
vocab 49152, tied output) and llama.cpp's Q4_K_M type rules. Vocabulary and merges are left out (the
planner does not read them). The check below is what makes it trustworthy: the tensor bytes it implies
must equal the file's data section to the byte.

    .venv/bin/python scripts/record_smollm2_header.py
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

SHA256 = "2fa3f013dcdd7b99f9b237717fa0b12d75bbb89984cc1274be1471a465bac9c2"
FILE_SIZE, DATA_OFFSET = 270_590_880, 1_787_040
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB = 32, 960, 2560, 15, 5, 49152
T = gguf.GGMLQuantizationType
OUT = Path(__file__).resolve().parent.parent / "config" / "gguf-headers" / f"{SHA256}.gguf"


def _more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors() -> list[tuple[str, tuple[int, ...], T]]:
    """(name, numpy-order shape, type). Rows of 960 are not a multiple of 256, so llama.cpp falls back
    from the K-quants: Q4_K -> Q5_0 and Q6_K -> Q8_0 (ffn_down's rows are 2560 wide and keep the K-quant)."""
    kv = N_EMBD // N_HEAD * N_HEAD_KV
    out: list[tuple[str, tuple[int, ...], T]] = [("token_embd.weight", (N_VOCAB, N_EMBD), T.Q8_0)]
    for i in range(N_LAYER):
        more = _more_bits(i, N_LAYER)
        out += [
            (f"blk.{i}.attn_norm.weight", (N_EMBD,), T.F32),
            (f"blk.{i}.attn_q.weight", (N_EMBD, N_EMBD), T.Q5_0),
            (f"blk.{i}.attn_k.weight", (kv, N_EMBD), T.Q5_0),
            (f"blk.{i}.attn_v.weight", (kv, N_EMBD), T.Q8_0 if more else T.Q5_0),
            (f"blk.{i}.attn_output.weight", (N_EMBD, N_EMBD), T.Q5_0),
            (f"blk.{i}.ffn_norm.weight", (N_EMBD,), T.F32),
            (f"blk.{i}.ffn_gate.weight", (N_FF, N_EMBD), T.Q5_0),
            (f"blk.{i}.ffn_up.weight", (N_FF, N_EMBD), T.Q5_0),
            (f"blk.{i}.ffn_down.weight", (N_EMBD, N_FF), T.Q6_K if more else T.Q4_K),
        ]
    return [*out, ("output_norm.weight", (N_EMBD,), T.F32)]


def nbytes(shape: tuple[int, ...], ttype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    return int(np.prod(shape)) // block * size


def main() -> None:
    table = tensors()
    total = sum(nbytes(s, t) for _, s, t in table)
    assert len(table) == 290, len(table)
    assert total == FILE_SIZE - DATA_OFFSET, f"tensor bytes {total} != data section {FILE_SIZE - DATA_OFFSET}"
    w = gguf.GGUFWriter(OUT, "llama")
    w.add_name("SmolLM2 360M Instruct")
    w.add_string("wrapper.recorded_header", f"rebuilt from published facts; file sha256 {SHA256}, "
                 f"{FILE_SIZE} bytes; vocabulary and merges left out")
    w.add_block_count(N_LAYER)
    w.add_context_length(8192)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(N_VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for name, shape, ttype in table:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, ttype), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    print(f"{OUT}: {OUT.stat().st_size} bytes; {len(table)} tensors, {total} bytes of weights")


if __name__ == "__main__":
    main()
