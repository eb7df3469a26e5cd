"""GGUF header -> ModelMeta: the shape of a model and the exact bytes of each tensor group.

Only the header is read: key/values and tensor infos (name, shape, type). Tensor byte sizes follow from
shape and type (`gguf.GGML_QUANT_SIZES`), so a multi-GB model is sized from a few MB of header, locally or
from the Hub through HTTP range requests (the range grows until the header parses). Split GGUFs
(`name-00001-of-0000N.gguf`) are summed over every shard's header.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import httpx
from pydantic import BaseModel

from wrapper.errors import ModelUnavailable, ModelVerificationFailed
from wrapper.settings import Settings

_FIRST_READ = 1 << 20
_MAX_HEADER = 512 << 20  # no sane header is this big; beyond it the file is not a GGUF we can size
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Arrays longer than this (token lists, merges) are skipped, not kept: we only need per-layer arrays.
_KEEP_ARRAY = 4096
# llama.cpp's built-in sliding-window patterns for architectures whose GGUFs may omit the pattern key.
_BUILTIN_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2}


class LayerBytes(BaseModel):
    non_expert: int = 0  # attention, norms, router, shared experts, dense FFN
    experts: int = 0  # routed experts (blk.N.*_exps): what --n-cpu-moe moves to the CPU


class ModelMeta(BaseModel):
    source: str
    architecture: str
    name: str | None = None
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: list[int]  # per layer (GGUF may store one value or an array)
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int | None = None
    n_vocab: int | None = None
    n_ff: int | None = None
    sliding_window: int | None = None
    swa_layers: list[bool] | None = None  # None: no SWA (or pattern unknown: every layer counted full)
    n_expert: int = 0
    n_expert_used: int = 0
    file_type: int | None = None
    embeddings_bytes: int = 0
    output_bytes: int = 0  # the output head; a tied head is token_embd loaded a second time
    output_tied: bool = False
    layers: list[LayerBytes]
    other_bytes: int = 0
    tensor_bytes: int = 0
    n_tensors: int = 0
    shards: int = 1
    notes: list[str] = []

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and any(layer.experts for layer in self.layers)

    @property
    def expert_bytes(self) -> int:
        return sum(layer.experts for layer in self.layers)


class _Short(Exception):
    """The header runs past the bytes read so far."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Short
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(r: _Reader, vtype: int) -> Any:
    if vtype in _SCALAR:
        return r.unpack(_SCALAR[vtype])
    if vtype == 8:
        return r.string()
    if vtype == 9:
        etype, count = r.unpack("I"), r.unpack("Q")
        if count > _KEEP_ARRAY or etype in (8, 9):
            for _ in range(count):
                _value(r, etype)  # walk past it (strings have variable length)
            return None
        return [_value(r, etype) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {vtype}")


def _parse(data: bytes, where: str) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    """Key/values and tensor infos (name, ne, type) from the first bytes of a GGUF; _Short if too few."""
    r = _Reader(data)
    if r.take(4) != b"GGUF":
        raise ModelVerificationFailed(f"{where}: not a GGUF file (bad magic)", hint="check the file name")
    version = r.unpack("I")
    if version not in (2, 3):
        raise ModelVerificationFailed(f"{where}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = _value(r, r.unpack("I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        ne = [r.unpack("Q") for _ in range(r.unpack("I"))]
        ttype = r.unpack("I")
        r.unpack("Q")  # offset into the data section: not needed for sizes
        tensors.append((name, ne, ttype))
    return kv, tensors


def _header(fetch: Callable[[int], bytes], where: str) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    size = _FIRST_READ
    while True:
        data = fetch(size)
        try:
            return _parse(data, where)
        except _Short:
            if len(data) < size or size >= _MAX_HEADER:
                raise ModelVerificationFailed(f"{where}: GGUF header is truncated ({len(data)} bytes read)") from None
            size *= 4
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            raise ModelVerificationFailed(f"{where}: GGUF header does not parse: {exc}") from None


def tensor_nbytes(ne: list[int], ttype: int) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise ModelVerificationFailed(f"unknown ggml tensor type {ttype}") from None
    n = 1
    for d in ne:
        n *= d
    return n // block * type_size


def _shard_names(name: str) -> list[str]:
    m = _SPLIT.match(name)
    if not m:
        return [name]
    count = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def read_local(path: str | Path) -> ModelMeta:
    """Read a local GGUF (any shard of a split model names the whole model)."""
    path = Path(path)
    headers = []
    for shard in _shard_names(path.name):
        p = path.with_name(shard)
        if not p.is_file():
            raise ModelUnavailable(f"GGUF shard not found: {p}", hint="download every shard of the split model")

        def fetch(n: int, p: Path = p) -> bytes:
            with p.open("rb") as fh:
                return fh.read(n)

        headers.append(_header(fetch, str(p)))
    return build(headers, str(path))


def hub_url(endpoint: str, repo_id: str, filename: str, revision: str = "main") -> str:
    return f"{endpoint.rstrip('/')}/{repo_id}/resolve/{revision}/{filename}"


def read_remote(url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> ModelMeta:
    """Read a GGUF's header over HTTP range requests; a split URL reads every shard's header."""
    base, _, name = url.rpartition("/")
    parsed = []
    with httpx.Client(follow_redirects=True, timeout=timeout, headers=dict(headers or {})) as client:
        for shard in _shard_names(name):
            shard_url = f"{base}/{shard}"

            def fetch(n: int, u: str = shard_url) -> bytes:
                return _range(client, u, n)

            parsed.append(_header(fetch, _redact(shard_url)))
    return build(parsed, _redact(url))


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", url)


def _range(client: httpx.Client, url: str, n: int) -> bytes:
    """The first n bytes of url. A server that ignores Range gets cut off after n bytes, not downloaded."""
    try:
        with client.stream("GET", url, headers={"Range": f"bytes=0-{n - 1}"}) as resp:
            if resp.status_code in (401, 403):
                raise ModelUnavailable(
                    f"{_redact(url)}: HTTP {resp.status_code} (gated or private)",
                    hint="set HF_TOKEN to a token that can read this repo",
                )
            if resp.status_code not in (200, 206):
                raise ModelUnavailable(f"{_redact(url)}: HTTP {resp.status_code} reading the GGUF header")
            out = bytearray()
            for chunk in resp.iter_bytes():
                out += chunk
                if len(out) >= n:
                    break
            return bytes(out[:n])
    except httpx.HTTPError as exc:
        raise ModelUnavailable(f"{_redact(url)}: cannot read the GGUF header: {type(exc).__name__}") from None


def _get(kv: Mapping[str, Any], arch: str, key: str) -> Any:
    return kv.get(f"{arch}.{key}")


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]] + [default] * max(0, n_layer - len(value))
    return [int(value if value is not None else default)] * n_layer


def build(headers: list[tuple[dict[str, Any], list[tuple[str, list[int], int]]]], source: str) -> ModelMeta:
    """Combine the parsed headers of one model's shards (the first holds the metadata)."""
    kv = headers[0][0]
    arch = str(kv.get("general.architecture") or "")
    where = source
    n_layer = _get(kv, arch, "block_count")
    n_embd = _get(kv, arch, "embedding_length")
    n_head_raw = _get(kv, arch, "attention.head_count")
    if not arch or n_layer is None or n_embd is None or n_head_raw is None:
        raise ModelVerificationFailed(f"{where}: GGUF lacks architecture/block_count/embedding_length/head_count")
    n_layer, n_embd = int(n_layer), int(n_embd)
    n_head_list = _per_layer(n_head_raw, n_layer, 0)
    n_head = max(n_head_list) or 1
    n_head_kv = _per_layer(_get(kv, arch, "attention.head_count_kv"), n_layer, n_head)
    head_k = int(_get(kv, arch, "attention.key_length") or n_embd // n_head)
    head_v = int(_get(kv, arch, "attention.value_length") or n_embd // n_head)
    notes: list[str] = []

    swa = _get(kv, arch, "attention.sliding_window")
    swa_layers: list[bool] | None = None
    if swa:
        pattern = _get(kv, arch, "attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa_layers = [bool(p) for p in pattern[:n_layer]]
        else:
            n_pattern = pattern if isinstance(pattern, int) else _BUILTIN_SWA_PATTERN.get(arch)
            if n_pattern is None:
                notes.append("sliding window present but its layer pattern is unknown: every layer counted full")
            else:
                swa_layers = [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer)]

    ff = _get(kv, arch, "feed_forward_length")
    layers = [LayerBytes() for _ in range(n_layer)]
    emb = out = other = total = count = 0
    token_embd = 0
    embd_vocab = None
    for _, tensors in headers:
        for name, ne, ttype in tensors:
            size = tensor_nbytes(ne, ttype)
            total += size
            count += 1
            if name.startswith("blk."):
                idx = int(name.split(".")[1])
                if idx >= n_layer:
                    other += size
                elif "_exps" in name:
                    layers[idx].experts += size
                else:
                    layers[idx].non_expert += size
            elif name.startswith(("token_embd", "position_embd", "token_types")):
                emb += size
                if name == "token_embd.weight":
                    token_embd = size
                    embd_vocab = ne[1] if len(ne) > 1 else None
            elif name.startswith(("output", "result_norm")):
                out += size
            else:
                other += size
    names = {t[0] for _, ts in headers for t in ts}
    tied = "output.weight" not in names
    if tied:
        # llama.cpp loads token_embd a second time as the output head (on the output layer's device).
        out += token_embd
    vocab = _get(kv, arch, "vocab_size") or embd_vocab
    return ModelMeta(
        source=source,
        architecture=arch,
        name=kv.get("general.name"),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_k,
        head_dim_v=head_v,
        n_ctx_train=_get(kv, arch, "context_length"),
        n_vocab=int(vocab) if vocab is not None else None,
        n_ff=max(ff) if isinstance(ff, list) else ff,
        sliding_window=int(swa) if swa else None,
        swa_layers=swa_layers,
        n_expert=int(_get(kv, arch, "expert_count") or 0),
        n_expert_used=int(_get(kv, arch, "expert_used_count") or 0),
        file_type=kv.get("general.file_type"),
        embeddings_bytes=emb,
        output_bytes=out,
        output_tied=tied,
        layers=layers,
        other_bytes=other,
        tensor_bytes=total,
        n_tensors=count,
        shards=len(headers),
        notes=notes,
    )


def for_settings(s: Settings, path: Path | None = None) -> ModelMeta:
    """The profile's model: the local file when it is there, else its header from the Hub (range reads)."""
    from wrapper.model import acquire

    local = path or acquire.expected_path(s)
    if local.is_file():
        return read_local(local)
    spec = s.server
    if not spec.hf_repo_id or not spec.hf_filename:
        raise ModelUnavailable(f"model file not found: {local}", hint="fix llamacpp.model_path, or run wrapper fetch")
    if s.env.hf_offline:
        raise ModelUnavailable(
            f"model file not found: {local}, and HF_HUB_OFFLINE is set so its header cannot be read from the Hub",
            hint="run `wrapper fetch` while online, or unset HF_HUB_OFFLINE",
        )
    headers = {"Authorization": f"Bearer {s.env.hf_token.reveal()}"} if s.env.hf_token else {}
    url = hub_url(s.env.hf_endpoint or "https://huggingface.co", spec.hf_repo_id, spec.hf_filename,
                  spec.hf_revision or "main")
    return read_remote(url, headers)
