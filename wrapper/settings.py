"""The only reader of the environment: one frozen `Settings` built from registry + env, passed down.

Every effective value remembers where it came from: `profile`, `default`, `env:VARIABLE`, and later
`tuning:<run>` or `plan`. Layers apply in that order and an env override always wins, so an operator's
explicit override is never replaced by an automatic decision.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from wrapper import warm
from wrapper.errors import ConfigError, ConfigErrors
from wrapper.profiles import LlamaCppSpec, Profile, Registry, load, resolve_path
from wrapper.profiles.registry import is_branch_tag, join_branches

# Blocks of a profile whose scalar fields can be overridden from the environment, and the pattern.
# llamacpp keeps the seed's names (LLAMACPP_CTX_SIZE_OVERRIDE); the wrapper's own blocks use WRAPPER_*.
_OVERRIDE_BLOCKS = {
    "llamacpp": ("LLAMACPP_", "_OVERRIDE"),
    "selfcheck": ("WRAPPER_SELFCHECK_", ""),
    "supervise": ("WRAPPER_SUPERVISE_", ""),
    "tuning": ("WRAPPER_TUNING_", ""),
}
# Fields that choose the model file are not knobs: overriding them would bypass the profile's checks.
_NOT_OVERRIDABLE = {"model_root", "hf_repo_id", "hf_filename", "hf_subfolder", "hf_revision", "sha256", "extra_args",
                    "mmproj", "draft"}

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LLAMA_API_KEY")


def override_variables() -> dict[str, str]:
    """Every override variable -> the setting path it overrides (e.g. LLAMACPP_CTX_SIZE_OVERRIDE)."""
    out: dict[str, str] = {}
    for block, (prefix, suffix) in _OVERRIDE_BLOCKS.items():
        model = Profile.model_fields[block].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for name, info in model.model_fields.items():
            if name in _NOT_OVERRIDABLE or _is_list(info.annotation):
                continue
            out[f"{prefix}{name.upper()}{suffix}"] = f"{block}.{name}"
    return out


def _is_list(annotation: object) -> bool:
    return "list[" in str(annotation)


class Secret:
    """A string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _blank_is_unset(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


@dataclass(frozen=True)
class Environment:
    """What the process environment says, read once."""

    profile_name: str | None = None
    config_path: str | None = None
    cache_dir: str | None = None
    hf_token: Secret | None = None
    hf_token_file: str | None = None
    hf_endpoint: str | None = None
    hf_offline: bool = False
    llama_server_bin: str | None = None
    nats_url: str | None = None
    status_host: str = "0.0.0.0"
    status_port: int = 8201
    log_format: str = "text"
    instance_id: str | None = None
    state_dir: str | None = None
    cuda_visible_devices_override: str | None = None
    runtime_dir: str | None = None  # where running instances register their ports and GPU pins (preflight)
    allow_gpu_sharing: bool = False
    # Network access (issue 15): a Bearer token for /status, and NATS credentials / TLS files.
    status_token: Secret | None = None
    status_token_file: str | None = None
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    # Who this instance is on the fleet (see `Identity`).
    node_name: str | None = None
    advertise_url: str | None = None
    service_name: str | None = None
    service_version: str | None = None
    heartbeat_s: float = 30.0
    overrides: Mapping[str, str] = field(default_factory=dict)
    # The environment handed to children, minus nothing: llama-server needs PATH, LD_LIBRARY_PATH, ...
    base: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Environment:
        env = dict(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            return _blank_is_unset(env, name)

        token = get("HF_TOKEN") or get("HUGGING_FACE_HUB_TOKEN")
        port_raw = get("WRAPPER_STATUS_PORT")
        status_port = 8201
        if port_raw is not None:
            try:
                status_port = int(port_raw)
            except ValueError:
                raise ConfigError(
                    f"WRAPPER_STATUS_PORT={port_raw!r}: not an integer",
                    hint="set a port number 0-65535 (0 disables the status server) or leave it blank",
                ) from None
            if not 0 <= status_port <= 65535:
                raise ConfigError(f"WRAPPER_STATUS_PORT={status_port}: out of range 0-65535")
        log_format = (get("WRAPPER_LOG_FORMAT") or "text").lower()
        if log_format not in ("text", "json"):
            raise ConfigError(f"WRAPPER_LOG_FORMAT={log_format!r}: must be 'text' or 'json'")
        offline = (get("HF_HUB_OFFLINE") or "0").lower() in ("1", "true", "yes", "on")
        overrides = {name: v for name in override_variables() if (v := get(name)) is not None}
        heartbeat_s = _positive_float(get("WRAPPER_HEARTBEAT_S"), "WRAPPER_HEARTBEAT_S", 30.0)
        return cls(
            profile_name=get("LLM_PROFILE_NAME"),
            config_path=get("LLM_PROFILES_CONFIG_PATH"),
            cache_dir=get("LLM_CACHE_DIR"),
            hf_token=Secret(token) if token else None,
            hf_token_file=get("HF_TOKEN_FILE"),
            hf_endpoint=get("HF_ENDPOINT"),
            hf_offline=offline,
            llama_server_bin=get("LLAMA_SERVER_BIN"),
            status_host=get("WRAPPER_STATUS_HOST") or "0.0.0.0",
            status_port=status_port,
            log_format=log_format,
            instance_id=get("WRAPPER_INSTANCE_ID"),
            state_dir=get("WRAPPER_STATE_DIR"),
            cuda_visible_devices_override=get("CUDA_VISIBLE_DEVICES_OVERRIDE"),
            runtime_dir=get("WRAPPER_RUNTIME_DIR"),
            allow_gpu_sharing=(get("WRAPPER_ALLOW_GPU_SHARING") or "0").lower() in ("1", "true", "yes", "on"),
            node_name=get("NODE_NAME"),
            advertise_url=_url(get("WRAPPER_ADVERTISE_URL")),
            service_name=get("SERVICE_NAME"),
            service_version=get("SERVICE_VERSION"),
            heartbeat_s=heartbeat_s,
            overrides=overrides,
            base=env,
            **_network(get),
        )

    def state_path(self) -> Path:
        """Where the wrapper keeps its own state (tuning store, receipts, caches)."""
        return Path(self.state_dir) if self.state_dir else warm.state_dir(self.base)

    def child_env(self) -> dict[str, str]:
        """The environment for llama-server: ours minus secrets it does not need."""
        return {k: v for k, v in self.base.items() if k not in SECRET_ENV}


def _network(get: Callable[[str], str | None]) -> dict[str, Any]:
    """NATS_* and the status token, read with the rest of the environment; NATS_URL validated here."""
    url = get("NATS_URL")
    if url is not None:
        check_nats_url(url)
    if bool(get("NATS_TLS_CERT")) != bool(get("NATS_TLS_KEY")):
        raise ConfigError("NATS_TLS_CERT and NATS_TLS_KEY: set both (a client certificate and its key) or neither")
    token = get("WRAPPER_STATUS_TOKEN")
    return {"nats_url": url, "nats_creds": get("NATS_CREDS"), "nats_tls_ca": get("NATS_TLS_CA"),
            "nats_tls_cert": get("NATS_TLS_CERT"), "nats_tls_key": get("NATS_TLS_KEY"),
            "status_token": Secret(token) if token else None, "status_token_file": get("WRAPPER_STATUS_TOKEN_FILE")}


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_HOST = re.compile(r"^[A-Za-z0-9._-]+$|^\[[0-9A-Fa-f:.]+\]$")


def redact_userinfo(url: str) -> str:
    """`nats://user:pass@h:4222` -> `nats://***@h:4222`; for messages about a URL that may not parse."""
    return re.sub(r"(?<=//)[^@/]*@", "***@", url) if "@" in url else url


def check_nats_url(url: str) -> None:
    """Refuse a NATS_URL nats-py cannot use, at start: a bad one used to kill the events thread with chained
    tracebacks and leave events silently off (issue 15). The message never shows a password."""
    shown = redact_userinfo(url)
    hint = "use nats://HOST:PORT (or tls://, ws://, wss://), or leave NATS_URL blank to turn events off"
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.scheme not in _NATS_SCHEMES:
        raise ConfigError(f"NATS_URL={shown}: scheme {parts.scheme!r} is not one of {', '.join(_NATS_SCHEMES)}", hint)
    hostport = parts.netloc.rpartition("@")[2]
    bracketed = hostport.startswith("[") and "]" in hostport
    host = hostport[: hostport.index("]") + 1] if bracketed else hostport.split(":")[0]
    if not parts.hostname or not _HOST.match(host) or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"NATS_URL={shown}: not a NATS server address (expected HOST or HOST:PORT)", hint)
    try:
        parts.port  # noqa: B018  (urlsplit checks the port only when asked)
    except ValueError:
        raise ConfigError(f"NATS_URL={shown}: the port is not a number in 1-65535", hint) from None
    if parts.port == 0:
        raise ConfigError(f"NATS_URL={shown}: the port is not a number in 1-65535", hint)


@dataclass(frozen=True)
class Settings:
    profile_name: str
    registry_path: Path
    profile: Profile  # effective: profile + layers + env overrides
    origins: Mapping[str, str]  # "llamacpp.ctx_size" -> "profile" | "default" | "env:VAR" | "tuning:..." | "plan"
    env: Environment
    cuda_visible_devices: str | None = None  # what the child sees (None: every GPU); see visible_devices()
    cuda_origin: str = "inherited"

    @property
    def server(self) -> LlamaCppSpec:
        return self.profile.llamacpp

    @property
    def local_url(self) -> str:
        """How this machine reaches llama-server (the self-check, probes, /status)."""
        return local_url(self.server.host, self.server.port)

    @property
    def identity(self) -> Identity:
        """Who this instance is on the fleet (events, /metrics labels)."""
        return identity(self.env, self.profile_name, self.server.host, self.server.port)

    def api_keys(self) -> tuple[Secret, ...]:
        """llama-server's keys from llamacpp.api_key_file (none without one). Fails closed: see read_api_keys."""
        path = self.server.api_key_file
        return read_api_keys(path, f"{self.origin('llamacpp.api_key_file')} llamacpp.api_key_file") if path else ()

    def origin(self, path: str) -> str:
        return self.origins.get(path, "default")

    def with_layer(self, values: Mapping[str, Any], origin: str) -> tuple[Settings, list[str]]:
        """Apply automatic values (tuning, plan). Env overrides win: such keys are skipped and returned."""
        skipped = [p for p in values if self.origin(p).startswith("env:")]
        applied = {p: v for p, v in values.items() if p not in skipped}
        if not applied:
            return self, skipped
        profile = _apply(self.profile, applied)
        origins = dict(self.origins)
        origins.update(dict.fromkeys(applied, origin))
        return replace(self, profile=profile, origins=origins), skipped


def local_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server bound to host:port. A wildcard bind is reached
    on loopback of the same family; an IPv6 literal needs brackets in a URL."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if bare in ("", "0.0.0.0", "*"):
        bare = "127.0.0.1"
    elif bare == "::":
        bare = "::1"
    return f"http://[{bare}]:{port}" if ":" in bare else f"http://{bare}:{port}"


# ---------------------------------------------------------------- fleet identity


@dataclass(frozen=True)
class Identity:
    """Instance id = node + profile unless WRAPPER_INSTANCE_ID names it; node from NODE_NAME, else the
    hostname; the URL other nodes use from WRAPPER_ADVERTISE_URL, else the node's name and llama-server's
    port. Every compose node used to report `llm` and `http://127.0.0.1:8080` (issue 13)."""

    node_id: str
    instance_id: str
    advertise_url: str
    service_name: str | None = None
    service_version: str | None = None


def identity(env: Environment, profile: str, host: str, port: int, hostname: str | None = None) -> Identity:
    node = env.node_name or hostname or socket.gethostname() or "localhost"
    bare = host.strip().removeprefix("[").removesuffix("]")
    if env.advertise_url:
        url = env.advertise_url
    elif bare in ("", "0.0.0.0", "*", "::"):
        # A wildcard bind is reachable on the node's name; loopback would send other nodes to themselves.
        url = f"http://{node}:{port}"
    else:
        url = local_url(host, port)
    return Identity(node_id=node, instance_id=env.instance_id or f"{node}-{profile}", advertise_url=url,
                    service_name=env.service_name, service_version=env.service_version)


def _url(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not raw.startswith(("http://", "https://")) or len(raw.split("://", 1)[1].strip("/")) == 0:
        raise ConfigError(f"WRAPPER_ADVERTISE_URL={raw!r}: not an http(s) URL",
                          hint="set the URL other nodes reach llama-server on, e.g. http://gpu-node-1:8080")
    return raw.rstrip("/")


def _positive_float(raw: str | None, name: str, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{name}={raw!r}: not a positive number of seconds", hint=f"unset it for {default:g}")
    return value


def read_api_keys(path: str, where: str = "llamacpp.api_key_file") -> tuple[Secret, ...]:
    """The keys of an --api-key-file as llama-server reads it: one per line, blank lines and # comments
    skipped. A file with no key (empty, comments only) or one that is not a readable file (Docker creates a
    directory where a bind-mount source is missing) would run llama-server without a key: refuse it."""
    file = Path(path)
    hint = "put one key per line in that file (mount it read-only), or remove llamacpp.api_key_file"
    if file.is_dir():
        raise ConfigError(f"{where}={path}: is a directory, not a key file (a missing bind-mount source?)", hint)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}={path}: cannot read it ({getattr(exc, 'strerror', None) or exc})", hint) from None
    keys = tuple(Secret(k) for k in (line.strip() for line in lines) if k and not k.startswith("#"))
    for number, key in enumerate(keys, 1):
        if not (key.reveal().isascii() and key.reveal().isprintable()):
            raise ConfigError(f"{where}={path}: key {number} has a character outside printable ASCII; "
                              "an HTTP client cannot send it in an Authorization header", hint)
    if not keys:
        raise ConfigError(f"{where}={path}: holds no key (empty or comments only); llama-server would run "
                          "without authentication", hint)
    return keys


def visible_devices(env: Environment, device_ids: Sequence[int] = ()) -> tuple[str | None, str]:
    """(CUDA_VISIBLE_DEVICES the child sees, where it came from). The one place that decides it: the
    override, else the profile's gpu.device_ids, else what this process inherited (None: every GPU)."""
    if env.cuda_visible_devices_override:
        return env.cuda_visible_devices_override, "env:CUDA_VISIBLE_DEVICES_OVERRIDE"
    if device_ids:
        return ",".join(str(i) for i in device_ids), "profile"
    return _blank_is_unset(env.base, "CUDA_VISIBLE_DEVICES"), "inherited"


def _apply(profile: Profile, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Profile:
    """Set `values` (setting path -> value) and validate the whole profile again, so every rule of the
    schema holds for the result. `sources` names where a value came from ("LLAMACPP_X_OVERRIDE='8k'")."""
    data = profile.model_dump()
    for path, value in values.items():
        block, key = path.split(".", 1)
        data[block][key] = value
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        grouped: dict[str, list[str]] = {}
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if not is_branch_tag(p)]
            path = ".".join(loc[:2])
            where = f"{sources[path]}|{path}" if sources and path in sources else ".".join(loc)
            grouped.setdefault(where, []).append(err["msg"].removeprefix("Value error, "))
        problems = []
        for where, msgs in grouped.items():
            source, _, path = where.partition("|")
            suffix = f" (overrides {path})" if path else ""
            problems.append(f"{source}: {' or '.join(join_branches(msgs))}{suffix}")
        raise ConfigErrors(problems, "environment overrides" if sources else "effective settings",
                           hint="fix or blank these variables" if sources else "") from None


def _profile_origins(profile: Profile) -> dict[str, str]:
    origins = {key: "profile" if key in profile.model_fields_set else "default"
               for key in ("display_name", "task_type", "backend", "model_id")}
    for block in (*_OVERRIDE_BLOCKS, "gpu"):
        sub = getattr(profile, block)
        for name in type(sub).model_fields:
            origins[f"{block}.{name}"] = "profile" if name in sub.model_fields_set else "default"
    return origins


def _parse_overrides(env: Environment) -> tuple[dict[str, Any], dict[str, str]]:
    """(setting path -> value as given, setting path -> "VAR='raw'"); validated with the profile."""
    variables = override_variables()
    values = {variables[var]: _coerce(raw) for var, raw in env.overrides.items()}
    sources = {variables[var]: f"{var}={raw!r}" for var, raw in env.overrides.items()}
    return values, sources


def _coerce(raw: str) -> str | bool:
    # Env values are strings; let pydantic's lax mode turn "512" into 512 but keep words as words.
    lowered = raw.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    return raw


def build(
    profile_name: str | None = None,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    env: Environment | None = None,
) -> Settings:
    """Registry + env -> Settings. CLI options win over env, env over the profile. The CLI passes the
    Environment it read once at its root; `environ` is for tests."""
    env = env if env is not None else Environment.from_environ(environ)
    if registry is None:
        registry = load(resolve_path(config_path, env.config_path))
    name = profile_name or env.profile_name
    profile = registry.get(name)
    assert name is not None
    origins = _profile_origins(profile)

    overrides, sources = _parse_overrides(env)
    if env.cache_dir and origins["llamacpp.model_root"] == "default":
        # LLM_CACHE_DIR is the model cache root (the seed's host cache, mounted at /models in the
        # container); a profile that names its own model_root keeps it.
        profile = _apply(profile, {"llamacpp.model_root": str(Path(env.cache_dir) / "gguf")})
        origins["llamacpp.model_root"] = "env:LLM_CACHE_DIR"
    var_for = {path: var for var, path in override_variables().items()}
    if overrides:
        profile = _apply(profile, overrides, sources)
        for path in overrides:
            origins[path] = f"env:{var_for[path]}"

    cuda, cuda_origin = visible_devices(env, profile.gpu.device_ids)
    s = Settings(
        profile_name=name,
        registry_path=registry.path,
        profile=profile,
        origins=origins,
        env=env,
        cuda_visible_devices=cuda,
        cuda_origin=cuda_origin,
    )
    check_stop_budget(s)
    return s


# ---- checks against the container around us (issue 15 item 21) -------------------------------------------

# After the grace runs out: SIGKILL, then up to this long to reap llama-server (wrapper.supervisor.machine).
_REAP_S = 3.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Docker's durations ("30s", "1m30s", "500ms") or bare seconds -> seconds; None when unreadable."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def check_stop_budget(s: Settings) -> None:
    """A stop can take supervise.stop_grace_s for llama-server, a few seconds to reap it after a SIGKILL, and
    as long again to drain NATS. Compose passes its stop_grace_period in (WRAPPER_STOP_GRACE_PERIOD): when
    the sum is longer, Docker SIGKILLs the wrapper mid-stop and the stopped event is lost. Say so at start."""
    raw = _blank_is_unset(s.env.base, "WRAPPER_STOP_GRACE_PERIOD")
    if raw is None:
        return
    allowed = parse_duration(raw)
    if allowed is None:
        raise ConfigError(f"WRAPPER_STOP_GRACE_PERIOD={raw!r}: not a duration", hint="write it as compose does: 30s")
    grace = s.profile.supervise.stop_grace_s
    drain = grace if s.env.nats_url else 0.0
    worst = grace + _REAP_S + drain
    if worst > allowed:
        fits = (allowed - _REAP_S) / (2 if drain else 1)
        raise ConfigError(
            f"supervise.stop_grace_s={grace:g}: a stop can take {worst:g}s (llama-server's grace {grace:g}s + "
            f"{_REAP_S:g}s to reap{f' + NATS drain {drain:g}s' if drain else ''}) but the container allows "
            f"{allowed:g}s (WRAPPER_STOP_GRACE_PERIOD={raw}, compose stop_grace_period)",
            hint=f"lower supervise.stop_grace_s to {max(fits, 0.0):g} or less, or raise LLM_STOP_GRACE_PERIOD",
        )


_CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))
_IMAGE_MARKER = Path("/app/config/llm_profiles.yaml")  # the registry our image bakes in (Dockerfile)


def status_port_warning(env: Environment, container: Sequence[Path] = _CONTAINER_MARKERS,
                        image: Path = _IMAGE_MARKER) -> str | None:
    """The image's HEALTHCHECK probes the status server's /healthz: with the server off (port 0) a container
    would stay unhealthy for ever, and an orchestrator that acts on health would restart it in a loop."""
    if env.status_port != 0 or not image.exists() or not any(m.exists() for m in container):
        return None
    return ("WRAPPER_STATUS_PORT=0: the status server is off, so the image's HEALTHCHECK (/healthz) cannot pass; "
            "the compose files then probe llama-server's /health instead, a plain `docker run` needs "
            "--no-healthcheck or a status port")
