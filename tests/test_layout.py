"""The layout contract of docs/architecture.md, checked on the source: packages follow the pipeline and
imports point one way; the environment has one reader."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "wrapper"
# Highest first: a module may import from its own package or from any package below it.
ORDER = ["cli", "bench", "serve", "supervisor", "launch", "measure", "tuning", "plan", "model", "events",
         "settings", "profiles", "errors", "logs"]
RANK = {name: i for i, name in enumerate(ORDER)}
# settings, profiles, errors and logs form the base; settings reads profiles and errors, logs reads settings.
BASE = {"settings", "profiles", "errors", "logs"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts): p for p in PKG.rglob("*.py")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported wrapper module, only under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wrapper"):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "wrapper" else [node.module]
            out += [(n, id(node) in typing_only) for n in names]
    return out


def test_imports_point_down_the_pipeline() -> None:
    upward = []
    for module, path in _modules().items():
        mine = _part(module)
        if mine is None:
            continue
        for target, _ in _imports(path):
            theirs = _part(target)
            if theirs is None or theirs == mine or (mine in BASE and theirs in BASE):
                continue
            if RANK[theirs] < RANK[mine]:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = {m: {t for t, typing in _imports(p) if not typing and t in modules} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    # wrapper.supervisor's __init__ re-exports its own modules: a package importing its children is no cycle.
    real = [c for c in cycles if not all(x.startswith(c[0].rsplit(".", 1)[0]) for x in c)]
    assert real == []


def test_top_level_stays_small() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 12, top


def test_only_settings_reads_the_environment() -> None:
    readers = []
    for module, path in _modules().items():
        text = path.read_text()
        # wrapper.warm reads it whole (a fingerprint, the early child's environment), never one setting.
        if ("os.environ" in text or "os.getenv" in text) and module not in ("wrapper.settings", "wrapper.warm"):
            readers.append(module)
    assert readers == []
