"""Experiments layout: harness vs studies, old import paths, registry completeness."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import curvlab.experiments as ex
from curvlab.experiments.harness import provenance

EXPERIMENTS = Path(ex.__file__).resolve().parent
HARNESS = ["comparison", "optimizers", "plotting", "provenance", "registry", "reproduce",
           "runner"]
STUDIES = list(ex.EXPERIMENT_MODULES)


@pytest.mark.parametrize("name", HARNESS + STUDIES)
def test_old_path_reexports_the_same_objects(name):
    layer = "harness" if name in HARNESS else "studies"
    old = importlib.import_module(f"curvlab.experiments.{name}")
    new = importlib.import_module(f"curvlab.experiments.{layer}.{name}")
    assert set(old.__all__) == set(new.__all__)
    for attr in new.__all__:
        assert getattr(old, attr) is getattr(new, attr), f"{name}.{attr}"


def test_old_training_path_covers_the_split_modules():
    from curvlab.experiments import training
    from curvlab.experiments.harness import selection, threads
    from curvlab.experiments.harness import training as loop

    for module in (loop, selection, threads):
        for attr in module.__all__:
            assert getattr(training, attr) is getattr(module, attr)


def test_names_the_notebooks_and_benchmarks_import():
    from curvlab.experiments.autoencoder import NAME, run_deep_autoencoder  # noqa: F401
    from curvlab.experiments.cnn_classification import NAME as CNN  # noqa: F401
    from curvlab.experiments.curvature_products import (  # noqa: F401
        curvature_study,
        plot_heatmaps,
        plot_spectra,
        study_settings,
    )
    from curvlab.experiments.kfac_anatomy import (  # noqa: F401
        commutation_matrix,
        compute_anatomy,
        exact_fisher_by_enumeration,
        make_data,
        make_thor_net,
        plot_blocks,
        plot_fisher,
    )
    from curvlab.experiments.large_batch import (  # noqa: F401
        NAME as LB,
    )
    from curvlab.experiments.ngd_comparison import METHOD_GRIDS, compare_ngd_kfac_sgd  # noqa: F401
    from curvlab.experiments.toy_problems import (  # noqa: F401
        CURVEBALL_CONFIGS,
        OPTIMIZER_LABELS,
        TOLERANCE,
        curveball_toy,
        load_traces,
    )
    from curvlab.experiments.training import quick_mode_threads, select_best, train  # noqa: F401


def test_every_study_registers_from_the_studies_package():
    status = ex.module_status()
    assert all(s.available for s in status.values()), ex.unavailable_modules()
    modules = {e.module for e in ex.list_experiments() if e.module.startswith("curvlab.")}
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(STUDIES)
    assert all(m.startswith("curvlab.experiments.studies.") for m in modules)


def test_harness_does_not_import_studies():
    for path in (EXPERIMENTS / "harness").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("curvlab.experiments.studies"), path.name
                assert node.module.startswith("curvlab.experiments.harness") or \
                    not node.module.startswith("curvlab.experiments"), (path.name, node.module)


def test_modules_stay_small():
    sizes = {p.relative_to(EXPERIMENTS): len(p.read_text().splitlines())
             for p in EXPERIMENTS.rglob("*.py")}
    assert max(sizes.values()) <= 400, sizes


def test_provenance_finds_the_repository():
    root = Path(provenance.__file__).resolve().parents[3]
    assert (root / "curvlab" / "experiments" / "harness" / "provenance.py").exists()
    if (root / ".git").exists():
        assert provenance.git_commit() != "unknown"


def test_package_function_provenance_survives_loading_the_old_submodule():
    importlib.import_module("curvlab.experiments.provenance")
    from curvlab.experiments import provenance as fn

    assert callable(fn) and fn is provenance.provenance
