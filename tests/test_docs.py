"""The docs name code that exists: README's "Where the algorithm lives" table, the dotted names of the design docs,
and the fallback reasons of docs/interfaces.md. Read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

from editr2 import intent

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("editr2", "diffusers_editr2", "trl_editr2", "comfyui_nodes", "recipes")
DOCS = ("README.md", "docs/architecture.md", "docs/interfaces.md", "docs/training.md")


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _names(path: Path) -> frozenset[str]:
    """Top-level names of a module (functions, classes, assignments, imports) and `Class.member` for every member of
    its classes (methods, class attributes, attributes assigned on `self`)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        if isinstance(node, ast.ClassDef):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub in node.body:
                    names.add(f"{node.name}.{sub.name}")
                elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                    names.add(f"{node.name}.{sub.target.id}")
                elif (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                      and isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                    names.add(f"{node.name}.{sub.attr}")
    return frozenset(names)


def _resolves(dotted: str) -> bool:
    """`package.module.name` (or `package.module.Class.member`, or a module) is defined in the source."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        path = _module_path(".".join(parts[:k]))
        if path is not None:
            rest = ".".join(parts[k:])
            return not rest or rest in _names(path)
    return False


def _algorithm_table() -> list[tuple[str, list[str], list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Where the algorithm lives", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in section.splitlines()[2:]:
        piece, files, functions = (cell.strip() for cell in line.strip("|").split("|"))
        names = [n for n in re.findall(r"`([A-Za-z_][\w.]*)`", functions) if not n.endswith("_")]
        rows.append((piece, re.findall(r"`([\w/]+\.py)`", files), names))
    return rows


def test_algorithm_table_lists_every_piece():
    pieces = " ".join(piece for piece, _, _ in _algorithm_table())
    for piece in ("SDE step", "joint clipped loss", "session-group advantages", "trajectory filter", "IC-CoT prompt",
                  "IC-CoT parsing", "intent reconstruction", "call defaults", "flow-matching training loss"):
        assert piece in pieces, f"README's algorithm table has no row for {piece!r}"


@pytest.mark.parametrize("piece,files,functions", _algorithm_table(), ids=lambda x: x if isinstance(x, str) else None)
def test_algorithm_table_names_exist(piece, files, functions):
    assert files and functions, f"row {piece!r} names no file or no function"
    defined = set()
    for file in files:
        assert (ROOT / file).is_file(), f"row {piece!r}: {file} does not exist"
        defined |= _names(ROOT / file)
    missing = [name for name in functions if name not in defined]
    assert not missing, f"row {piece!r}: {missing} not defined in {files}"


@pytest.mark.parametrize("doc", DOCS)
def test_dotted_names_in_docs_exist(doc):
    text = (ROOT / doc).read_text()
    dotted = set(re.findall(r"\b(?:%s)(?:\.[A-Za-z_]\w*)+" % "|".join(PACKAGES), text))
    missing = sorted(name for name in dotted if not name.endswith(".py") and not _resolves(name))
    assert not missing, f"{doc} names {missing}, which the code does not define"


@lru_cache(maxsize=None)
def _class_members() -> dict[str, set[str]]:
    """`{class name: its members}` over every module of the packages."""
    members: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _names(path):
                if "." in name:
                    cls, member = name.split(".", 1)
                    members.setdefault(cls, set()).add(member)
    return members


@pytest.mark.parametrize("doc", DOCS)
def test_class_members_in_docs_exist(doc):
    text = (ROOT / doc).read_text()
    members = _class_members()
    named = set(re.findall(r"\b(EditR2\w+|Session|Turn|Intent|TurnConditioning|TurnRollout|SessionRollout)\.(_?[a-z]\w*)", text))
    missing = sorted(f"{cls}.{member}" for cls, member in named if cls in members and member not in members[cls])
    assert not missing, f"{doc} names {missing}, which the classes do not define"


def test_interfaces_give_the_real_fallback_reasons():
    text = (ROOT / "docs/interfaces.md").read_text()
    constants = {name: getattr(intent, name) for name in dir(intent) if name.startswith("FALLBACK_")}
    assert len(constants) >= 4
    for name, value in constants.items():
        assert f'{name} = "{value}"' in text, f"docs/interfaces.md should list {name} = {value!r}"
