"""Cost of one optimizer step relative to one SGD step (not a test).

Models: the benchmark MLP (784-1000-500-250-10, tanh, batch 512) and a 3c3d-like CNN (conv64(5)-
pool-conv96(3)-pool-conv128(3)-pool-fc512-fc256-fc10, ReLU, 32x32x3 inputs, batch 128), float32,
cross-entropy. Each case is a named *step factory* (:data:`CASES`): ``factory(model, loss_fn)``
returns an object with ``step(x, y)``. Time: cases are interleaved round-robin (``--repeats``
rounds of ``--steps`` steps each, so CurveBall's λ test, every 5th step, is included in its
average); reported is the median per-step time divided by the median of plain SGD (forward +
backward + update). Memory ("step memory"): optimizer-held tensors (state such as z or momentum
buffers, and ``.grad`` buffers) plus the transient peak of one step, excluding the parameters
and the batch -- on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the allocation
events of ``torch.profiler`` (``profile_memory=True``); reported relative to SGD with momentum.
Prints a markdown table, with the floor by operation count of each ratio (``benchmarks/flops.py``:
the step's multiply-adds / the SGD step's) and "vs floor" (measured / floor). To add a case,
append a ``StepCase`` to ``CASES``.

K-FAC's cost depends on its intervals, so it gets its own table (from ``kfac_step.py``): the
median times of a plain step, a step that also updates the factors, and an inverse refresh,
combined into the amortized step time for (cov_interval, inv_interval) = (10, 100) and (1, 20),
for ``inverse`` = 'factored', 'eigen' and 'cholesky', then next to their floors by op count.

    python benchmarks/optimizers.py [--models mlp cnn] [--repeats 7] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flops  # benchmarks/flops.py: the operation-count floor
import torch
from _common import MODELS, sync  # benchmarks/_common.py: shared networks and sync
from torch import nn

from curvlab.optim import CurveBall, HessianFree, TorchOptimizer


@dataclass(frozen=True)
class StepCase:
    """A named optimizer: ``factory(model, loss_fn) -> object with step(x, y)``."""

    name: str
    factory: Callable[[nn.Module, Callable], Any]


CASES: list[StepCase] = [
    StepCase("SGD", lambda m, f: TorchOptimizer(m, f, torch.optim.SGD, lr=1e-3)),
    StepCase("SGD+momentum",
             lambda m, f: TorchOptimizer(m, f, torch.optim.SGD, lr=1e-3, momentum=0.9)),
    StepCase("Adam", lambda m, f: TorchOptimizer(m, f, torch.optim.Adam, lr=1e-4)),
    StepCase("CurveBall", lambda m, f: CurveBall(m, f)),
    StepCase("CurveBall (no λ test)", lambda m, f: CurveBall(m, f, auto_lambda=False)),
    StepCase("HessianFree (10 CG)", lambda m, f: HessianFree(m, f, max_cg_iters=10)),
]
BASELINE = "SGD"
KFAC_INVERSES = ("factored", "eigen", "cholesky")
MEMORY_BASELINE = "SGD+momentum"


def _setup(model_name: str, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    net, shape, batch = MODELS[model_name]()
    net = net.to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return net, x, y


def time_cases(model_name: str, cases: list[StepCase], device: torch.device, repeats: int,
               steps: int) -> dict[str, float]:
    """Median seconds per step of each case (interleaved rounds)."""
    loss_fn = nn.CrossEntropyLoss()
    opts = {}
    for case in cases:
        net, x, y = _setup(model_name, device)
        opts[case.name] = (case.factory(net, loss_fn), x, y)
        for _ in range(2):  # warm-up (tracing, allocator)
            opts[case.name][0].step(x, y)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(repeats):
        for case in cases:
            opt, x, y = opts[case.name]
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                opt.step(x, y)
            sync(device)
            times[case.name].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def _tensor_bytes(obj: Any) -> int:
    leaves, _ = torch.utils._pytree.tree_flatten(obj)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def memory_case(model_name: str, case_name: str, device: torch.device) -> float:
    """Peak memory (MiB) of one step beyond the parameters: optimizer-held tensors (state, and
    ``.grad`` buffers) + the transient peak of the step.

    CUDA: ``max_memory_allocated`` during the step minus the parameters. CPU: the transient
    peak is the maximum running sum of the allocations/frees the profiler records
    (``profile_memory=True``) during one step after a warm-up step, plus the bytes of the
    optimizer's ``state_dict`` tensors and gradient buffers held between steps.
    """
    from torch.profiler import ProfilerActivity, profile

    case = next(c for c in CASES if c.name == case_name)
    net, x, y = _setup(model_name, device)
    opt = case.factory(net, nn.CrossEntropyLoss())
    param_bytes = _tensor_bytes(list(net.parameters()))
    for _ in range(getattr(opt, "lambda_interval", 1)):  # warm-up: creates the state; for
        opt.step(x, y)  # CurveBall the measured step is one with the λ test
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) - _tensor_bytes([x, y])
        opt.step(x, y)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - _tensor_bytes([x, y])
        return (max(peak, base) - param_bytes) / 2**20
    held = _tensor_bytes(opt.state_dict()) + _tensor_bytes(
        [p.grad for p in net.parameters() if p.grad is not None])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step(x, y)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return (held + peak) / 2**20


def memory_cases(model_name: str, cases: list[StepCase], device: torch.device
                 ) -> dict[str, float]:
    """:func:`memory_case` for every case."""
    return {c.name: memory_case(model_name, c.name, device) for c in cases}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-kfac", action="store_true", help="skip the K-FAC table")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device}, torch={torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}, steps/round={args.steps}\n")
    rows = []
    for model_name in args.models:
        t = time_cases(model_name, CASES, device, args.repeats, args.steps)
        mem = None if args.no_memory else memory_cases(model_name, CASES, device)
        for case in CASES:
            ratio_mem = ""
            if mem is not None and mem[MEMORY_BASELINE] > 0:
                ratio_mem = f"{mem[case.name] / mem[MEMORY_BASELINE]:.2f}x"
            rows.append((model_name, case.name, t[case.name] * 1e3, t[case.name] / t[BASELINE],
                         "" if mem is None else f"{mem[case.name]:.0f}", ratio_mem))
    mem_label = "step memory MiB"
    print(f"| model | optimizer | ms/step | time / SGD step | floor by op count | vs floor | "
          f"{mem_label} | mem / SGD+mom |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model_name, name, ms, ratio, mem_s, ratio_mem in rows:
        floor = flops.floor_ratio(model_name, name)
        f_s, vs = ("", "") if math.isnan(floor) else (f"{floor:.2f}x", f"{ratio / floor:.2f}")
        print(f"| {model_name} | {name} | {ms:.1f} | {ratio:.2f}x | {f_s} | {vs} | {mem_s} | "
              f"{ratio_mem} |")
    if not args.no_kfac:
        from kfac_step import measure, table  # benchmarks/kfac_step.py

        results = {
            (name, inverse): measure(name, repeats=args.repeats, device=device, inverse=inverse)
            for name in args.models
            for inverse in KFAC_INVERSES
        }
        print("\nK-FAC (fisher='mc'), amortized step time / SGD step:\n")
        print(table(results))
        print("\nK-FAC amortized step / SGD+momentum step (kfac_step.py's baseline), next to "
              "the floor by op count (benchmarks/flops.py):\n")
        print(kfac_floor_table(results))


def kfac_floor_table(results: dict[tuple[str, str], dict[str, float]]) -> str:
    """Markdown rows: measured amortized K-FAC ratio, its floor by op count, and
    measured / floor, for each of ``kfac_step.CONFIGS``."""
    from kfac_step import CONFIGS, amortized  # benchmarks/kfac_step.py

    lines = ["| model | inverse | intervals (cov/inv) | time / SGD+mom step | floor by op count "
             "| vs floor |", "|---|---|---|---:|---:|---:|"]
    for (name, inverse), t in results.items():
        for cov, inv in CONFIGS:
            ratio = amortized(t, cov, inv) / t["sgd"]
            floor = flops.kfac_floor(name, cov, inv, inverse)
            lines.append(f"| {name} | {inverse} | {cov}/{inv} | {ratio:.2f}x | {floor:.2f}x | "
                         f"{ratio / floor:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
