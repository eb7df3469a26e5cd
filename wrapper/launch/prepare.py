"""The one path data takes: Settings -> model file -> tuning and placement layers -> one frozen `Launch`.

`prepare` is shared by `wrapper flags`, `wrapper profiles show`, `wrapper serve` and `bench-profile`, so
what `flags` prints is exactly what `serve` runs and what a sweep measures. The host is measured here,
once per start, and handed on inside the launch: the tuning key, the plan, the self-check, receipts and
events all see the same fingerprint and the same visible GPUs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapper.errors import ConfigError
from wrapper.launch import flags, rollback
from wrapper.model import acquire
from wrapper.plan import hardware
from wrapper.plan.hardware import Hardware
from wrapper.settings import Secret, Settings

if TYPE_CHECKING:
    from wrapper.tuning.store import BestConfig, TuningKey

log = logging.getLogger("wrapper.serve")


@dataclass(frozen=True)
class Expectation:
    """The throughput the self-check is judged against, and where that figure came from."""

    tok_s: float
    source: str
    # Below this the tuned server is clearly slower than recorded: the lower of the cell's own 95% bound and
    # tok_s x selfcheck.degraded_ratio, so neither a tight sweep CI nor a loose one makes a noisy start roll back.
    low: float | None = None
    prompt_words: int | None = None  # the tuned cell's corpus bucket, repeated exactly by the self-check


@dataclass(frozen=True)
class Companion:
    """A second file the launch needs, as fetched: `setting` is llamacpp.mmproj or llamacpp.draft."""

    setting: str
    file: acquire.ModelFile


def fetch_companions(s: Settings) -> tuple[Companion, ...]:
    """Download and verify the projector and draft model through the model's own path (acquire.ensure), so
    a flipped byte in a projector is refused exactly like one in the model."""
    out = []
    for setting, source in (("llamacpp.mmproj", s.server.mmproj), ("llamacpp.draft", s.server.draft)):
        if source is not None:
            found = acquire.ensure(acquire.companion(s, source))
            log.info("%s: %s (%s, sha256 %s)", setting, found.path, found.source, found.sha256)
            out.append(Companion(setting, found))
    return tuple(out)


@dataclass(frozen=True)
class Launch:
    """Everything about one llama-server launch; the only input of the supervisor, the self-check, the status
    server, receipts and events."""

    settings: Settings  # effective: profile + tuning + plan + env overrides
    model_file: Path
    capabilities: flags.Capabilities
    command: flags.Command
    measured_host: Hardware | None = field(default=None, repr=False)  # see `host`
    decisions: tuple[str, ...] = ()  # derived defaults and downgrades, in words
    model: acquire.ModelFile | None = None  # set when fetched: hash, shards and where it came from
    tuned: BestConfig | None = None  # the bench-profile result applied by auto-tune
    api_keys: tuple[Secret, ...] = ()  # llama-server's keys (from llamacpp.api_key_file)
    expected: Expectation | None = None  # a tuned start: the sweep's figure for the self-check's load
    companions: tuple[Companion, ...] = ()  # fetched projector / draft model, verified like the model

    _host_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def host(self) -> Hardware:
        """This machine, GPUs as the child sees them, measured at most once per launch. A plain start needs it
        only after llama-server is running (self-check key, receipts, events), so it is not measured before
        the exec unless tuning or placement asked for it in prepare()."""
        with self._host_lock:
            if self.measured_host is None:
                object.__setattr__(self, "measured_host", hardware.for_settings(self.settings))
            assert self.measured_host is not None
            return self.measured_host

    @property
    def url(self) -> str:
        """How this machine reaches llama-server."""
        return self.settings.local_url

    @property
    def api_key(self) -> str | None:
        """One key for our own requests (probes, self-check): llama-server accepts any of them."""
        return self.api_keys[0].reveal() if self.api_keys else None

    @property
    def sha256(self) -> str | None:
        return (self.model.sha256 if self.model is not None else None) or self.settings.server.sha256

    def child_env(self) -> dict[str, str]:
        """The child's whole environment: ours minus secrets, plus what the command sets."""
        return flags.full_env(self.command, self.settings.env.child_env())


def apply_layers(
    s: Settings,
    host: Callable[[], Hardware],
    *,
    auto_tune: bool | None = None,
    model_file: Path | None = None,
    caps: flags.Capabilities | None = None,
    model: acquire.ModelFile | None = None,
    tuned_run: str | None = None,
) -> tuple[Settings, list[str], BestConfig | None]:
    """Tuning, then placement, on top of profile + env. Env overrides always win over both.
    auto_tune: True forces the tuning layer, False leaves it out, None follows the profile's tuning.auto.
    tuned_run: apply exactly this stored run (whatever auto_tune says) instead of the newest one."""
    decisions: list[str] = []
    tuned = None
    wanted = tuned_run is not None or auto_tune or (auto_tune is None and s.profile.tuning.auto)
    if wanted and model_file is not None and caps is not None:
        s, notes, tuned = _tuning(s, host, model_file, caps, model, tuned_run=tuned_run)
        decisions += notes
    if s.server.n_gpu_layers == "auto":
        s, notes = _placement(s, host, model_file, caps)
        decisions += notes
    return s, decisions, tuned


def _tuning(
    s: Settings, host: Callable[[], Hardware], model_file: Path, caps: flags.Capabilities,
    model: acquire.ModelFile | None, *, tuned_run: str | None = None,
) -> tuple[Settings, list[str], BestConfig | None]:
    from wrapper.tuning import apply as tuning

    if not model_file.is_file():
        return s, ["auto-tune: model not on disk yet; `serve` applies the tuned config after fetching it"], None
    key = tuning.key_for(s, model_file, model.sha256 if model else None, host().fingerprint, version=caps.version,
                         binary=caps.path)
    if tuned_run is not None:
        return _stored_run(s, key, tuned_run)
    values, origin, notes = tuning.tuning_layer(s, key.model_id, key.hardware_fp, key.build)
    if not origin:
        return s, notes, None
    tuned = tuning.best_applied(s, key)
    if tuned is not None and (why := rollback.rolled_back(s.env.state_path(), tuned.run_id)):
        note = (f"auto-tune: not applied: {tuned.run_id} was rolled back on this node ({why}); re-run "
                "`wrapper bench-profile` here")
        # A restart serves what the rollback fell back to, not a config one step further down.
        previous = rollback.fallback_for(s.env.state_path(), tuned).best
        if previous is None:
            return s, [note], None
        s, notes, tuned = _apply_stored(s, previous)
        return s, [note, *notes], tuned
    if origin.startswith(tuning.FLEET_PREFIX) and (tuned is None or tuning.selfcheck_load(tuned) is None):
        # A shared config is applied only after it passes this node's self-check; without its load there is
        # nothing to check it against.
        return s, [*notes, f"auto-tune: not applied: {origin} came without the load it was measured at, so this "
                   "node cannot check it"], None
    return _with_tuned(s, values, origin, notes, tuned)


def _stored_run(s: Settings, key: TuningKey, run_id: str) -> tuple[Settings, list[str], BestConfig | None]:
    """The tuning layer of one named stored run (a rollback's previous config), or none with a note."""
    tuned = rollback.stored_run(s.env.state_path(), key, run_id)
    if tuned is None or (why := rollback.rolled_back(s.env.state_path(), run_id)):
        gone = "is not in the tuning store for this key" if tuned is None else f"was rolled back on this node ({why})"
        return s, [f"auto-tune: not applied: {run_id} {gone}"], None
    return _apply_stored(s, tuned)


def _apply_stored(s: Settings, tuned: BestConfig) -> tuple[Settings, list[str], BestConfig | None]:
    """The tuning layer of a stored run already checked (in the store, not rolled back)."""
    from wrapper.tuning import apply as tuning

    run_id = tuned.run_id
    shown = ", ".join(f"{k}={v}" for k, v in tuned.values.items())
    note = (f"auto-tune: applied {run_id} ({tuned.throughput_tps:.1f} tok/s), the last tuned config that passed "
            f"its self-check on this node: {shown}")
    return _with_tuned(s, dict(tuned.values), tuning.origin_of(tuned), [note], tuned)


def _with_tuned(s: Settings, values: dict[str, Any], origin: str, notes: list[str],
                tuned: BestConfig | None) -> tuple[Settings, list[str], BestConfig | None]:
    from wrapper.tuning import apply as tuning

    layer = dict(values)
    load = tuning.selfcheck_load(tuned) if tuned is not None else None
    if load:
        # The self-check repeats the tuned cell's load, so the sweep's throughput is its expected figure.
        layer.update({k: v for k, v in load.items() if s.origin(k) in ("default", "profile")})
    s, skipped = s.with_layer(layer, origin)
    notes += [f"auto-tune: {path} kept from {s.origin(path)} (env overrides win)" for path in skipped]
    return s, notes, tuned


def _placement(
    s: Settings, host: Callable[[], Hardware], model_file: Path | None, caps: flags.Capabilities | None
) -> tuple[Settings, list[str]]:
    from wrapper.plan import placement

    if model_file is None or not model_file.is_file():
        return s, ["placement: model not on disk yet; `serve` plans -ngl once it is fetched (`wrapper plan` "
                   "reads the header from the Hub now)"]
    fit = caps is not None and caps.spelling("fit") is not None
    values, decisions = placement.layer_for(s, model_file, host(), fit_supported=fit)
    if values:
        s, skipped = s.with_layer(values, "plan")
        decisions += [f"placement: {path} kept from {s.origin(path)} (env overrides win)" for path in skipped]
    return s, decisions


def prepare(s: Settings, *, auto_tune: bool | None = None, fetch: bool = False,
            host: Hardware | None = None, tuned_run: str | None = None) -> Launch:
    """Resolve everything a launch needs. With fetch=False the model is located but never downloaded.
    auto_tune as in apply_layers (bench-profile passes False: it measures the profile, not an earlier winner).
    `host` is passed by callers that already measured it. tuned_run: apply exactly that stored run (a
    rollback to the last tuned config that passed its self-check here), not the newest."""
    measured: list[Hardware] = [host] if host is not None else []

    def host_once() -> Hardware:  # only tuning and placement need the host before the launch
        if not measured:
            measured.append(hardware.for_settings(s))
        return measured[0]

    api_keys = s.api_keys()  # before any download: a key file that would leave the server open fails fast
    model = acquire.ensure(s) if fetch else None
    companions = fetch_companions(s) if fetch else ()
    model_file = model.path if model else acquire.expected_path(s)
    binary = flags.find_binary(s.env.llama_server_bin)
    caps = flags.detect(binary, s.env.state_path() / "cache")
    s, decisions, tuned = apply_layers(s, host_once, auto_tune=auto_tune, model_file=model_file, caps=caps, model=model,
                                       tuned_run=tuned_run)
    check_ctx_size(s, model_file)
    for decision in decisions:
        log.info("%s", decision)
    command = flags.derive(s, caps, model_file)
    return Launch(settings=s, model_file=model_file, capabilities=caps, command=command,
                  measured_host=measured[0] if measured else None,
                  decisions=tuple(decisions), model=model, tuned=tuned, api_keys=api_keys,
                  expected=_expectation(s, tuned), companions=companions)


# How far past the context a model was trained on llamacpp.ctx_size may go (RoPE scaling stretches 2-4x in
# practice). ctx_size: 2e9 made llama-server take ~24 GB until the OOM killer fired (issue 15 item 14).
CTX_TRAIN_FACTOR = 4
# No model trained on fewer tokens than this is worth serving, so a ctx up to CTX_TRAIN_FACTOR times it
# passes without reading the GGUF header: the common start pays nothing for the check.
_CTX_TRAIN_FLOOR = 4096


def check_ctx_size(s: Settings, model_file: Path) -> None:
    """Refuse a ctx_size above CTX_TRAIN_FACTOR x the model's n_ctx_train (skipped when it is unknown)."""
    ctx = s.server.ctx_size
    if not ctx or ctx <= CTX_TRAIN_FACTOR * _CTX_TRAIN_FLOOR or not model_file.is_file():
        return
    from wrapper.model import gguf_meta

    trained = gguf_meta.read_local(model_file).n_ctx_train
    if trained and ctx > CTX_TRAIN_FACTOR * trained:
        limit = CTX_TRAIN_FACTOR * trained
        raise ConfigError(
            f"llamacpp.ctx_size={ctx} ({s.origin('llamacpp.ctx_size')}) is more than {CTX_TRAIN_FACTOR} x the "
            f"model's n_ctx_train={trained} ({model_file.name}): llama-server would reserve memory for a context "
            "the model cannot use",
            hint=f"set llamacpp.ctx_size to {limit} or less (or leave it unset to use n_ctx_train)",
        )


def _expectation(s: Settings, tuned: BestConfig | None) -> Expectation | None:
    if tuned is None:
        return None
    from wrapper.tuning import apply as tuning

    found = tuning.selfcheck_expectation(s, tuned)
    if not found:
        return None
    tok_s, source = found
    low = tok_s * s.profile.selfcheck.degraded_ratio
    cell_low = _cell_ci_low(s, tuned)
    if cell_low is not None and cell_low > 0:
        low = min(low, cell_low)
    return Expectation(tok_s, source, low, tuned.load.prompt_words if tuned.load else None)


def _cell_ci_low(s: Settings, tuned: BestConfig) -> float | None:
    """The winning cell's lower 95% bound as bench-profile stored it (None for a fleet entry: no cells)."""
    from wrapper.tuning.store import Store, default_path

    path = default_path(s.env.state_path())
    with Store(path) as store:
        cells = [c for c in store.cells(tuned.run_id) if c.cell_key == tuned.cell_key]
    return cells[-1].ci[0] if cells else None


_TEMPLATE_FLAGS = ("--chat-template", "--chat-template-file")


def chat_template_warning(launch: Launch) -> str | None:
    """The one-line warning for a chat profile whose GGUF carries no chat template and whose profile names
    none: llama-server then formats every chat in ChatML (<|im_start|> turns), whatever the model was
    trained on, and answers in the wrong turn markers without an error anywhere."""
    s = launch.settings
    if s.profile.task_type != "chat":
        return None
    if any(arg.split("=", 1)[0] in _TEMPLATE_FLAGS for arg in s.server.extra_args):
        return None
    from wrapper.model import gguf_meta

    try:
        meta = gguf_meta.read_local(launch.model_file)
    except Exception:
        return None  # a header we cannot read was already refused at verification; nothing to add here
    if meta.chat_template:
        return None
    return (f"{launch.model_file.name} has no tokenizer.chat_template: llama-server will format chats with its "
            "ChatML fallback (<|im_start|>/<|im_end|> turns), which may not be this model's format; name one in "
            "llamacpp.extra_args (--chat-template NAME or --chat-template-file PATH), or use task_type: completion")
