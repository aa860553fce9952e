"""The house rules, read from the code's imports (AST, nothing is run): one dependency direction between the
packages, no import circle, no module over ~400 lines. docs/architecture.md draws the same layers."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

# The layers of comat_lightning, lowest first: a module imports from its own package or from lower layers only.
LAYERS = [
    {"errors", "legacy"},
    {"command_errors", "command_help"},  # the short error reports and the overview of train.py
    {"tiny"},
    {"files"},
    {"text", "runtime", "models"},
    {"attention"},
    {"judges"},
    {"evaluation"},  # benchmarks' scoring rules over the judges' outputs
    {"sampling"},
    {"training"},
    {"tools", "cli"},  # the composition roots: they may also import callbacks/ and datamodules/
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
COMPOSITION_ROOTS = LAYERS[-1]
TOP = ("comat_lightning", "callbacks", "datamodules")
MAX_LINES = 420  # "about 400"


def _sources():
    for top in TOP:
        yield from sorted((REPO / top).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in TOP}


def _package(module: str) -> str:
    """'comat_lightning.sampling.rollout' -> 'sampling'; 'comat_lightning.cli' -> 'cli'; callbacks.x -> 'callbacks'."""
    parts = module.split(".")
    if parts[0] != "comat_lightning":
        return parts[0]
    return parts[1] if len(parts) > 1 else "comat_lightning"


def test_one_dependency_direction():
    violations = []
    for path in _sources():
        importer = _module_name(path)
        source = _package(importer)
        for imported in _imports(path):
            target = _package(imported)
            if target == "comat_lightning" or source == "comat_lightning" or target == source:
                continue  # the package's face (short names) and imports inside one package
            if source in ("callbacks", "datamodules"):
                if target in ("callbacks", "datamodules") and target != source and source != "callbacks":
                    violations.append(f"{importer} -> {imported}: datamodules/ never import callbacks/")
                continue
            if target in ("callbacks", "datamodules"):
                if source not in COMPOSITION_ROOTS:
                    violations.append(f"{importer} -> {imported}: the core imports callbacks/ and datamodules/ only in {sorted(COMPOSITION_ROOTS)}")
                continue
            if RANK[target] >= RANK[source] and not (source in COMPOSITION_ROOTS and target in COMPOSITION_ROOTS):
                violations.append(f"{importer} -> {imported}: layer {source} ({RANK[source]}) may not import layer {target} ({RANK[target]})")
    assert not violations, "\n".join(violations)


def test_no_import_circle():
    graph = defaultdict(set)
    modules = {_module_name(path): path for path in _sources()}
    for name, path in modules.items():
        for imported in _imports(path):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target in modules and target != name:
                graph[name].add(target)
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(modules):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def test_every_package_says_what_lives_there_and_no_module_is_too_long():
    for package in (REPO / "comat_lightning").iterdir():
        if package.is_dir() and (package / "__init__.py").exists():
            doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
            assert doc and len(doc.splitlines()) == 1, f"{package.name}/__init__.py: a one-line docstring"
            assert package.name in RANK, f"comat_lightning/{package.name}: give the new package a layer in LAYERS"
    long = [f"{path.relative_to(REPO)}: {n} lines" for path in _sources() if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, long
