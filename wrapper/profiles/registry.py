"""The YAML registry: find it, parse it with line numbers, validate every profile, report all problems.

PyYAML's `safe_load` silently keeps the last of two duplicate keys and forgets where values came from,
so the file is composed into nodes first: that gives file:line for every setting and catches duplicate
profile names.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import BaseModel, ValidationError

from wrapper.errors import ConfigError, ConfigErrors, ProfileNotFound, RegistryNotFound
from wrapper.profiles import safeyaml
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


def resolve_path(explicit: str | None, env_path: str | None, defaults: Sequence[Path] = DEFAULT_PATHS) -> Path:
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
    for path in defaults:
        if path.is_file():
            return path
    raise RegistryNotFound(
        "llm_profiles.yaml not found: looked in " + ", ".join(str(p) for p in defaults),
        hint="set LLM_PROFILES_CONFIG_PATH or pass --config PATH (in a container, bake config/ into /app/config)",
    )


def load(path: Path) -> Registry:
    return parse(safeyaml.read_text(path), path)


def parse(text: str, path: Path) -> Registry:
    doc = safeyaml.load(text, path)
    if doc.root is None:
        raise ConfigError(f"{path}: the file is empty", hint="it needs a top-level 'profiles:' mapping")

    lines: dict[Loc, int] = {}
    problems: list[str] = []
    _index(doc.root, (), lines, problems, path)
    if problems:
        _raise(problems, path, hint="write each key once, as a string (quote names such as \"1\" or \"true\")")

    data = doc.data
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

    profiles: dict[str, Profile] = {}
    for name, body in raw.items():
        loc_base: Loc = ("profiles", name)
        if not isinstance(body, dict):
            problems.append(_where(path, lines, loc_base) + f"profiles.{name}: must be a mapping")
            continue
        try:
            profiles[name] = Profile.model_validate(body)
        except ValidationError as exc:
            problems.extend(_describe(exc, path, lines, loc_base))
    if problems:
        _raise(problems, path, hint="fix these settings; `wrapper profiles validate` rechecks")
    return Registry(path=path, profiles=profiles, lines=lines)


def _raise(problems: list[str], path: Path, hint: str) -> NoReturn:
    # One problem is one line, as every other user error; several are listed under one heading.
    if len(problems) == 1:
        raise ConfigError(problems[0], hint=hint)
    raise ConfigErrors(problems, str(path), hint=hint)


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base` shares settings between profiles
_KINDS = {"bool": "a boolean", "int": "an integer", "float": "a number", "null": "null", "timestamp": "a date"}


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[str], path: Path) -> None:
    """Record the line of every setting; refuse duplicate and non-string keys.

    YAML reads `true`, `True`, `1`, `0x1` and `1.0` as one value, so as profile names they merged into
    one profile "True" with no duplicate error (issue 15); names and setting keys must be strings.
    """
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            what = "profile names" if loc == ("profiles",) else "keys"
            if not isinstance(key_node, yaml.ScalarNode):
                dotted = ".".join(str(p) for p in loc) or "(top level)"
                problems.append(f"{path}:{line}: {dotted}: {what} must be strings, not a YAML "
                                f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
                continue
            key = str(key_node.value)
            dotted = ".".join(str(p) for p in (*loc, key))
            if key_node.tag not in (_STR_TAG, _MERGE_TAG):
                kind = key_node.tag.rsplit(":", 1)[-1]
                problems.append(f"{path}:{line}: {dotted}: {what} must be strings, but YAML reads {key!r} as "
                                f"{_KINDS.get(kind, kind)}; quote it: \"{key}\"")
                continue
            if key in seen:
                problems.append(f"{path}:{line}: {dotted}: duplicate key (first defined on line {seen[key]})")
            seen[key] = line
            lines[(*loc, key)] = line
            _index(value_node, (*loc, key), lines, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*loc, i), lines, problems, path)


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
