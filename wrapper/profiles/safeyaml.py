"""Read a registry file as YAML with bounds on size, nesting and alias expansion.

PyYAML composes aliases as shared nodes, so a few hundred bytes of nested aliases ("billion laughs")
stay small as nodes but explode for every consumer that walks the tree: issue 15 measured a 413-byte
file at 6 s and 1.1 GB, nine levels past 60 s and 5 GB, then a `MemoryError` traceback. Composition
and construction are also recursive, so 5000 nested `[` ended in a `RecursionError` traceback. Here
the depth is bounded while composing, and the composed graph is measured (each shared node once)
before anything expands it; any breach is one ConfigError with file:line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from wrapper.errors import ConfigError, RegistryNotFound

# A real registry is a few KiB, five levels deep (profiles.NAME.llamacpp.extra_args[i]); these leave
# ample room for comments and anchors while keeping a hostile file's cost to well under a second.
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000  # values after every alias is expanded
MAX_CHARS = 16 * 1024 * 1024  # scalar characters after every alias is expanded


class _LimitError(ComposerError):
    """A bound was passed while composing: reported as such, not as a YAML syntax error."""


class _Loader(yaml.SafeLoader):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitError(None, None, _too_deep(), self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # SafeConstructor lets ValueError out for values it half-recognises (`2001-13-45` as a date,
        # `!!int x`); give them the node's line like every other YAML problem.
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConstructorError(None, None, str(exc), node.start_mark) from None


@dataclass(frozen=True)
class Document:
    root: yaml.Node | None
    data: Any


def read_text(path: Path) -> str:
    """The file's text, refusing a file too large to be a registry before reading all of it."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RegistryNotFound(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES // 1024} KiB; this cannot be a profile registry",
                          hint="point LLM_PROFILES_CONFIG_PATH / --config at llm_profiles.yaml")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def load(text: str, path: Path) -> Document:
    """Compose, measure, then construct `text`; every problem is one ConfigError with file:line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES // 1024} KiB; this cannot be a profile registry")
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return Document(None, None)
        _measure(root, path)
        return Document(root, loader.construct_document(root))
    except _LimitError as exc:
        raise ConfigError(f"{_where(path, exc.problem_mark)}: {exc.problem}", hint=_DEPTH_HINT) from None
    except ConstructorError as exc:
        raise ConfigError(f"{_where(path, exc.problem_mark)}: cannot read this YAML value: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{_where(path, mark)}: YAML syntax error: {problem}") from None
    finally:
        loader.dispose()


_DEPTH_HINT = "a profile registry nests about five levels (profiles.NAME.llamacpp.KEY); check the brackets"
_HINT = "a profile registry is a few plain mappings; write the values out instead of nesting aliases"


def _where(path: Path, mark: yaml.Mark | None) -> str:
    return f"{path}:{mark.line + 1}" if mark is not None else str(path)


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep"


def _measure(root: yaml.Node, path: Path) -> None:
    """Count values and characters as if every alias were expanded, visiting each shared node once.

    Also refuses an alias inside the node it names (`&a [*a]`): PyYAML composes it as a cycle, which
    every later walk would follow for ever.
    """
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, chars, height)
    open_nodes: set[int] = set()

    def fail(node: yaml.Node, problem: str) -> ConfigError:
        return ConfigError(f"{_where(path, node.start_mark)}: {problem}", hint=_HINT)

    def visit(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        if depth > MAX_DEPTH:  # composing bounded the literal depth; this bounds our own recursion
            raise fail(node, _too_deep())
        if id(node) in open_nodes:
            raise fail(node, "an alias refers to a node that contains it (a recursive structure)")
        known = sizes.get(id(node))
        if known is None:
            known = sizes[id(node)] = expand(node, depth)
        return known

    def expand(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        if isinstance(node, yaml.ScalarNode):
            return 1, len(node.value), 1
        children: list[yaml.Node]
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = list(node.value)
        values, chars, height = 1, 0, 0
        open_nodes.add(id(node))
        for child in children:
            v, c, h = visit(child, depth + 1)
            values, chars, height = values + v, chars + c, max(height, h)
            # Reported at the collection that holds the alias, where the fix goes.
            if depth + height > MAX_DEPTH:
                raise fail(node, _too_deep() + " once its aliases are expanded")
            if values > MAX_NODES or chars > MAX_CHARS:
                raise fail(node, f"aliases expand this to more than {MAX_NODES} values or {MAX_CHARS // 2**20} MiB "
                                 "of text (a YAML alias bomb?)")
        open_nodes.discard(id(node))
        return values, chars, height + 1

    visit(root, 1)
