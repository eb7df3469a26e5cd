"""The one path data takes: Settings -> model file -> flags -> supervised llama-server.

`prepare` is shared by `wrapper flags` and `wrapper serve`, so what `flags` prints is exactly what
`serve` runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from wrapper import acquire, flags
from wrapper.settings import Settings

log = logging.getLogger("wrapper.serve")


@dataclass(frozen=True)
class Prepared:
    settings: Settings
    model_file: Path
    capabilities: flags.Capabilities
    command: flags.Command
    decisions: list[str] = field(default_factory=list)  # derived defaults and downgrades, in words


def apply_layers(s: Settings, auto_tune: bool = False) -> Settings:
    """Tuning and placement layers on top of profile + env (env overrides always win)."""
    return s


def prepare(s: Settings, *, auto_tune: bool = False, fetch: bool = False) -> Prepared:
    """Resolve everything `serve` needs. With fetch=False the model is located but never downloaded."""
    s = apply_layers(s, auto_tune=auto_tune)
    model_file = acquire.ensure(s).path if fetch else acquire.expected_path(s)
    binary = flags.find_binary(s.env.llama_server_bin)
    caps = flags.detect(binary, s.env.state_path() / "cache")
    command = flags.derive(s, caps, model_file)
    return Prepared(settings=s, model_file=model_file, capabilities=caps, command=command)
