"""What the device suite runs: the full (one H200, about 9 minutes) and smoke (CPU) settings.

Sizes were cut until the estimated GPU time fits (derivation in ``papers/README_gpu.md``).
Benchmark models are registered into ``benchmarks/_common.MODELS`` under the names below, so
``products.py``, ``optimizers.py`` and ``kfac_step.py`` build them like their own networks.

Example:
    >>> cfg = suite_config(smoke=True)
    >>> cfg.mode, cfg.models
    ('smoke', ('mlp-64-32-16-b16', 'resnet18-w2-b2'))
    >>> [p.name for p in suite_config(smoke=False).experiments][:2]
    ['kfac-anatomy', 'curvature-products']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from curvlab.problems import benchmark_mlp

from .resnet import resnet18

__all__ = ["BENCH_MODELS", "PARTS", "ExperimentPlan", "SuiteConfig", "suite_config"]

#: Parts of the suite, in the order they run.
PARTS: tuple[str, ...] = ("env", "gpu-tests", "products", "optimizers", "experiments")

Builder = Callable[..., tuple[nn.Module, tuple[int, ...], int]]


def _mlp(batch: int, hidden: tuple[int, ...] = (1000, 500, 250), inputs: int = 784) -> Builder:
    def build(seed: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
        net = benchmark_mlp(inputs, hidden, generator=torch.Generator().manual_seed(seed))
        return net, (inputs,), batch
    return build


def _resnet(width: int, size: int, batch: int) -> Builder:
    def build(seed: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
        net = resnet18(width=width, generator=torch.Generator().manual_seed(seed))
        return net, (3, size, size), batch
    return build


#: name -> builder with the ``_common.MODELS`` signature ``(seed) -> (model, shape, batch)``.
BENCH_MODELS: dict[str, Builder] = {
    "mlp-b4096": _mlp(4096),  # 784-1000-500-250-10 tanh, batch 4096
    "resnet18-b256": _resnet(64, 32, 256),  # ResNet-18 (11.2 M parameters), 3x32x32, batch 256
    # smoke: the same code on tiny copies
    "mlp-64-32-16-b16": _mlp(16, (32, 16), inputs=64),
    "resnet18-w2-b2": _resnet(2, 8, 2),
}


@dataclass(frozen=True)
class ExperimentPlan:
    """One experiment of the suite: run by ``python -m curvlab reproduce NAME``.

    ``full``: ``--full``; ``seeds``: ``--seeds`` (``None``: the experiment's own default);
    ``cap_s``: its time budget (stopped when over it); ``min_s``: not started with less left;
    ``needs``: name of a data set that must be on disk (``CURVLAB_DATA``), else not run.
    """

    name: str
    full: bool
    seeds: int | None
    cap_s: float
    min_s: float = 20.0
    needs: str = ""


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes, repetitions and time caps of one suite configuration (see :func:`suite_config`)."""

    mode: str
    models: tuple[str, ...]
    product_units: tuple[tuple[str, str], ...]  # (model, dtype) pairs, in order
    step_units: tuple[tuple[str, str], ...]
    product_repeats: int
    step_repeats: int
    steps_per_round: int
    kfac_repeats: int
    kfac_inverses: tuple[str, ...]
    memory_models: tuple[str, ...]  # step memory (fp32) for these models
    part_caps: dict[str, float]
    experiments: tuple[ExperimentPlan, ...]
    reserve_s: float  # kept back for writing the summary and packing the results
    other_experiments: str = "not run: budget"  # status of registered experiments not planned
    unit_min_s: float = 5.0  # a benchmark unit (model x dtype) is not started with less left
    meta: dict[str, str] = field(default_factory=dict)


def _pairs(models: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((m, d) for m in models for d in ("fp32", "bf16"))


def suite_config(smoke: bool) -> SuiteConfig:
    """The smoke (CPU, tiny sizes, < 1 min) or full (one H200, <= 9 min) configuration."""
    if smoke:
        mlp, cnn = "mlp-64-32-16-b16", "resnet18-w2-b2"
        return SuiteConfig(
            mode="smoke", models=(mlp, cnn),
            product_units=((mlp, "fp32"), (mlp, "bf16"), (cnn, "fp32")),
            step_units=((mlp, "fp32"), (mlp, "bf16")),
            product_repeats=1, step_repeats=1, steps_per_round=1, kfac_repeats=1,
            kfac_inverses=("eigen",), memory_models=(mlp,),
            part_caps={"env": 10, "gpu-tests": 10, "products": 25, "optimizers": 20,
                       "experiments": 30},
            experiments=(
                ExperimentPlan("kfac-anatomy", full=False, seeds=None, cap_s=25, min_s=1),
                # stopped by its budget on purpose: exercises the kill path
                ExperimentPlan("curveball-toy", full=False, seeds=None, cap_s=1.5, min_s=0.5),
            ),
            reserve_s=5, other_experiments="not run: not in the smoke subset", unit_min_s=0.0)
    mlp, cnn = "mlp-b4096", "resnet18-b256"
    return SuiteConfig(
        mode="full", models=(mlp, cnn), product_units=_pairs((mlp, cnn)),
        step_units=_pairs((mlp, cnn)),
        product_repeats=5, step_repeats=5, steps_per_round=3, kfac_repeats=3,
        kfac_inverses=("eigen", "factored"), memory_models=(mlp, cnn),
        part_caps={"env": 30, "gpu-tests": 60, "products": 75, "optimizers": 100,
                   "experiments": 400},
        experiments=(
            # complete at full size: cheap (kfac-anatomy runs on the CPU, float64)
            ExperimentPlan("kfac-anatomy", full=True, seeds=None, cap_s=45),
            ExperimentPlan("curvature-products", full=True, seeds=None, cap_s=60),
            ExperimentPlan("ngd-vs-kfac", full=True, seeds=None, cap_s=60),
            # far longer than a lease at full size (papers/README_gpu.md): stopped by their
            # budgets, the finished runs of each sweep are kept and can be resumed (--results)
            ExperimentPlan("deep-autoencoder", full=True, seeds=1, cap_s=150, min_s=60),
            ExperimentPlan("large-batch", full=True, seeds=1, cap_s=45),
            ExperimentPlan("curveball-toy", full=True, seeds=3, cap_s=30),  # CPU-bound
            ExperimentPlan("cnn-classification", full=True, seeds=1, cap_s=60,
                           needs="cifar10"),
        ),
        reserve_s=15)
