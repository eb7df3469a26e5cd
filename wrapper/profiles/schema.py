"""Profile schema: one entry of `profiles:` in llm_profiles.yaml.

Unknown keys are rejected (`extra="forbid"`) so a typo never silently falls back to a default; the
registry turns pydantic's errors into setting paths with file:line and a did-you-mean.
"""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
FlashAttn = Literal["on", "off", "auto"]
Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The Hub's repo ids: `name` or `owner/name`, letters, digits, `-_.`, no `..`/`--`, at most 96 characters.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def _printable(v: str | None) -> str | None:
    # A NUL in a path gave a ValueError traceback deep in the download (issue 15 item 11).
    if v is not None and any(not c.isprintable() for c in v):
        raise ValueError(f"must not contain NUL or control characters (got {v!r})")
    return v


def _check_repo_id(v: str | None) -> str | None:
    if v is None:
        return v
    if len(v) > 96 or not _REPO_ID.match(v) or ".." in v or "--" in v or v.endswith(".git"):
        raise ValueError(f"must be a Hub repo id like 'owner/name' (got {v!r})")
    return v


def _check_filename(v: str | None) -> str | None:
    if v is None:
        return v
    _printable(v)
    if "/" in v or "\\" in v or v in (".", ".."):
        raise ValueError(
            f"must be a plain file name, without path separators or '..' (got {v!r}); "
            "put a repo folder in hf_subfolder"
        )
    return v


def _check_subfolder(v: str | None) -> str | None:
    if v is None:
        return v
    _printable(v)
    parts = v.replace("\\", "/").strip("/").split("/")
    if v.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"must be a folder inside the repo, without '..' or absolute parts (got {v!r})")
    return "/".join(parts)


def _check_sha256(v: str | None) -> str | None:
    if v is None:
        return v
    v = v.strip().lower()
    if not _SHA256.match(v):
        raise ValueError(f"must be 64 hexadecimal characters (got {v!r})")
    return v


# llama-server flags whose value is a secret. On the command line they show in `ps`, /proc and
# `profiles show` (issue 15), so a profile may not carry them; the launcher redacts them by this list too.
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "-hft"})
_SECRET_HINTS = {
    "--api-key": "put the key in a file and set llamacpp.api_key_file",
    "--hf-token": "set HF_TOKEN or HF_TOKEN_FILE in the wrapper's environment",
    "-hft": "set HF_TOKEN or HF_TOKEN_FILE in the wrapper's environment",
}


# "Every layer" as -ngl spells it, in the plan and in the flags alike: any number above the layer count
# means all layers plus the output head, and every llama.cpp build accepts it (older ones lack `-ngl all`).
ALL_LAYERS = 999

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class GpuSpec(Strict):
    """The `gpu:` block. `device_ids` pins the instance; the rest are hints from the registry format."""

    num_gpus: NonNegative | None = None
    tensor_parallel_size: Positive | None = None
    device_ids: list[NonNegative] = Field(default_factory=list)
    max_model_len: Positive | None = None
    max_batch_tokens: Positive | None = None
    max_concurrent_requests: Positive | None = None
    gpu_memory_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    split_mode: Literal["layer", "row", "none"] | None = None
    tensor_split: list[Annotated[float, Field(ge=0)]] | None = None
    main_gpu: NonNegative | None = None

    @field_validator("device_ids", mode="before")
    @classmethod
    def _one_id(cls, v: object) -> object:
        # `device_ids: 0` is a natural slip for a one-GPU pin.
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("device_ids")
    @classmethod
    def _unique_ids(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"device ids must be unique, got {v}")
        return v


class HubFileChecks(Strict):
    """The checks of a Hub file's coordinates, shared by the model (llamacpp) and the extra files (mmproj,
    draft): one copy of each rule. Subclasses declare the fields."""

    @field_validator("hf_repo_id", check_fields=False)
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        return _check_repo_id(v)

    @field_validator("hf_filename", check_fields=False)
    @classmethod
    def _plain_filename(cls, v: str | None) -> str | None:
        return _check_filename(v)

    @field_validator("hf_subfolder", check_fields=False)
    @classmethod
    def _relative_folder(cls, v: str | None) -> str | None:
        return _check_subfolder(v)

    @field_validator("sha256", check_fields=False)
    @classmethod
    def _sha256_hex(cls, v: str | None) -> str | None:
        return _check_sha256(v)


class ModelSource(HubFileChecks):
    """A second file beside the model (a vision projector, a draft model): a local `path`, or a Hub file that
    is downloaded and verified exactly like the model. `hf_repo_id` defaults to the model's repo (and then
    `hf_revision` to the model's revision); the local copy lands in the model's `model_root`."""

    path: str | None = None
    hf_repo_id: str | None = None
    hf_filename: str | None = None
    hf_subfolder: str | None = None
    hf_revision: str | None = None
    sha256: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, v: object) -> object:
        # `mmproj: /models/x-mmproj.gguf` is the natural spelling for a local file.
        return {"path": v} if isinstance(v, str) else v

    @field_validator("path", "hf_revision")
    @classmethod
    def _no_control_chars(cls, v: str | None) -> str | None:
        return _printable(v)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if self.path and (self.hf_repo_id or self.hf_filename):
            raise ValueError("set either path or hf_filename (+ hf_repo_id), not both")
        if not self.path and not self.hf_filename:
            raise ValueError("no file: set path, or hf_filename (hf_repo_id defaults to the model's repo)")
        if self.hf_repo_id and not self.hf_filename:
            raise ValueError("hf_repo_id needs hf_filename")
        return self


class DraftSpec(ModelSource):
    """`llamacpp.draft`: the draft model of speculative decoding (it must share the model's vocabulary), and
    its knobs; an unset knob is not passed, so llama-server's default applies."""

    n_max: Positive | None = None  # tokens drafted per step
    n_min: NonNegative | None = None
    p_min: Annotated[float, Field(ge=0, le=1)] | None = None
    ctx_size: NonNegative | None = None  # older builds only (--ctx-size-draft); newer ones share the context
    n_gpu_layers: NonNegative | Literal["auto", "all"] | None = None

    @field_validator("n_gpu_layers", mode="before")
    @classmethod
    def _all_layers(cls, v: object) -> object:
        return "all" if v in (-1, "-1") else v


Pooling = Literal["none", "mean", "cls", "last", "rank"]


class LlamaCppSpec(HubFileChecks):
    """The `llamacpp:` block: where the model comes from and how llama-server runs it.

    A knob left unset (None) is not passed to llama-server, so the binary's own default applies.
    """

    # Where the model comes from.
    model_path: str | None = None
    model_root: str = "/models/gguf"
    hf_repo_id: str | None = None
    hf_filename: str | None = None
    # Big repos keep split files in a folder ("Q4_K_M/x-00001-of-00009.gguf"): the folder goes here, so
    # hf_filename stays a plain file name and the local copy lands at model_root/hf_filename.
    hf_subfolder: str | None = None
    hf_revision: str | None = None
    sha256: str | None = None

    # Network.
    host: str = "0.0.0.0"
    port: Port = 8080
    api_key_file: str | None = None

    # Capacity and placement.
    ctx_size: NonNegative | None = None
    n_gpu_layers: NonNegative | Literal["auto", "all"] | None = None
    n_cpu_moe: NonNegative | None = None
    cpu_moe: bool | None = None
    parallel: Positive | None = None
    batch_size: Positive | None = None
    ubatch_size: Positive | None = None
    threads: Positive | None = None
    threads_batch: Positive | None = None
    flash_attn: FlashAttn | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    cont_batching: bool | None = None
    mlock: bool | None = None
    mmap: bool | None = None
    embeddings: bool | None = None
    jinja: bool | None = None
    pooling: Pooling | None = None  # embedding profiles; unset: the model's own pooling

    # Companion files: a vision projector (supports_vision) and a draft model (speculative decoding).
    mmproj: ModelSource | None = None
    draft: DraftSpec | None = None

    # Passed to llama-server verbatim, after every derived flag.
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn_bool(cls, v: object) -> object:
        # YAML `flash_attn: true` is the natural spelling; llama-server wants on/off/auto.
        if v is True:
            return "on"
        if v is False:
            return "off"
        return v

    @field_validator("n_gpu_layers", mode="before")
    @classmethod
    def _all_layers(cls, v: object) -> object:
        # llama.cpp scripts say `-ngl -1` (or 99/999) for "every layer"; -1 means the same here.
        return "all" if v in (-1, "-1") else v

    @field_validator("cache_type_k", "cache_type_v", mode="before")
    @classmethod
    def _lower_cache_type(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split_args(cls, v: object) -> object:
        # A single string is split the way a shell would: extra_args: "--metrics --slots".
        return shlex.split(v) if isinstance(v, str) else v

    @field_validator("model_path", "model_root", "hf_revision")
    @classmethod
    def _no_control_chars(cls, v: str | None) -> str | None:
        return _printable(v)

    @field_validator("extra_args")
    @classmethod
    def _no_secret_flags(cls, v: list[str]) -> list[str]:
        for i, token in enumerate(v):
            # `--api-key=KEY`, and `"--api-key KEY"` as one item, are the same leak as two items.
            name = token.strip().split("=", 1)[0].split(None, 1)[0] if token.strip() else ""
            if name in SECRET_FLAGS:
                # The message names the flag and its position, never the value that follows it.
                raise ValueError(
                    f"item {i} passes a secret with `{name}` on llama-server's command line, where any local user "
                    f"sees it in `ps`; {_SECRET_HINTS[name]}"
                )
        return v

    @model_validator(mode="after")
    def _one_model_source(self) -> LlamaCppSpec:
        if self.model_path and (self.hf_repo_id or self.hf_filename):
            raise ValueError(
                "set either model_path or hf_repo_id + hf_filename, not both "
                "(model_path wins silently in other launchers; here it is an error so you know which file runs)"
            )
        if bool(self.hf_repo_id) != bool(self.hf_filename):
            missing = "hf_filename" if self.hf_repo_id else "hf_repo_id"
            raise ValueError(f"hf_repo_id and hf_filename go together: {missing} is missing")
        if not self.model_path and not self.hf_filename:
            raise ValueError("no model: set model_path, or hf_repo_id + hf_filename")
        return self


class SelfCheckSpec(Strict):
    """The `selfcheck:` block: the short throughput check run after every start."""

    enabled: bool = True
    on_fail: Literal["warn", "exit"] = "warn"
    warmup_requests: NonNegative = 1  # per slot in use, before anything is measured
    requests: Positive | None = None  # per measured window; default: 2 x concurrency
    concurrency: Positive | None = None  # default: the profile's parallel slots
    max_tokens: Positive = 64  # shrunk when prompt + output would not fit one slot
    prompt_tokens: Positive = 128  # real tokens as the server counts them (the longest prompt sent)
    # Windows are repeated until their spread is tight or this much time has gone (warm-up not included).
    measure_s: Annotated[float, Field(gt=0, le=30)] = 10.0
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    degraded_ratio: Annotated[float, Field(gt=0, le=1)] = 0.85
    fail_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5


class TuningSpec(Strict):
    """The `tuning:` block: apply the best config recorded by `wrapper bench-profile`."""

    auto: bool = False
    # A tuned start whose self-check lands clearly below the figure bench-profile recorded (below the
    # expectation's lower bound) stops the tuned llama-server and starts the profile's own config.
    fallback: bool = True


class SuperviseSpec(Strict):
    """The `supervise:` block: how llama-server is kept alive and stopped."""

    stop_grace_s: Annotated[float, Field(gt=0)] = 10.0
    load_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    max_restarts: NonNegative = 5
    restart_window_s: Annotated[float, Field(gt=0)] = 300.0
    backoff_initial_s: Annotated[float, Field(ge=0)] = 1.0
    backoff_max_s: Annotated[float, Field(ge=0)] = 30.0
    stable_after_s: Annotated[float, Field(gt=0)] = 60.0
    liveness_interval_s: Annotated[float, Field(gt=0)] = 10.0
    liveness_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    liveness_failures: Positive = 3


class Profile(Strict):
    display_name: str | None = None
    task_type: Literal["chat", "completion", "embedding", "rerank"] = "chat"
    backend: Literal["llamacpp"] = "llamacpp"
    model_id: str | None = None
    supports_tools: bool = False
    supports_embeddings: bool = False
    supports_vision: bool = False
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    llamacpp: LlamaCppSpec
    selfcheck: SelfCheckSpec = Field(default_factory=SelfCheckSpec)
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    supervise: SuperviseSpec = Field(default_factory=SuperviseSpec)

    @model_validator(mode="after")
    def _kind_fits(self) -> Profile:
        # A projector on a profile that does not claim vision is a half-finished edit, not a choice.
        if self.llamacpp.mmproj is not None and not self.supports_vision:
            raise ValueError("llamacpp.mmproj is set but supports_vision is false: set supports_vision: true")
        if self.llamacpp.draft is not None and self.task_type in ("embedding", "rerank"):
            raise ValueError(f"llamacpp.draft speeds up generation; a {self.task_type} profile generates nothing")
        return self
