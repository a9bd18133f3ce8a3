"""Why CurveBall stalls on the digits auto-encoder: faithful default vs the damping-units remedy.

Not a timing benchmark: it counts iterations. Runs CurveBall on the ``deep-autoencoder``
study's quick ``digits`` (or ``curves``) problem (same data, network, seed, batch schedule and
training error as the study, through the study's
:func:`~curvlab.experiments.harness.training.train`) for ``--steps`` iterations with

* the faithful default (``damping = 1`` in the units of the loss as reduced, the reference's
  λ rule: at most ×/÷ 0.999⁵ every 5 steps);
* the remedy ``damping_units="example"`` (λ = 1 per example, i.e. 1/D = 1/64 on the
  pixel-averaged ``BCEWithLogitsLoss``);
* for contrast, a faster λ rule alone (``lambda_factor = 0.9``).

It prints the per-case squared training error at the study's iteration count (120 on digits,
200 on ``--problem curves``) and at the end, the iterations to reach tuned SGD-momentum's,
Adam's and Muon's final errors in the study (Muon's is the study's time-to-target target), the
final λ, how often the ratio test asked for less damping, and the GGN curvature ``zᵀGz/zᵀz``
along ``z`` relative to λ at the study's last iteration.

Usage::

    python benchmarks/curveball_plateau.py            # 1,500 iterations (~5 min, one thread)
    python benchmarks/curveball_plateau.py --steps 120
    python benchmarks/curveball_plateau.py --problem curves --steps 200
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from curvlab.experiments.harness.registry import Context
from curvlab.experiments.harness.training import train
from curvlab.experiments.studies.autoencoder import PAPER_L2, QUICK_ITERATIONS, autoencoder_problem
from curvlab.func import flatten
from curvlab.optim import CurveBall

#: final training errors of the tuned first-order methods in the study (papers/deep_autoencoder.md;
#: SGD = SGD-momentum)
TARGETS = {"digits": {"SGD": 2.992, "Adam": 2.286, "Muon": 0.344},
           "curves": {"SGD": 7.340, "Adam": 6.258, "Muon": 4.897}}
CONFIGS: dict[str, dict[str, Any]] = {
    "faithful default (λ=1 per loss)": {},
    "remedy damping_units='example'": {"damping_units": "example"},
    "faster λ rule (lambda_factor=0.9)": {"lambda_factor": 0.9},
}


class _Recorder(CurveBall):
    """CurveBall that keeps the ratio tests and the curvature along ``z`` at one iteration."""

    probe_at = QUICK_ITERATIONS["digits"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ratios: list[float] = []
        self.curvature_over_damping = math.nan

    def step(self, inputs: Any, targets: Any = None) -> torch.Tensor:
        loss = super().step(inputs, targets)
        if self.diagnostics["ratio"] is not None:
            self.ratios.append(self.diagnostics["ratio"])
        if self.steps == self.probe_at:  # zᵀGz / zᵀz against the λ actually used
            q = self.quadratic_model(inputs, targets)
            z = flatten(self.velocity).double()
            with torch.no_grad():
                lam = self.effective_damping(self.model(inputs), targets)
            ggn = float(q["A"][1, 1]) / float(z @ z) - lam - self.hyper("weight_decay")
            self.curvature_over_damping = ggn / lam
        return loss


def _first_below(trace: list[dict[str, Any]], target: float) -> float:
    for row in trace:
        if row["train_error"] <= target:
            return row["iteration"]
    return math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--problem", choices=sorted(TARGETS), default="digits")
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the study's quick mode: reproducible numbers
    ctx = Context(Path("results"), False, torch.device("cpu"), None, False)
    problem = autoencoder_problem(args.problem, ctx)
    study_its = QUICK_ITERATIONS[args.problem]
    _Recorder.probe_at = study_its
    targets = TARGETS[args.problem]
    dim = problem.data.input_shape[0]
    wd = PAPER_L2 / dim
    print(f"{args.problem} auto-encoder, {args.steps} iterations, errors = per-case squared "
          f"error; the study runs {study_its}")
    header = (f"{'config':36s} {'err@' + str(study_its):>8s} {'final':>7s} "
              + " ".join(f"{'it→' + k:>8s}" for k in targets)
              + f" {'final λ':>9s} {'ratio>1.5':>9s} {'zGz/λzz@' + str(study_its):>11s}")
    print(header)
    for label, kw in CONFIGS.items():
        opts: list[_Recorder] = []

        def factory(model, loss_fn, kw=kw, opts=opts):
            opts.append(_Recorder(model, loss_fn, weight_decay=wd, **kw))
            return opts[-1]

        result = train(factory, problem.model_factory, problem.data, loss_fn=problem.loss_fn,
                       iterations=args.steps, batch_size=problem.batch_size,
                       eval_every=args.eval_every, seed=0)
        trace, opt = result.trace, opts[0]
        at_study = next((r["train_error"] for r in trace if r["iteration"] == study_its),
                        math.nan)
        reach = " ".join(f"{_first_below(trace, t):>8.0f}" for t in targets.values())
        high = sum(r > opt.lambda_thresholds[1] for r in opt.ratios) / max(len(opt.ratios), 1)
        print(f"{label:36s} {at_study:8.3f} {trace[-1]['train_error']:7.3f} {reach} "
              f"{opt.effective_damping(torch.zeros(1, dim)):9.3g} {high:9.0%} "
              f"{opt.curvature_over_damping:11.3g}", flush=True)
    print("(it→X: first evaluated iteration whose training error is <= X's final error in the "
          "study; nan = not reached)")


if __name__ == "__main__":
    main()
