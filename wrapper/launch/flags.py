"""Settings -> llama-server argv + child env. Pure: one small function per flag family.

A flag is passed only when its knob is set, so llama-server's own default applies otherwise (and
`wrapper flags` shows exactly what is decided by us). Spellings come from the installed binary's
`--help` (`Capabilities`), because llama.cpp renames flags over time (`--n-parallel` -> `--parallel`,
`-fa` became `-fa on|off|auto`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wrapper.errors import BinaryError
from wrapper.model import acquire
from wrapper.profiles.schema import ALL_LAYERS, SECRET_FLAGS  # one list each: schema refuses, argv redacts
from wrapper.settings import Settings

# Each knob: the spellings to try, newest first. The first one the binary lists is used.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "model": ("--model", "-m"),
    "host": ("--host",),
    "port": ("--port",),
    "api_key_file": ("--api-key-file",),
    "ctx_size": ("--ctx-size", "-c"),
    "n_gpu_layers": ("--n-gpu-layers", "--gpu-layers", "-ngl"),
    "n_cpu_moe": ("--n-cpu-moe", "-ncmoe"),
    "cpu_moe": ("--cpu-moe", "-cmoe"),
    "parallel": ("--parallel", "--n-parallel", "-np"),
    "batch_size": ("--batch-size", "-b"),
    "ubatch_size": ("--ubatch-size", "-ub"),
    "threads": ("--threads", "-t"),
    "threads_batch": ("--threads-batch", "-tb"),
    "flash_attn": ("--flash-attn", "-fa"),
    "cache_type_k": ("--cache-type-k", "-ctk"),
    "cache_type_v": ("--cache-type-v", "-ctv"),
    "cont_batching": ("--cont-batching", "-cb"),
    "no_cont_batching": ("--no-cont-batching", "-nocb"),
    "mlock": ("--mlock",),
    "no_mmap": ("--no-mmap",),
    "load_mode": ("--load-mode", "-lm"),
    "embeddings": ("--embeddings", "--embedding"),
    "jinja": ("--jinja",),
    "split_mode": ("--split-mode", "-sm"),
    "tensor_split": ("--tensor-split", "-ts"),
    "main_gpu": ("--main-gpu", "-mg"),
    "fit": ("--fit",),
    "alias": ("--alias", "-a"),
    "metrics": ("--metrics",),
    "pooling": ("--pooling",),
    "reranking": ("--reranking", "--rerank"),
    "mmproj": ("--mmproj", "-mm"),
    # Speculative decoding was renamed to --spec-draft-* (late 2026 builds list --draft-max as removed).
    "model_draft": ("--spec-draft-model", "--model-draft", "-md"),
    "spec_type": ("--spec-type",),
    "draft_n_max": ("--spec-draft-n-max", "--draft-max", "--draft", "--draft-n"),
    "draft_n_min": ("--spec-draft-n-min", "--draft-min", "--draft-n-min"),
    "draft_p_min": ("--spec-draft-p-min", "--draft-p-min"),
    "draft_ctx_size": ("--ctx-size-draft", "-cd"),
    "draft_n_gpu_layers": ("--spec-draft-ngl", "--n-gpu-layers-draft", "--gpu-layers-draft", "-ngld"),
}

# Values that follow these flags are secrets and are never shown (extra_args may carry them).
_FLAG_TOKEN = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


@dataclass(frozen=True)
class Capabilities:
    """What the installed llama-server accepts, read from its `--help`."""

    path: str
    version: str
    flags: frozenset[str]
    flash_attn_takes_value: bool = True

    @classmethod
    def from_help(cls, path: str, help_text: str, version: str = "unknown") -> Capabilities:
        flags = frozenset(_FLAG_TOKEN.findall(_without_removed(help_text)))
        fa_value = bool(re.search(r"(-fa|--flash-attn)[ ,=]*[^\n]*\b(on|auto)\b", help_text))
        return cls(path=path, version=version, flags=flags, flash_attn_takes_value=fa_value)

    def spelling(self, knob: str) -> str | None:
        return next((s for s in SPELLINGS[knob] if s in self.flags), None)

    def require(self, knob: str, why: str) -> str:
        flag = self.spelling(knob)
        if flag is None:
            raise BinaryError(
                f"{why}: this llama-server ({self.path}, version {self.version}) has no "
                f"{' / '.join(SPELLINGS[knob])} flag",
                hint="unset that setting, or use a newer llama.cpp build (LLAMA_SERVER_BIN)",
            )
        return flag


_REMOVED = re.compile(r"argument has been removed", re.IGNORECASE)


def _without_removed(help_text: str) -> str:
    """The help text minus entries for flags llama.cpp still lists only to say they are gone: a build of
    late 2026 prints `--draft, --draft-n, --draft-max N   the argument has been removed. use --spec-draft-n-max`
    and refuses the old spelling at start, so listing it is not accepting it."""
    entries: list[list[str]] = []
    for line in help_text.splitlines():
        if line.startswith("-") or not entries:
            entries.append([line])
        else:
            entries[-1].append(line)
    return "\n".join("\n".join(e) for e in entries if not _REMOVED.search(" ".join(e)))


def find_binary(explicit: str | None) -> str:
    """LLAMA_SERVER_BIN, else PATH."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and path.stat().st_mode & 0o111):
            raise BinaryError(
                f"LLAMA_SERVER_BIN={explicit}: not an executable file",
                hint="point it at a llama-server binary (scripts/build-llama-server.sh builds one)",
            )
        return str(path)
    found = shutil.which("llama-server")
    if found is None:
        raise BinaryError(
            "llama-server not found: LLAMA_SERVER_BIN is unset and it is not on PATH",
            hint="run scripts/build-llama-server.sh and set LLAMA_SERVER_BIN to the path it prints, "
            "or use the container image (it ships llama-server)",
        )
    return found


def detect(binary: str, cache_dir: Path | None = None) -> Capabilities:
    """Run `--help` and `--version` once per binary (cached on disk by path + mtime + size)."""
    st = Path(binary).stat()
    # v2: removed flags are no longer counted as accepted (a v1 cache listed --draft-max for builds that refuse it).
    key = hashlib.sha256(f"v2:{Path(binary).resolve()}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"capabilities-{key}.json" if cache_dir else None
    if cache_file and cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text())
            return Capabilities(binary, data["version"], frozenset(data["flags"]), data["fa_value"])
        except (ValueError, KeyError):
            pass  # a corrupt cache is rebuilt below
    help_text = _run(binary, "--help")
    version = _parse_version(_run(binary, "--version"))
    caps = Capabilities.from_help(binary, help_text, version)
    if not caps.flags:
        raise BinaryError(f"{binary} --help printed no flags: is it really llama-server?")
    if cache_file:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            payload = {"version": version, "flags": sorted(caps.flags), "fa_value": caps.flash_attn_takes_value}
            tmp.write_text(json.dumps(payload))
            tmp.replace(cache_file)
        except OSError:
            pass  # caching is an optimisation; a read-only state dir must not stop serving
    return caps


def _run(binary: str, arg: str) -> str:
    try:
        proc = subprocess.run(
            [binary, arg], capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinaryError(f"{binary} {arg} failed: {exc}") from None
    return proc.stdout + proc.stderr


def _parse_version(text: str) -> str:
    match = re.search(r"version:\s*(\S+)(?:\s*\(([0-9a-f]+)\))?", text)
    if not match:
        return "unknown"
    return f"{match.group(1)}-{match.group(2)}" if match.group(2) else match.group(1)


@dataclass(frozen=True)
class Arg:
    flag: str
    value: str | None
    knob: str  # setting path, e.g. "llamacpp.ctx_size"
    origin: str


@dataclass(frozen=True)
class Command:
    binary: str
    args: tuple[Arg, ...]
    extra: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # variables set or changed for the child
    dropped_env: tuple[str, ...] = ()  # inherited variables removed from the child's environment

    @property
    def argv(self) -> list[str]:
        out = [self.binary]
        for arg in self.args:
            out.append(arg.flag)
            if arg.value is not None:
                out.append(arg.value)
        return out + list(self.extra)

    def redacted_argv(self) -> list[str]:
        return redact_argv(self.argv)


def redact_argv(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for token in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name, eq, _ = token.partition("=")
        if name in SECRET_FLAGS:
            if eq:
                out.append(f"{name}=***")
            else:
                out.append(token)
                hide_next = True
            continue
        out.append(token)
    return out


Family = Callable[[Settings, Capabilities], Iterable[Arg]]


def _knob(s: Settings, caps: Capabilities, key: str, value: object, spelling: str | None = None) -> Arg:
    path = f"llamacpp.{key}"
    flag = caps.require(spelling or key, f"{path}={value}")
    return Arg(flag, None if value is None else str(value), path, s.origin(path))


def model_flags(model_file: Path) -> Family:
    def family(s: Settings, caps: Capabilities) -> Iterable[Arg]:
        origin = "profile" if s.server.model_path else "resolved"
        yield Arg(caps.require("model", "model"), str(model_file), "llamacpp.model_path", origin)

    return family


def network_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    yield _knob(s, caps, "host", s.server.host)
    yield _knob(s, caps, "port", s.server.port)
    if s.server.api_key_file:
        # Never `--api-key VALUE`: argv is world-readable through /proc and `ps`.
        yield _knob(s, caps, "api_key_file", s.server.api_key_file)


def capacity_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    for key in ("ctx_size", "parallel", "batch_size", "ubatch_size", "threads", "threads_batch"):
        value = getattr(s.server, key)
        if value is not None:
            yield _knob(s, caps, key, value)


def offload_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    ngl = s.server.n_gpu_layers
    if ngl == "all":
        yield _knob(s, caps, "n_gpu_layers", ALL_LAYERS)  # one spelling of "all", shared with the plan
    elif ngl == "auto":
        fit = caps.spelling("fit")
        if fit:
            # The plan handed the decision to llama-server, which sizes the unset -ngl/--n-cpu-moe/ctx
            # against the device memory it measures at load (serve.apply_layers says why in the log).
            yield Arg(fit, "on", "llamacpp.n_gpu_layers", "plan")
    elif ngl is not None:
        yield _knob(s, caps, "n_gpu_layers", ngl)
    if s.server.cpu_moe:
        yield _knob(s, caps, "cpu_moe", None)
    if s.server.n_cpu_moe is not None:
        yield _knob(s, caps, "n_cpu_moe", s.server.n_cpu_moe)


def attention_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    fa = s.server.flash_attn
    if fa is not None:
        if caps.flash_attn_takes_value:
            yield _knob(s, caps, "flash_attn", fa)
        elif fa == "on":
            yield _knob(s, caps, "flash_attn", None)
        # Older builds: flash attention is off unless -fa is given, and have no "auto".
    for key in ("cache_type_k", "cache_type_v"):
        value = getattr(s.server, key)
        if value is not None:
            yield _knob(s, caps, key, value)


def switch_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    if s.server.cont_batching is True:
        yield _knob(s, caps, "cont_batching", None)
    elif s.server.cont_batching is False:
        yield _knob(s, caps, "cont_batching", None, "no_cont_batching")
    yield from _load_mode_flags(s, caps)
    if s.server.embeddings:
        yield _knob(s, caps, "embeddings", None)
    if s.server.jinja:
        yield _knob(s, caps, "jinja", None)


def _load_mode_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    mlock, mmap = s.server.mlock, s.server.mmap
    if not mlock and mmap is not False:
        return
    lm = caps.spelling("load_mode")
    if lm is not None:
        # Newer builds replaced --mlock/--no-mmap with one --load-mode {none,mmap,mlock,mmap+mlock}.
        mode = ("mmap+mlock" if mmap is not False else "mlock") if mlock else "none"
        path = "llamacpp.mlock" if mlock else "llamacpp.mmap"
        yield Arg(lm, mode, path, s.origin(path))
        return
    if mlock:
        yield _knob(s, caps, "mlock", None)
    if mmap is False:
        yield _knob(s, caps, "mmap", None, "no_mmap")


def multi_gpu_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    gpu = s.profile.gpu
    several = len(gpu.device_ids) > 1 or (s.cuda_visible_devices or "").count(",") > 0
    if gpu.split_mode is not None:
        yield Arg(caps.require("split_mode", "gpu.split_mode"), gpu.split_mode, "gpu.split_mode", "profile")
    elif several:
        # Layer split is llama.cpp's default, stated so the command line says how the GPUs share work.
        yield Arg(caps.require("split_mode", "gpu.split_mode"), "layer", "gpu.split_mode", "derived")
    if gpu.tensor_split:
        value = ",".join(f"{x:g}" for x in gpu.tensor_split)
        yield Arg(caps.require("tensor_split", "gpu.tensor_split"), value, "gpu.tensor_split", "profile")
    if gpu.main_gpu is not None:
        yield Arg(caps.require("main_gpu", "gpu.main_gpu"), str(gpu.main_gpu), "gpu.main_gpu", "profile")


def identity_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    # Without --alias, /v1/models and every response's "model" show the GGUF's file path.
    if s.profile.model_id:
        yield Arg(caps.require("alias", f"model_id={s.profile.model_id}"), s.profile.model_id, "model_id",
                  s.origin("model_id"))


def task_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    """What the profile's kind needs: embedding and rerank servers are separate modes of llama-server."""
    task = s.profile.task_type
    if task == "embedding" and not s.server.embeddings:  # llamacpp.embeddings: true is passed by switch_flags
        yield Arg(caps.require("embeddings", "task_type: embedding"), None, "task_type", "derived")
    elif task == "rerank":
        yield Arg(caps.require("reranking", "task_type: rerank"), None, "task_type", "derived")
    if s.server.pooling is not None:
        yield _knob(s, caps, "pooling", s.server.pooling)


_DRAFT_KNOBS = ("n_max", "n_min", "p_min", "ctx_size", "n_gpu_layers")


def companion_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    """The projector and the draft model, at the paths `acquire` fetches them to (a fetch and `wrapper flags`
    agree because both ask acquire.expected_path)."""
    spec = s.server
    if spec.mmproj is not None:
        path = acquire.expected_path(acquire.companion(s, spec.mmproj))
        yield Arg(caps.require("mmproj", "llamacpp.mmproj"), str(path), "llamacpp.mmproj", s.origin("llamacpp.mmproj"))
    draft = spec.draft
    if draft is None:
        return
    origin = s.origin("llamacpp.draft")
    path = acquire.expected_path(acquire.companion(s, draft))
    yield Arg(caps.require("model_draft", "llamacpp.draft"), str(path), "llamacpp.draft", origin)
    spec_type = caps.spelling("spec_type")
    if spec_type:
        # Builds with --spec-type load a -md model and then never draft with it unless told to (default
        # `none`): measured on the tiny pair, timings.draft_n stayed 0 until --spec-type draft-simple.
        yield Arg(spec_type, "draft-simple", "llamacpp.draft", "derived")
    for key in _DRAFT_KNOBS:
        value = getattr(draft, key)
        if value is None:
            continue
        if value == "all":
            value = ALL_LAYERS  # the one spelling of "all", as for the model
        setting = f"llamacpp.draft.{key}"
        yield Arg(caps.require(f"draft_{key}", f"{setting}={value}"), str(value), setting, origin)


def metrics_flags(s: Settings, caps: Capabilities) -> Iterable[Arg]:
    # The status port re-serves llama-server's own /metrics under this instance's labels; llama-server
    # answers /metrics only with --metrics. Without a status port nobody reads them: leave it to the profile.
    if s.env.status_port and "--metrics" not in s.server.extra_args and caps.spelling("metrics"):
        yield Arg("--metrics", None, "WRAPPER_STATUS_PORT", "derived")


FAMILIES: tuple[Family, ...] = (
    network_flags,
    identity_flags,
    capacity_flags,
    offload_flags,
    attention_flags,
    switch_flags,
    task_flags,
    companion_flags,
    multi_gpu_flags,
    metrics_flags,
)


def child_env(s: Settings) -> tuple[dict[str, str], tuple[str, ...]]:
    """Variables we set for the child, and inherited ones we remove."""
    changes: dict[str, str] = {}
    if s.cuda_visible_devices is not None and s.cuda_origin != "inherited":
        changes["CUDA_VISIBLE_DEVICES"] = s.cuda_visible_devices
    # llama-server reads LLAMA_ARG_* as flag defaults; an inherited one would silently change the run
    # behind the command line we print. The profile and env overrides are the only inputs.
    dropped = tuple(sorted(k for k in s.env.base if k.startswith("LLAMA_ARG_") or k == "LLAMA_API_KEY"))
    return changes, dropped


def derive(s: Settings, caps: Capabilities, model_file: Path) -> Command:
    args: list[Arg] = list(model_flags(model_file)(s, caps))
    for family in FAMILIES:
        args.extend(family(s, caps))
    env, dropped = child_env(s)
    return Command(binary=caps.path, args=tuple(args), extra=tuple(s.server.extra_args), env=env, dropped_env=dropped)


def full_env(command: Command, base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in command.dropped_env}
    env.update(command.env)
    return env
