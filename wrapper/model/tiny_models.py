"""Tiny random-weight GGUF models that llama-server loads in well under a second.

Used by the test suite, the benchmarks and the README's quick start, so everything runs on a laptop CPU
with no download: a dense llama and a mixture-of-experts llama (Mixtral layout), a few hundred KB each.
The vocabulary is a byte-fallback SentencePiece vocabulary, so any text tokenizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part model server token fast slow speed batch cache layer expert"
).split()


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048
    n_expert: int = 0
    n_expert_used: int = 0
    seed: int = 0
    dtype: str = "f32"  # f32, f16 or q8_0 (matrices; norms stay f32)
    n_vocab: int = 0  # pad the vocabulary to this many tokens (0: the byte-fallback vocabulary as it is)
    constant: bool = False  # constant weights: much faster to write, for memory measurements only
    chat_template: bool = True  # False: a base model's GGUF, with no tokenizer.chat_template

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


DENSE = TinySpec()
MOE = TinySpec(n_expert=4, n_expert_used=2, seed=1)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types (1 normal, 2 unknown, 3 control, 6 byte)."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["\u2581" + w for w in _WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 261 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write(path: str | os.PathLike[str], spec: TinySpec = DENSE) -> Path:
    """Write the model atomically (temp name + rename) and return its path."""
    import gguf  # imported lazily: only tests, benchmarks and the quick start need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rng = np.random.default_rng(spec.seed)
    tokens, scores, types = vocabulary()
    pad = max(0, spec.n_vocab - len(tokens))
    tokens += [f"<pad{i}>" for i in range(pad)]
    scores += [-1e4] * pad
    types += [1] * pad
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(tmp), spec.arch)
    w.add_name("tiny-moe" if spec.n_expert else "tiny-dense")
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_file_type(file_types[spec.dtype])
    if spec.n_expert:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|> ends a ChatML turn
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if spec.chat_template:
        w.add_chat_template(CHATML)

    def t(name: str, *shape: int, norm: bool = False) -> None:
        if norm:  # norm weights stay f32 in every llama.cpp quantization; matrices take the file's dtype
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
            return
        if spec.constant:
            data = np.full(shape, 0.01, dtype=np.float32)
        else:
            data = rng.normal(0, 0.02, size=shape).astype(np.float32)
        if spec.dtype == "q8_0":
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data.astype(np.float16 if spec.dtype == "f16" else np.float32))

    e, f, kv = spec.n_embd, spec.n_ff, spec.n_head_kv * spec.head_dim
    # numpy shapes are the reverse of GGUF's ne: token_embd has ne = {n_embd, n_vocab}.
    t("token_embd.weight", n_vocab, e)
    t("output_norm.weight", e, norm=True)
    t("output.weight", n_vocab, e)
    for i in range(spec.n_layer):
        b = f"blk.{i}"
        t(f"{b}.attn_norm.weight", e, norm=True)
        t(f"{b}.attn_q.weight", e, e)
        t(f"{b}.attn_k.weight", kv, e)
        t(f"{b}.attn_v.weight", kv, e)
        t(f"{b}.attn_output.weight", e, e)
        t(f"{b}.ffn_norm.weight", e, norm=True)
        if spec.n_expert:
            t(f"{b}.ffn_gate_inp.weight", spec.n_expert, e)
            t(f"{b}.ffn_gate_exps.weight", spec.n_expert, f, e)
            t(f"{b}.ffn_up_exps.weight", spec.n_expert, f, e)
            t(f"{b}.ffn_down_exps.weight", spec.n_expert, e, f)
        else:
            t(f"{b}.ffn_gate.weight", f, e)
            t(f"{b}.ffn_up.weight", f, e)
            t(f"{b}.ffn_down.weight", e, f)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def ensure(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write tiny-dense.gguf and tiny-moe.gguf into `directory` unless they are already there."""
    directory = Path(directory)
    out = {}
    for name, spec in (("tiny-dense", DENSE), ("tiny-moe", MOE)):
        path = directory / f"{name}.gguf"
        if not path.is_file():
            write(path, spec)
        out[name] = path
    return out


if __name__ == "__main__":  # python -m wrapper.model.tiny_models DIR
    import sys

    for name, p in ensure(sys.argv[1] if len(sys.argv) > 1 else "models").items():
        print(f"{name}: {p} ({p.stat().st_size} bytes)")
