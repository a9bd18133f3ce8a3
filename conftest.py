"""Shared pytest configuration for tests/ and notebooks/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ mirrors the package (tests/kfac, tests/optim, ...); the shared model cases and dense
# oracles live at its top (tests/_cases.py, tests/_oracles.py) for every folder to import.
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from curvlab.experiments.training import single_thread


def pytest_collectstart(collector):
    """nbval: compare no stderr (warnings carry per-run ipykernel temp paths)."""
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP overhead on shared CPUs.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    with single_thread():
        yield
