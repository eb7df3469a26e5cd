"""Tiny random-weight GGUF models that llama-server loads in well under a second.

Used by the test suite, the benchmarks and the README's quick start, so everything runs on a laptop CPU
with no download: a dense llama and a mixture-of-experts llama (Mixtral layout), a few hundred KB each;
for the other kinds of profile a draft model sharing the dense model's vocabulary, a BERT embedding model,
a BERT reranker (classifier head, rank pooling) and a CLIP vision projector (LLaVA MLP) for the dense model.
The vocabulary is a byte-fallback SentencePiece vocabulary, so any text tokenizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
DRAFT = TinySpec(n_layer=1, seed=2)  # speculative decoding needs the target's vocabulary: this one is DENSE's


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


def add_vocabulary(w: Any, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """The llama-style tokenizer of every synthetic model (the tiny ones and the real families' shapes)."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|> ends a ChatML turn
    w.add_unk_token_id(0)


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
    add_vocabulary(w, tokens, scores, types)
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
    return _finish(w, tmp, path)


def _tensor_writer(w: object, rng: np.random.Generator) -> Any:
    def t(name: str, *shape: int, one: bool = False, zero: bool = False) -> None:
        if one or zero:  # norm weights and biases: identity, so random weights stay well-scaled
            data = np.full(shape, 1.0 if one else 0.0, dtype=np.float32)
        else:
            data = rng.normal(0, 0.02, size=shape).astype(np.float32)
        w.add_tensor(name, data)  # type: ignore[attr-defined]

    return t


def _linear(t: Any, name: str, rows: int, cols: int) -> None:
    """A weight matrix and its bias (zeros), as BERT's and CLIP's layers have them."""
    t(f"{name}.weight", rows, cols)
    t(f"{name}.bias", rows, zero=True)


def _layer_norm(t: Any, name: str, n: int) -> None:
    t(f"{name}.weight", n, one=True)
    t(f"{name}.bias", n, zero=True)


def write_bert(path: str | os.PathLike[str], *, rerank: bool = False, seed: int = 3) -> Path:
    """A 2-layer BERT (llama.cpp arch "bert"): an embedding model with mean pooling, or with `rerank` a
    cross-encoder with a classifier head and rank pooling, as bge-reranker GGUFs are laid out."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    e, f, n_layer, n_ctx = 64, 128, 2, 512
    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(str(tmp), "bert")
    w.add_name("tiny-rerank" if rerank else "tiny-embed")
    w.add_context_length(n_ctx)
    w.add_embedding_length(e)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(f)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.RANK if rerank else gguf.PoolingType.MEAN)
    w.add_token_type_count(2)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)  # stands for [CLS]
    w.add_eos_token_id(2)  # stands for [SEP]
    w.add_sep_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    t = _tensor_writer(w, np.random.default_rng(seed))
    t("token_embd.weight", len(tokens), e)
    t("token_types.weight", 2, e)
    t("position_embd.weight", n_ctx, e)
    _layer_norm(t, "token_embd_norm", e)
    for i in range(n_layer):
        b = f"blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            _linear(t, f"{b}.{name}", e, e)
        for name in ("attn_output_norm", "layer_output_norm"):
            _layer_norm(t, f"{b}.{name}", e)
        _linear(t, f"{b}.ffn_up", f, e)
        _linear(t, f"{b}.ffn_down", e, f)
    if rerank:
        _linear(t, "cls", e, e)
        _linear(t, "cls.output", 1, e)
    return _finish(w, tmp, path)


def write_projector(path: str | os.PathLike[str], *, text_embd: int = DENSE.n_embd, seed: int = 4) -> Path:
    """A 1-layer CLIP vision encoder with a LLaVA MLP projector into a `text_embd`-wide model (the dense
    model's), 32x32 images in 8x8 patches: what `--mmproj` loads for a vision profile."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    e, f, image, patch, hidden = 32, 64, 32, 8, 64
    n_pos = (image // patch) ** 2 + 1  # the patches and the class embedding
    w = gguf.GGUFWriter(str(tmp), "clip")
    w.add_name("tiny-mmproj")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_vision_image_size(image)
    w.add_vision_patch_size(patch)
    w.add_vision_embedding_length(e)
    w.add_vision_feed_forward_length(f)
    w.add_vision_block_count(1)
    w.add_vision_projection_dim(text_embd)
    w.add_vision_head_count(4)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    t = _tensor_writer(w, np.random.default_rng(seed))
    t("v.patch_embd.weight", e, 3, patch, patch)
    t("v.class_embd", e)
    t("v.position_embd.weight", n_pos, e)
    _layer_norm(t, "v.pre_ln", e)
    b = "v.blk.0"
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        _linear(t, f"{b}.{name}", e, e)
    for name in ("ln1", "ln2"):
        _layer_norm(t, f"{b}.{name}", e)
    _linear(t, f"{b}.ffn_up", f, e)
    _linear(t, f"{b}.ffn_down", e, f)
    _linear(t, "mm.0", hidden, e)
    _linear(t, "mm.2", text_embd, hidden)
    return _finish(w, tmp, path)


def _finish(w: Any, tmp: Path, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


KINDS = ("tiny-draft", "tiny-embed", "tiny-rerank", "tiny-mmproj")


def ensure_kinds(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the draft, embedding, reranker and projector models into `directory` unless already there."""
    directory = Path(directory)
    writers: dict[str, Callable[[Path], Path]] = {"tiny-draft": lambda p: write(p, DRAFT), "tiny-embed": write_bert,
               "tiny-rerank": lambda p: write_bert(p, rerank=True), "tiny-mmproj": write_projector}
    out = {}
    for name in KINDS:
        path = directory / f"{name}.gguf"
        if not path.is_file():
            writers[name](path)
        out[name] = path
    return out


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

    target = sys.argv[1] if len(sys.argv) > 1 else "models"
    for name, p in {**ensure(target), **ensure_kinds(target)}.items():
        print(f"{name}: {p} ({p.stat().st_size} bytes)")
