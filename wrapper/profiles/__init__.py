"""Profile schema and the YAML registry."""

from wrapper.profiles.registry import Registry, load, parse, resolve_path
from wrapper.profiles.schema import LlamaCppSpec, Profile, SelfCheckSpec, SuperviseSpec, TuningSpec

__all__ = [
    "LlamaCppSpec",
    "Profile",
    "Registry",
    "SelfCheckSpec",
    "SuperviseSpec",
    "TuningSpec",
    "load",
    "parse",
    "resolve_path",
]
