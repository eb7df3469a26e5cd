"""GGUF header -> ModelMeta: the shape of a model and the exact bytes of each tensor group.

The header comes from wrapper/model/gguf_header.py (the one GGUF reader), from a local file or from the
Hub through HTTP range requests (the range grows until the header parses), so a multi-GB model is sized
from a few MB. Split GGUFs (`name-00001-of-0000N.gguf`) are summed over every shard's header.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from wrapper.errors import ModelUnavailable, ModelVerificationFailed
from wrapper.model.files import regular_file, shard_names
from wrapper.model.gguf_header import MAX_HEADER, Header, parse, read_header
from wrapper.settings import Settings

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("wrapper.acquire")

_MAX_LAYERS = 1 << 16
_RETRIES = 3  # header range reads: 5xx/429 are retried with backoff (issue 15 item 10)
_BACKOFF_S = 1.0
# llama.cpp's built-in sliding-window patterns for architectures whose GGUFs may omit the pattern key.
_BUILTIN_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2}
_LAYER = re.compile(r"^blk\.(\d{1,6})\.")


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
    n_ff_expert: int | None = None  # one routed expert's FFN width (feed_forward_length is the dense one)
    n_expert_shared: int = 0  # shared experts are ordinary tensors (ffn_*_shexp): they stay with the layer
    # MLA (DeepSeek-V2/V3): the cache holds one compressed latent per token (kv_lora_rank + rope dims, the
    # GGUF's key_length with head_count_kv 1) and no V at all: llama.cpp reads V as a view of K.
    mla: bool = False
    # Recurrent (Mamba-style) layers keep a fixed f32 state per sequence instead of a KV cache:
    # (conv_kernel - 1) x (inner + 2 x groups x state) for the conv, state x inner for the SSM.
    recurrent_layers: list[bool] | None = None
    recurrent_state_elems: int = 0  # f32 elements per layer and sequence
    file_type: int | None = None
    embeddings_bytes: int = 0
    output_bytes: int = 0  # the output head; a tied head is token_embd loaded a second time
    output_tied: bool = False
    tied_copy_bytes: int = 0  # the part of output_bytes that is token_embd's second copy (tied heads only)
    chat_template: bool = False  # tokenizer.chat_template present: llama-server formats chats with it
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


def read_local(path: str | Path) -> ModelMeta:
    """Read a local GGUF (any shard of a split model names the whole model)."""
    path = Path(path)
    headers = []
    for shard in shard_names(path.name, "model file"):
        p = path.with_name(shard)
        if regular_file(p) is None:
            raise ModelUnavailable(f"GGUF shard not found: {p}", hint="download every shard of the split model")
        headers.append(read_header(p))
    return build(headers, str(path))


def hub_url(endpoint: str, repo_id: str, filename: str, revision: str = "main") -> str:
    return f"{endpoint.rstrip('/')}/{repo_id}/resolve/{revision}/{filename}"


def read_remote(url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> ModelMeta:
    """Read a GGUF's header over HTTP range requests; a split URL reads every shard's header."""
    import httpx

    base, _, name = url.rpartition("/")
    parsed = []
    with httpx.Client(follow_redirects=True, timeout=timeout, headers=dict(headers or {})) as client:
        for shard in shard_names(name, "model URL"):
            shard_url = f"{base}/{shard}"

            def fetch(n: int, u: str = shard_url) -> bytes:
                return _range(client, u, n)

            parsed.append(parse(fetch, MAX_HEADER, _redact(shard_url)))
    return build(parsed, _redact(url))


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", url)


def _range(client: httpx.Client, url: str, n: int) -> bytes:
    """The first n bytes of url. A server that ignores Range gets cut off after n bytes, not downloaded."""
    import httpx

    for attempt in range(1, _RETRIES + 1):
        try:
            with client.stream("GET", url, headers={"Range": f"bytes=0-{n - 1}"}) as resp:
                status = resp.status_code
                if status in (401, 403):
                    raise ModelUnavailable(
                        f"{_redact(url)}: HTTP {status} (gated or private)",
                        hint="set HF_TOKEN to a token that can read this repo",
                    )
                if status in (200, 206):
                    out = bytearray()
                    for chunk in resp.iter_bytes():
                        out += chunk
                        if len(out) >= n:
                            break
                    return bytes(out[:n])
                if (status != 429 and status < 500) or attempt == _RETRIES:
                    raise ModelUnavailable(f"{_redact(url)}: HTTP {status} reading the GGUF header")
                why = f"HTTP {status}"
        except httpx.HTTPError as exc:
            if attempt == _RETRIES:
                raise ModelUnavailable(
                    f"{_redact(url)}: cannot read the GGUF header: {type(exc).__name__}"
                ) from None
            why = type(exc).__name__
        log.warning("%s: %s reading the GGUF header; retrying (%d/%d)", _redact(url), why, attempt, _RETRIES - 1)
        time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _get(kv: Mapping[str, Any], arch: str, key: str) -> Any:
    return kv.get(f"{arch}.{key}")


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]] + [default] * max(0, n_layer - len(value))
    return [int(value if value is not None else default)] * n_layer


def build(headers: list[Header], source: str) -> ModelMeta:
    """Combine the parsed headers of one model's shards (the first holds the metadata)."""
    try:
        return _build(headers, source)
    except (ValueError, TypeError, ArithmeticError) as exc:  # a key of the wrong type or an absurd value
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelVerificationFailed(f"{source}: GGUF metadata does not make sense: {first}") from None


def _build(headers: list[Header], source: str) -> ModelMeta:
    kv = headers[0].kv
    arch = str(kv.get("general.architecture") or "")
    where = source
    n_layer = _get(kv, arch, "block_count")
    n_embd = _get(kv, arch, "embedding_length")
    n_head_raw = _get(kv, arch, "attention.head_count")
    if not arch or n_layer is None or n_embd is None or n_head_raw is None:
        raise ModelVerificationFailed(f"{where}: GGUF lacks architecture/block_count/embedding_length/head_count")
    n_layer, n_embd = int(n_layer), int(n_embd)
    if not 0 < n_layer <= _MAX_LAYERS:
        raise ModelVerificationFailed(f"{where}: GGUF block_count {n_layer} is out of range 1-{_MAX_LAYERS}")
    n_head_list = _per_layer(n_head_raw, n_layer, 0)
    n_head = max(n_head_list) or 1
    n_head_kv = _per_layer(_get(kv, arch, "attention.head_count_kv"), n_layer, n_head)
    head_k = int(_get(kv, arch, "attention.key_length") or n_embd // n_head)
    head_v = int(_get(kv, arch, "attention.value_length") or n_embd // n_head)
    notes: list[str] = []

    mla = bool(_get(kv, arch, "attention.key_length_mla") and _get(kv, arch, "attention.value_length_mla"))
    recurrent_layers, state_elems = _recurrent(kv, arch, n_layer, n_head_kv)

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
    ff_exp = _get(kv, arch, "expert_feed_forward_length")
    layers = [LayerBytes() for _ in range(n_layer)]
    emb = out = other = total = count = 0
    token_embd = 0
    embd_vocab = None
    for header in headers:
        for t in header.tensors:
            name, ne, size = t.name, t.ne, t.nbytes
            total += size
            count += 1
            if m := _LAYER.match(name):
                idx = int(m[1])
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
    names = {t.name for h in headers for t in h.tensors}
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
        n_expert_shared=int(_get(kv, arch, "expert_shared_count") or 0),
        n_ff_expert=max(ff_exp) if isinstance(ff_exp, list) else ff_exp,
        mla=mla,
        recurrent_layers=recurrent_layers,
        recurrent_state_elems=state_elems,
        file_type=kv.get("general.file_type"),
        embeddings_bytes=emb,
        output_bytes=out,
        output_tied=tied,
        tied_copy_bytes=token_embd if tied else 0,
        chat_template=any(k in kv for k in ("tokenizer.chat_template", "tokenizer.chat_template.tool_use")),
        layers=layers,
        other_bytes=other,
        tensor_bytes=total,
        n_tensors=count,
        shards=len(headers),
        notes=notes,
    )


def _recurrent(kv: Mapping[str, Any], arch: str, n_layer: int,
               n_head_kv: list[int]) -> tuple[list[bool] | None, int]:
    """Which layers are recurrent and their state size. Pure SSMs (mamba) have no attention at all; hybrids
    (jamba, granitehybrid, nemotron_h) mark their recurrent layers with head_count_kv 0."""
    conv, inner, state = (_get(kv, arch, f"ssm.{k}") for k in ("conv_kernel", "inner_size", "state_size"))
    if not (conv and inner and state):
        return None, 0
    groups = int(_get(kv, arch, "ssm.group_count") or 0)
    elems = (int(conv) - 1) * (int(inner) + 2 * groups * int(state)) + int(state) * int(inner)
    has_attention = _get(kv, arch, "attention.head_count_kv") is not None and any(n_head_kv)
    layers = [h == 0 for h in n_head_kv] if has_attention else [True] * n_layer
    return layers, elems


def recorded_header(s: Settings) -> Path | None:
    """A header shipped beside the registry (`gguf-headers/<sha256>.gguf`) for a profile that pins sha256.

    Named by the pinned hash, it describes exactly the file the profile will download, so the planner can
    size that model before it is fetched and without the Hub (the quick start plans offline with it).
    """
    sha = s.server.sha256
    if not sha:
        return None
    candidate = s.registry_path.parent / "gguf-headers" / f"{sha}.gguf"
    return candidate if candidate.is_file() else None


def for_settings(s: Settings, path: Path | None = None) -> ModelMeta:
    """The profile's model: the local file when it is there, else a recorded header for its pinned sha256,
    else its header from the Hub (range reads)."""
    from wrapper.model import acquire

    local = path or acquire.expected_path(s)
    if regular_file(local) is not None:
        return read_local(local)
    recorded = recorded_header(s) if path is None else None
    if recorded is not None:
        meta = read_local(recorded)
        meta.notes.append(f"sized from the recorded header {recorded.name} (the model is not downloaded yet)")
        return meta
    spec = s.server
    if not spec.hf_repo_id or not spec.hf_filename:
        raise ModelUnavailable(f"model file not found: {local}", hint="fix llamacpp.model_path, or run wrapper fetch")
    if s.env.hf_offline:
        raise ModelUnavailable(
            f"model file not found: {local}, and HF_HUB_OFFLINE is set so its header cannot be read from the Hub",
            hint="run `wrapper fetch` while online, or unset HF_HUB_OFFLINE",
        )
    from wrapper.model.hub import read_token

    token = read_token(s)  # HF_TOKEN or HF_TOKEN_FILE, checked the same way as for downloads
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = hub_url(s.env.hf_endpoint or "https://huggingface.co", spec.hf_repo_id, spec.hf_filename,
                  spec.hf_revision or "main")
    return read_remote(url, headers)
