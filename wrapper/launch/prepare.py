"""The one path data takes: Settings -> model file -> tuning and placement layers -> flags.

`prepare` is shared by `wrapper flags`, `wrapper profiles show` and `wrapper serve`, so what `flags`
prints is exactly what `serve` runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wrapper.launch import flags
from wrapper.model import acquire
from wrapper.settings import Settings

if TYPE_CHECKING:
    from wrapper.tuning.store import BestConfig

log = logging.getLogger("wrapper.serve")


@dataclass(frozen=True)
class Prepared:
    settings: Settings
    model_file: Path
    capabilities: flags.Capabilities
    command: flags.Command
    decisions: list[str] = field(default_factory=list)  # derived defaults and downgrades, in words
    model: acquire.ModelFile | None = None  # set when fetched: hash, shards and where it came from
    tuned: BestConfig | None = None  # the bench-profile result applied by auto-tune


def apply_layers(
    s: Settings,
    *,
    auto_tune: bool = False,
    model_file: Path | None = None,
    caps: flags.Capabilities | None = None,
    model: acquire.ModelFile | None = None,
) -> tuple[Settings, list[str], BestConfig | None]:
    """Tuning, then placement, on top of profile + env. Env overrides always win over both."""
    decisions: list[str] = []
    tuned = None
    if (auto_tune or s.profile.tuning.auto) and model_file is not None and caps is not None:
        s, notes, tuned = _tuning(s, model_file, caps, model)
        decisions += notes
    if s.server.n_gpu_layers == "auto":
        s, notes = _placement(s, model_file, caps)
        decisions += notes
    return s, decisions, tuned


def _tuning(
    s: Settings, model_file: Path, caps: flags.Capabilities, model: acquire.ModelFile | None
) -> tuple[Settings, list[str], BestConfig | None]:
    from wrapper.tuning import apply as tuning

    if not model_file.is_file():
        return s, ["auto-tune: model not on disk yet; `serve` applies the tuned config after fetching it"], None
    key = tuning.key_for(s, model_file, model.sha256 if model else None, caps)
    values, origin, notes = tuning.tuning_layer(s, key.model_id, key.hardware_fp, key.build)
    if not origin:
        return s, notes, None
    tuned = tuning.best_applied(s, key)
    layer = dict(values)
    load = tuning.selfcheck_load(tuned) if tuned is not None else None
    if load:
        # The self-check repeats the tuned cell's load, so the sweep's throughput is its expected figure.
        layer.update({k: v for k, v in load.items() if s.origin(k) in ("default", "profile")})
    s, skipped = s.with_layer(layer, origin)
    notes += [f"auto-tune: {path} kept from {s.origin(path)} (env overrides win)" for path in skipped]
    return s, notes, tuned


def _placement(s: Settings, model_file: Path | None, caps: flags.Capabilities | None) -> tuple[Settings, list[str]]:
    from wrapper.plan import hardware, placement

    if model_file is None or not model_file.is_file():
        return s, ["placement: model not on disk yet; `serve` plans -ngl once it is fetched (`wrapper plan` "
                   "reads the header from the Hub now)"]
    hw = hardware.detect(s.cuda_visible_devices or s.env.base.get("CUDA_VISIBLE_DEVICES"))
    fit = caps is not None and caps.spelling("fit") is not None
    values, decisions = placement.layer_for(s, model_file, hw, fit_supported=fit)
    if values:
        s, skipped = s.with_layer(values, "plan")
        decisions += [f"placement: {path} kept from {s.origin(path)} (env overrides win)" for path in skipped]
    return s, decisions


def prepare(s: Settings, *, auto_tune: bool = False, fetch: bool = False) -> Prepared:
    """Resolve everything `serve` needs. With fetch=False the model is located but never downloaded."""
    model = acquire.ensure(s) if fetch else None
    model_file = model.path if model else acquire.expected_path(s)
    binary = flags.find_binary(s.env.llama_server_bin)
    caps = flags.detect(binary, s.env.state_path() / "cache")
    s, decisions, tuned = apply_layers(s, auto_tune=auto_tune, model_file=model_file, caps=caps, model=model)
    for decision in decisions:
        log.info("%s", decision)
    command = flags.derive(s, caps, model_file)
    return Prepared(settings=s, model_file=model_file, capabilities=caps, command=command, decisions=decisions,
                    model=model, tuned=tuned)
