"""The import rules docs/design.md states, read from the source with ast (nothing is imported).

Every project import, at module level or inside a function, goes to the importer's own package or
to a lower layer; module-level imports form no circle; model/ stays below the training and
evaluation code.
"""

from __future__ import annotations

import ast
import functools
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PROJECT = (*SETUP["packages"], *SETUP["py-modules"])  # what the install holds


def layers() -> list[list[str]]:
    """design.md's layer list, bottom first: the lines `N. name, name  # ...` under 'Layers'."""
    text = DESIGN.read_text().split("Layers, bottom first", 1)[1].split("```", 2)[1]
    return [[name.strip() for name in line.split("#")[0].split(".", 1)[1].split(",")]
            for line in text.strip().splitlines() if re.match(r"\d+\.", line)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def sources() -> dict[str, Path]:
    """Every project module (tests and docker/ scripts aside) by its dotted name."""
    files = [ROOT / f"{name}.py" for name in PROJECT if (ROOT / f"{name}.py").is_file()]
    files += [path for name in PROJECT if (ROOT / name).is_dir() for path in (ROOT / name).rglob("*.py")]
    return {module_name(path): path for path in files}


def imports(module: str, path: Path, *, top_level_only: bool = False) -> set[str]:
    """The project modules `module` imports (relative imports resolved); with `top_level_only`, only
    those its body runs on import (not those inside functions)."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                source = ".".join([*base, *([node.module] if node.module else [])])
                found.add(source)  # and the names, which may be submodules (`from eval import common`)
                found.update(f"{source}.{alias.name}" for alias in node.names)
            if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return {name for name in found if name.split(".")[0] in PROJECT}


def layer_of(module: str, table: list[list[str]]) -> tuple[int, str]:
    """(layer index, the entry that places it): the longest listed prefix of the dotted name."""
    matches = [(len(entry), index, entry) for index, names in enumerate(table) for entry in names
               if module == entry or module.startswith(entry + ".")]
    assert matches, f"{module} is in no layer of docs/design.md"
    _, index, entry = max(matches)
    return index, entry


def test_the_layer_list_names_every_module_once():
    table = layers()
    entries = [entry for names in table for entry in names]
    assert len(entries) == len(set(entries)) and len(table) >= 5
    for module in sources():
        layer_of(module, table)


def test_the_overview_names_every_package_and_module():
    overview = DESIGN.read_text().split("```", 2)[1]
    assert not [name for name in PROJECT if f"{name}/" not in overview and f"{name}.py" not in overview]


def test_imports_run_downward():
    """A module imports its own package (or module) and lower layers only, lazy imports included."""
    table, upward = layers(), []
    for module, path in sources().items():
        level, entry = layer_of(module, table)
        for target in imports(module, path):
            target_level, target_entry = layer_of(target, table)
            if target_entry != entry and target_level >= level:
                upward.append(f"{module} -> {target}")
    assert not upward, f"imports that do not run downward (docs/design.md, Layers): {upward}"


def test_model_imports_nothing_of_training_or_evaluation():
    """model/ is the library the others build on: it reads runs through tracking and preprocessing
    constants from pipelines, never configs, train, eval or bench."""
    above = ("configs", "train", "train_report", "eval", "bench")
    for module, path in sources().items():
        if module.startswith("model"):
            assert not {t for t in imports(module, path) if t.split(".")[0] in above}, module


def test_module_level_imports_form_no_circle():
    modules = sources()
    graph = {module: {t for t in imports(module, path, top_level_only=True) if t in modules}
             for module, path in modules.items()}
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            pytest.fail("import circle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
