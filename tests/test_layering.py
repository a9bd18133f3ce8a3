"""The package is layered: a module may import only from its own layer or the layers below.

    func -> kfac -> operators -> linalg -> optim -> data, problems -> experiments -> cli

This test reads every module's imports (statically, with ``ast``) and fails on any upward import,
so the rule cannot erode silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "curvlab"

LAYERS = {
    "func": 0,
    "kfac": 1,
    "operators": 2,
    "linalg": 3,
    "optim": 4,
    "data": 5,
    "problems": 5,
    "experiments": 6,
    "__main__": 7,
    "__init__": 7,
}


def _layer_of(module_path: Path) -> tuple[str, int]:
    rel = module_path.relative_to(PACKAGE)
    top = rel.parts[0].removesuffix(".py")
    if top not in LAYERS:
        raise AssertionError(f"curvlab/{rel}: subpackage {top!r} has no layer in this test")
    return top, LAYERS[top]


def _imported_subpackages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "curvlab":
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "curvlab" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_imports(path: Path) -> None:
    name, level = _layer_of(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    for target in _imported_subpackages(tree):
        if target not in LAYERS:  # a top-level name re-exported from curvlab/__init__
            continue
        assert LAYERS[target] <= level, (
            f"curvlab/{path.relative_to(PACKAGE)} (layer {name}) imports curvlab.{target}, "
            "which is a higher layer"
        )


def test_relative_imports_are_not_used() -> None:
    def relative(p: Path) -> bool:
        tree = ast.parse(p.read_text())
        return any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))

    offenders = [str(p.relative_to(PACKAGE)) for p in MODULES if relative(p)]
    assert not offenders, f"use absolute imports (curvlab.x.y) for layering checks: {offenders}"
