"""K-FAC step time over SGD step time, amortized over the update intervals (not a test).

Models (same as ``benchmarks/products.py``): MLP 784-1000-500-250-10 tanh, batch 512; 3c3d-like
CNN (conv64(5)-pool-conv96(3)-pool-conv128(3)-pool-fc512-fc256-fc10, ReLU, 32x32x3), batch 128;
cross-entropy, float32. ``curvlab.optim.KFACOptimizer(fisher='mc')`` is timed in its three kinds of
work, interleaved round-robin with a plain SGD step (``zero_grad``, forward, backward,
``torch.optim.SGD.step``) in one process, medians over ``--repeats`` rounds:

* ``t_plain``: a K-FAC step without factor or inverse update (forward, backward, precondition,
  momentum, update);
* ``t_cov``: a step with a factor update (adds the sampled-target backward and ``A``, ``G``);
* ``t_inv``: one refresh of all eigendecompositions, with (``inverse='factored'`` /
  ``'cholesky'``) the explicit damped inverses the next product would build.

Amortized step = ``t_plain + (t_cov - t_plain)/cov_interval + t_inv/inv_interval`` for the
configurations (10, 100) and (1, 20); the forced inverses of the first three steps are a
start-up cost and not amortized. Also reports the memory of factors and inverses (bytes).

    python benchmarks/kfac_step.py [--repeats 7] [--models mlp cnn] [--inverse eigen factored]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import MODELS, sync  # benchmarks/_common.py: shared networks and sync
from torch import nn

from curvlab.optim.kfac import KFACOptimizer

CONFIGS = ((10, 100), (1, 20))


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(name: str, *, repeats: int, device: torch.device, inverse: str = "eigen"
            ) -> dict[str, float]:
    """Median times (s) of an SGD step and of the three kinds of K-FAC work, and memory."""
    torch.manual_seed(0)
    build = MODELS[name]
    net, shape, batch = build()
    net = net.to(device)
    sgd_net = build()[0].to(device)
    sgd_net.load_state_dict(net.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=1e-3, momentum=0.9)
    opt = KFACOptimizer(net, loss_fn, lr=1e-3, momentum=0.9, damping=1e-2, fisher="mc",
               inverse=inverse, cov_interval=1, inv_interval=10**9, num_forced_inverses=1,
               generator=torch.Generator(device=device).manual_seed(0))

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_fn(sgd_net(x), y).backward()
        sgd.step()

    def kfac_cov() -> None:
        opt.cov_interval = 1
        opt.step(x, y)

    def kfac_plain() -> None:
        opt.cov_interval = 10**9
        opt.step(x, y)

    def refresh() -> None:
        for block in opt.engine.blocks.values():
            block.stale = True
        opt.engine.refresh()
        if inverse != "eigen":  # the explicit damped inverses are built lazily, on the first
            for block in opt.engine.blocks.values():  # product after a refresh: count them here
                block.explicit_inverses(opt.damping)

    for fn in (sgd_step, kfac_cov, kfac_plain, sgd_step, kfac_plain):  # warm-up
        fn()
    times: dict[str, list[float]] = {"sgd": [], "plain": [], "cov": [], "inv": []}
    for _ in range(repeats):
        times["sgd"].append(_timed(sgd_step, device))
        times["plain"].append(_timed(kfac_plain, device))
        times["cov"].append(_timed(kfac_cov, device))
        times["inv"].append(_timed(refresh, device))
    out = {k: statistics.median(v) for k, v in times.items()}
    mem = opt.memory_usage()
    out.update(factors_bytes=mem["factors"], inverses_bytes=mem["inverses"],
               params=sum(p.numel() for p in net.parameters()))
    return out


def amortized(t: dict[str, float], cov_interval: int, inv_interval: int) -> float:
    """Amortized K-FAC step time for the given intervals."""
    return t["plain"] + (t["cov"] - t["plain"]) / cov_interval + t["inv"] / inv_interval


def table(results: dict[tuple[str, str], dict[str, float]]) -> str:
    lines = [
        "| model | inverse | SGD step (ms) | K-FAC plain / cov / inverse (ms) | "
        "ratio cov=10, inv=100 (target <= 1.3) | ratio cov=1, inv=20 (target <= 2.4) | "
        "factors (MB) | inverses (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, inverse), t in results.items():
        r1 = amortized(t, *CONFIGS[0]) / t["sgd"]
        r2 = amortized(t, *CONFIGS[1]) / t["sgd"]
        lines.append(
            f"| {name} | {inverse} | {1e3 * t['sgd']:.1f} | {1e3 * t['plain']:.1f} / "
            f"{1e3 * t['cov']:.1f} / {1e3 * t['inv']:.1f} | {r1:.2f} | {r2:.2f} | "
            f"{t['factors_bytes'] / 2**20:.2f} | {t['inverses_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
    parser.add_argument("--inverse", nargs="+", default=["eigen", "factored"],
                        choices=["eigen", "factored", "cholesky"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    for name in args.models:
        for inverse in args.inverse:
            results[(name, inverse)] = measure(name, repeats=args.repeats, device=device,
                                               inverse=inverse)
    print(f"device={device}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats} (medians, interleaved)\n")
    print(table(results))


if __name__ == "__main__":
    main()
