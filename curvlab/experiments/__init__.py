"""Reproducible experiments: the harness, and the studies registered with it.

:mod:`curvlab.experiments.harness` holds what every study uses (registry, runner, reproduce,
provenance, plotting, training loop, optimizer factory, best-setting selection, comparison
sweeps); :mod:`curvlab.experiments.studies` holds one module per study. The old flat paths
(``curvlab.experiments.runner``, ``curvlab.experiments.toy_problems``, ...) still import.

Importing this package imports every study in :data:`EXPERIMENT_MODULES` so that its
experiments register themselves. A module that is missing or fails to import is not dropped
silently: :func:`module_status` reports it (``python -m curvlab list`` prints it as
"not available: <reason>").

Example:
    >>> from curvlab.experiments import Run, module_status
    >>> Run("demo", {"lr": 0.1}, seed=0).key == Run("demo", {"lr": 0.1}, seed=0).key
    True
    >>> sorted(module_status()) == sorted(EXPERIMENT_MODULES)
    True
"""

from __future__ import annotations

import importlib
import traceback
from dataclasses import dataclass

from curvlab.experiments.harness.registry import (
    Claim,
    Context,
    Experiment,
    Outcome,
    get_experiment,
    list_experiments,
    make_context,
    register,
    unregister,
)
from curvlab.experiments.harness.runner import (
    Run,
    RunResult,
    flatten_config,
    read_results,
    run_all,
)

# through the old path on purpose: loading the submodule curvlab.experiments.provenance later
# would otherwise rebind the package attribute `provenance` (this function) to that module
from curvlab.experiments.provenance import git_commit, provenance, resolve_device

__all__ = [
    "EXPERIMENT_MODULES",
    "Claim",
    "Context",
    "Experiment",
    "ModuleStatus",
    "Outcome",
    "Run",
    "RunResult",
    "flatten_config",
    "get_experiment",
    "git_commit",
    "list_experiments",
    "load_experiment_modules",
    "make_context",
    "module_status",
    "provenance",
    "read_results",
    "register",
    "resolve_device",
    "run_all",
    "run_experiment",
    "unavailable_modules",
    "unregister",
]

#: Study modules under ``curvlab/experiments/studies/`` imported (and thereby registered) here.
EXPERIMENT_MODULES: tuple[str, ...] = (
    "curvature_products",
    "toy_problems",
    "kfac_anatomy",
    "ngd_comparison",
    "autoencoder",
    "cnn_classification",
    "large_batch",
    "stale_statistics",
    "transformer_lm",
)


@dataclass(frozen=True)
class ModuleStatus:
    """Import state of one experiment module.

    ``available``: imported; ``missing``: the file does not exist; otherwise it exists but failed
    to import (``reason`` names the exception, ``detail`` holds the traceback).
    """

    module: str
    available: bool
    missing: bool = False
    reason: str = ""
    detail: str = ""


_STATUS: dict[str, ModuleStatus] = {}
_STUDIES = f"{__name__}.studies"


def load_experiment_modules(*, reload: bool = False) -> dict[str, ModuleStatus]:
    """Import every module of :data:`EXPERIMENT_MODULES`, recording failures (never raising)."""
    for module in EXPERIMENT_MODULES:
        if module in _STATUS and not reload:
            continue
        full = f"{_STUDIES}.{module}"
        try:
            importlib.import_module(full)
            _STATUS[module] = ModuleStatus(module, True)
        except ModuleNotFoundError as err:
            if err.name == full:
                _STATUS[module] = ModuleStatus(
                    module, False, missing=True, reason=f"module {full} does not exist (yet)"
                )
            else:
                _STATUS[module] = ModuleStatus(
                    module, False, reason=f"import failed: {type(err).__name__}: {err}",
                    detail=traceback.format_exc(),
                )
        except Exception as err:  # recorded and reported, never swallowed
            _STATUS[module] = ModuleStatus(
                module, False, reason=f"import failed: {type(err).__name__}: {err}",
                detail=traceback.format_exc(),
            )
    return dict(_STATUS)


def module_status() -> dict[str, ModuleStatus]:
    """Import state of every experiment module (imports them on first call)."""
    return load_experiment_modules()


def unavailable_modules() -> dict[str, str]:
    """``{module: reason}`` of experiment modules that are missing or failed to import."""
    return {m: s.reason for m, s in module_status().items() if not s.available}


def run_experiment(name: str, ctx: Context | None = None, **context_kwargs) -> Outcome:
    """Run one registered experiment (what notebooks call).

    ``ctx`` defaults to :func:`make_context` with ``context_kwargs`` (``out_dir``, ``full``,
    ``device``, ``seeds``, ``progress``).
    """
    if ctx is None:
        ctx = make_context(**context_kwargs)
    elif context_kwargs:
        raise TypeError("run_experiment: pass either ctx or context keyword arguments, not both")
    return get_experiment(name)(ctx)


load_experiment_modules()
