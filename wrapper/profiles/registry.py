"""The YAML registry: find it, parse it with line numbers, validate every profile, report all problems.

PyYAML's `safe_load` silently keeps the last of two duplicate keys and forgets where values came from,
so the file is composed into nodes first: that gives file:line for every setting and catches duplicate
profile names.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from wrapper.errors import ConfigError, ConfigErrors, ProfileNotFound, RegistryNotFound
from wrapper.profiles.schema import Profile

DEFAULT_PATHS = (Path("config/llm_profiles.yaml"), Path("/app/config/llm_profiles.yaml"))

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Registry:
    path: Path
    profiles: Mapping[str, Profile]
    lines: Mapping[Loc, int] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.profiles)

    def get(self, name: str | None) -> Profile:
        if not name:
            raise ConfigError(
                "no profile selected: LLM_PROFILE_NAME is unset and no --profile was given",
                hint=f"available in {self.path}: {', '.join(self.names()) or '(none)'}",
            )
        if name in self.profiles:
            return self.profiles[name]
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.5)
        hint = f"available: {', '.join(self.names()) or '(none)'}"
        if close:
            hint = f"did you mean '{close[0]}'? {hint}"
        raise ProfileNotFound(f"LLM profile '{name}' not found in registry {self.path}", hint=hint)

    def line_of(self, loc: Loc) -> int | None:
        """The line of the deepest known prefix of `loc` (1-based)."""
        for end in range(len(loc), 0, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None


def resolve_path(explicit: str | None, env_path: str | None) -> Path:
    """`--config`, else LLM_PROFILES_CONFIG_PATH, else ./config/..., else /app/config/..."""
    for origin, candidate in (("--config", explicit), ("LLM_PROFILES_CONFIG_PATH", env_path)):
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                raise RegistryNotFound(
                    f"llm_profiles.yaml not found: {origin}={candidate} is not a file",
                    hint="fix the path, or unset it to use ./config/llm_profiles.yaml",
                )
            return path
    for path in DEFAULT_PATHS:
        if path.is_file():
            return path
    raise RegistryNotFound(
        "llm_profiles.yaml not found: looked in " + ", ".join(str(p) for p in DEFAULT_PATHS),
        hint="set LLM_PROFILES_CONFIG_PATH or pass --config PATH (in a container, bake config/ into /app/config)",
    )


def load(path: Path) -> Registry:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryNotFound(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Registry:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if root is None:
        raise ConfigError(f"{path}: the file is empty", hint="it needs a top-level 'profiles:' mapping")

    lines: dict[Loc, int] = {}
    duplicates: list[str] = []
    _index(root, (), lines, duplicates, path)
    if duplicates:
        raise ConfigErrors(duplicates, str(path))

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "profiles" not in data:
        got = "a list" if isinstance(data, list) else f"keys {sorted(data)}" if isinstance(data, dict) else "a scalar"
        raise ConfigError(
            f"{path}: missing the top-level 'profiles:' key (found {got})",
            hint="put every profile under 'profiles:' (see config/llm_profiles.yaml)",
        )
    raw = data["profiles"]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:{lines.get(('profiles',), 1)}: profiles: must be a mapping of name -> profile")

    problems: list[str] = []
    profiles: dict[str, Profile] = {}
    for name, body in raw.items():
        loc_base: Loc = ("profiles", str(name))
        if not isinstance(body, dict):
            problems.append(_where(path, lines, loc_base) + f"profiles.{name}: must be a mapping")
            continue
        try:
            profiles[str(name)] = Profile.model_validate(body)
        except ValidationError as exc:
            problems.extend(_describe(exc, path, lines, loc_base))
    if problems:
        raise ConfigErrors(problems, str(path), hint="fix these settings; `wrapper profiles validate` rechecks")
    return Registry(path=path, profiles=profiles, lines=lines)


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int], dups: list[str], path: Path) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*loc, key))
                dups.append(f"{path}:{line}: {dotted}: duplicate key (first defined on line {seen[key]})")
            seen[key] = line
            lines[(*loc, key)] = line
            _index(value_node, (*loc, key), lines, dups, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*loc, i), lines, dups, path)


def _where(path: Path, lines: Mapping[Loc, int], loc: Loc) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return f"{path}:{lines[loc[:end]]}: "
    return f"{path}: "


def _describe(exc: ValidationError, path: Path, lines: Mapping[Loc, int], base: Loc) -> list[str]:
    out: dict[str, list[str]] = {}  # one line per setting: the branches of a union are joined with "or"
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not is_branch_tag(p))
        full: Loc = (*base, *loc)
        dotted = ".".join(str(p) for p in full[1:])
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _known_fields(Profile, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
            if not close and known:
                msg += f"; valid keys here: {', '.join(known)}"
        elif kind == "missing":
            msg = "required but missing"
        else:
            bad = err.get("input")
            msg = err["msg"].removeprefix("Value error, ")
            if not isinstance(bad, dict | list) and kind != "value_error":
                msg += f" (got {bad!r})"
        out.setdefault(f"{_where(path, lines, full)}{dotted}", []).append(msg)
    return [f"{where}: {' or '.join(join_branches(msgs))}" for where, msgs in out.items()]


def is_branch_tag(part: str | int) -> bool:
    """pydantic names union branches and validators in `loc` ("constrained-int", "literal['a','b']")."""
    return isinstance(part, str) and (part.startswith("function-") or "[" in part or part in _TYPE_TAGS)


_TYPE_TAGS = {"constrained-int", "constrained-float", "constrained-str", "int", "str", "float", "bool",
              "list", "dict", "none", "is-instance"}


def join_branches(msgs: list[str]) -> list[str]:
    """A union's branch errors, readable when joined with "or": 'Input should be A (got -1)', 'Input
    should be B (got -1)' -> 'Input should be A', 'B (got -1)'."""
    if len(msgs) < 2:
        return msgs
    tails = {m[m.rfind(" (got "):] for m in msgs if " (got " in m}
    if len(tails) == 1 and all(" (got " in m for m in msgs):
        tail = tails.pop()
        msgs = [m.removesuffix(tail) for m in msgs[:-1]] + [msgs[-1]]
    return msgs[:1] + [m.removeprefix("Input should be ") for m in msgs[1:]]



def _known_fields(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the sub-model at `loc` (for did-you-mean)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return []
        ann = info.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))
