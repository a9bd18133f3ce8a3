"""Shared test fixtures."""

from __future__ import annotations

import pytest

from curvlab.experiments.training import single_thread


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP overhead on shared CPUs.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    with single_thread():
        yield
