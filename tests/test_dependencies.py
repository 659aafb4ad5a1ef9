"""The import direction of the packages, read from the source with `ast` (nothing is imported).

The core (`editr2`) imports no integration; the integrations import the core, themselves, and the integrations named in
`ALLOWED`; no two modules import each other, directly or through others (module-level imports). Function-level imports
count for the direction too (they run as soon as the function does). The one exception: `editr2/cli.py`, the command
line, dispatches to the diffusers integration (lazily, inside functions, so `editr2 --help` stays fast).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("editr2", "diffusers_editr2", "trl_editr2", "comfyui_nodes")

# package -> the packages its modules may import (besides the standard library and third-party libraries)
ALLOWED = {
    "editr2": {"editr2"},
    "diffusers_editr2": {"editr2", "diffusers_editr2"},
    "trl_editr2": {"editr2", "trl_editr2", "diffusers_editr2"},
    "comfyui_nodes": {"editr2", "comfyui_nodes", "diffusers_editr2"},
}
# module -> the other packages it may import, only inside functions
LAZY_EXCEPTIONS = {"editr2.cli": {"diffusers_editr2"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules `node` (in `module`) imports; `from a import b` names `a.b` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if not MODULES[module].name == "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def imports(module: str) -> list[tuple[str, bool]]:
    """`(imported project module, at module level?)` for every import in `module`'s source."""
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, top) for name in resolve(module, child)
                             if name.split(".")[0] in PACKAGES)
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), True)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_the_modules_are_found():
    assert {"editr2.cli", "editr2.bench.runner", "diffusers_editr2.bench", "trl_editr2.rollout",
            "comfyui_nodes.nodes"} <= set(MODULES)
    assert ("editr2.intent", True) in GRAPH["diffusers_editr2.pipeline_editr2"]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_allowed_directions(package):
    wrong = []
    for module, edges in GRAPH.items():
        if module.split(".")[0] != package:
            continue
        for target, top in edges:
            other = target.split(".")[0]
            lazy_ok = not top and other in LAZY_EXCEPTIONS.get(module, ())
            if other not in ALLOWED[package] and not lazy_ok:
                wrong.append(f"{module} -> {target}" + ("" if top else " (in a function)"))
    assert wrong == [], f"{package} may import only {sorted(ALLOWED[package])}"


def test_no_import_cycles():
    graph = {module: sorted({t for t, top in edges if top and t in MODULES and t != module})
             for module, edges in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path
                              else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


# Names that must be defined (at module level) by one module only: one owner per concept.
ONE_OWNER = ("REASONING_MODES", "CALL_DEFAULTS_FILE", "PipelineEditor", "Editor", "IdentityEditor", "run_bench",
             "write_report", "plot_per_turn", "split_rule", "score_session", "load_call_defaults", "TurnScore",
             "METRICS", "append_result")
# The RL trainer's own subset of the reasoning modes (it trains "intent" and "none" only).
OWNER_EXCEPTIONS = {"REASONING_MODES": {"trl_editr2.config"}}


@pytest.mark.slow
def test_each_concept_has_one_owner():
    owners: dict[str, list[str]] = {name: [] for name in ONE_OWNER}
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if name in owners and module not in OWNER_EXCEPTIONS.get(name, ()):
                    owners[name].append(module)
    assert {name: found for name, found in owners.items() if len(found) > 1} == {}
