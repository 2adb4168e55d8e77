"""The arrows docs/architecture.md forbids, checked on the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "livekit_resume"
PACKAGE = "livekit_resume"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), top level or not."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _importers(src_prefix: str, target_prefix: str) -> list[str]:
    return sorted(
        f"{mod} -> {imp}"
        for mod, imports in MODULES.items()
        if mod.startswith(src_prefix)
        for imp in imports
        if imp == target_prefix or imp.startswith(target_prefix + ".")
    )


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("livekit_resume.snapshot", "livekit_resume.stores"),
        ("livekit_resume.snapshot", "livekit_resume.agent_hooks"),
        ("livekit_resume.snapshot", "livekit_resume.bridge"),
        ("livekit_resume.stores", "livekit_resume.snapshot"),
        ("livekit_resume.stores", "livekit_resume.agent_hooks"),
        ("livekit_resume.stores", "livekit_resume.bridge"),
        ("livekit_resume.stores", "livekit.agents"),
        ("livekit_resume.bridge", "livekit.agents"),
        ("livekit_resume.bridge", "livekit_resume.agent_hooks"),
        ("livekit_resume.agent_hooks", "livekit_resume.cli"),
        ("livekit_resume.cli.render", "livekit_resume.cli.app"),
        ("livekit_resume.cli.demo", "livekit_resume.cli.app"),
    ],
)
def test_a_forbidden_arrow_does_not_exist(source: str, target: str) -> None:
    assert _importers(source, target) == []


CORE = ("snapshot", "stores", "bridge", "agent_hooks", "errors", "remote")


@pytest.mark.parametrize("target", ["livekit_resume.testing", "tests", "pickle"])
def test_the_core_never_imports_test_kits_or_pickle(target: str) -> None:
    """The demo runs on the shipped scripted LLM; the core that runs in a worker never does."""
    core = {m: i for m, i in MODULES.items() if m.split(".")[1:2] and m.split(".")[1] in CORE}
    assert len(core) > 10
    assert [
        f"{mod} -> {imp}"
        for mod, imports in core.items()
        for imp in imports
        if imp == target or imp.startswith(target + ".")
    ] == []


def test_the_checker_sees_imports() -> None:
    """A checker that found no imports would pass every arrow above."""
    assert "livekit_resume.bridge" in MODULES["livekit_resume.agent_hooks.capture"]
    assert any(i.startswith("livekit_resume.stores") for i in MODULES["livekit_resume.bridge"])


def _top_level_edges(path: Path) -> set[str]:
    """Modules of ours that ``path`` imports when it is imported (not in functions, not
    under TYPE_CHECKING), resolved to modules rather than packages where possible."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: set[str] = set()
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                for a in node.names
            ]
        else:
            continue
        edges.update(t for t in targets if t in MODULES and t != PACKAGE)
    return edges


def test_no_import_cycle() -> None:
    graph = {_module_name(p): _top_level_edges(p) for p in SRC.rglob("*.py")}
    assert graph["livekit_resume.agent_hooks.session"], "the checker found no edges"
    done: set[str] = set()

    def visit(mod: str, stack: list[str]) -> None:
        if mod in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(mod) :], mod]))
        if mod in done:
            return
        for dep in sorted(graph.get(mod, ())):
            visit(dep, [*stack, mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])
