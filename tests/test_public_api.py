"""Public names are re-exported, documented, and carry a runnable example (run as doctests)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

import curvlab

LIBRARY_PACKAGES = [
    "curvlab",
    "curvlab.func",
    "curvlab.operators",
    "curvlab.linalg",
    "curvlab.optim",
    "curvlab.kfac",
    "curvlab.data",
    "curvlab.problems",
]


def _public_callables():
    for package in LIBRARY_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield package, name, obj


def _is_record(obj) -> bool:
    """Result records and exceptions are documented by the functions that return/raise them."""
    return inspect.isclass(obj) and (
        dataclasses.is_dataclass(obj)
        or issubclass(obj, Exception)
        or (issubclass(obj, tuple) and hasattr(obj, "_fields"))  # NamedTuple results
    )


CASES = list(_public_callables())


@pytest.mark.parametrize(("package", "name", "obj"), CASES, ids=[f"{p}.{n}" for p, n, _ in CASES])
def test_public_name_is_documented_with_an_example(package, name, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{package}.{name} has no docstring"
    if _is_record(obj):
        return
    assert ">>>" in doc, f"{package}.{name}: the docstring needs a short runnable example"


def test_top_level_reexports():
    for name in ["Hessian", "GGN", "Fisher", "EmpiricalFisher", "KFAC", "KFACPreconditioner"]:
        assert name in curvlab.__all__
        assert getattr(curvlab, name).__module__.startswith("curvlab.")
    assert curvlab.KFAC is curvlab.operators.kfac.KFAC  # the operator
    assert curvlab.optim.KFACOptimizer is not curvlab.KFAC


def test_importing_curvlab_does_not_import_the_experiment_stack():
    import subprocess
    import sys

    code = "import sys, curvlab; print('pandas' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
