"""K-FAC step over SGD step with THOR's block splitting and SP-NGD's adaptive refresh (not a test).

Models: the benchmark MLP 784-1000-500-250-10 tanh, batch 512 (``_common.mlp``), and
``cnn-wide``: the 3c3d-like CNN of ``_common.cnn`` on 3×48×48 inputs, whose classifier
``nn.Linear`` has 128·6·6 = 4,608 inputs (A is 4,609 × 4,609), batch 128; cross-entropy,
float32, ``KFACOptimizer(fisher='mc', momentum=0.9)``. Configurations:

* ``unsplit, Fixed(1, 20)`` — the reference (``benchmarks/kfac_step.py``'s (1, 20));
* ``split 128, Fixed(1, 20)`` — ``split_dim=128`` alone;
* ``split 128, Adaptive`` — ``split_dim=128`` + ``AdaptiveRefresh(alpha, grow, shrink,
  max_interval)`` (defaults of the library unless given).

Per configuration, medians over ``--repeats`` interleaved rounds (with a plain SGD step —
``zero_grad``, forward, backward, ``torch.optim.SGD.step`` — in every round): ``t_plain`` (a step
without statistics or refresh), ``t_cov`` (a step with statistics) and ``t_inv`` (refreshing
every eigendecomposition). Amortized step = ``t_plain + (t_cov − t_plain)·f_cov + t_inv·f_inv``
with ``f_cov = 1, f_inv = 1/20`` for Fixed(1, 20); for the adaptive policy ``f_cov`` /
``f_inv`` are the fractions of factor updates / inverse refreshes it performed over
``--policy-steps`` real steps on fresh random batches (whose mean measured step time is
reported too; the forced first refreshes are a start-up cost). Also: bytes of factors and
inverses, split vs unsplit.

    python benchmarks/kfac_refresh.py [--repeats 7] [--models mlp cnn-wide] [--policy-steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import MODELS, sync  # benchmarks/_common.py: shared networks and sync
from torch import nn

from curvlab.kfac import AdaptiveRefresh, FixedRefresh
from curvlab.optim.kfac import KFACOptimizer
from curvlab.problems import cnn_3c3d


def cnn_wide(seed: int = 0) -> tuple[nn.Module, tuple[int, ...], int]:
    """3c3d-like CNN on 48×48 inputs (classifier Linear with 4,608 inputs), batch 128."""
    return (cnn_3c3d(image_size=48, generator=torch.Generator().manual_seed(seed)),
            (3, 48, 48), 128)


NETS: dict[str, Callable[..., tuple[nn.Module, tuple[int, ...], int]]] = {
    "mlp": MODELS["mlp"], "cnn-wide": cnn_wide}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _fractions(opt: KFACOptimizer, steps: int) -> tuple[float, float]:
    counts = opt.refresh_policy.counts
    factors = sum(1 if n in opt.refresh_policy.unitwise else 2 for n in counts)
    f_cov = sum(c["A"] + c["G"] + c["F"] for c in counts.values()) / (steps * factors)
    f_inv = sum(c["inverse"] for c in counts.values()) / (steps * len(counts))
    return f_cov, f_inv


def measure(name: str, *, repeats: int, policy_steps: int, device: torch.device,
            adaptive: dict) -> dict[str, dict[str, float]]:
    """Per configuration: median times (s), refresh fractions, amortized step and memory."""
    build = NETS[name]
    net, shape, batch = build()
    net = net.to(device)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sgd_net = build()[0].to(device)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=1e-3, momentum=0.9)

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_fn(sgd_net(x), y).backward()
        sgd.step()

    def kfac(split_dim: int | None, refresh) -> KFACOptimizer:
        model = build()[0].to(device)
        return KFACOptimizer(model, loss_fn, lr=1e-3, momentum=0.9, damping=1e-2, fisher="mc",
                             split_dim=split_dim, refresh=refresh,
                             generator=torch.Generator(device=device).manual_seed(0))

    configs = {"unsplit, Fixed(1, 20)": None, "split 128, Fixed(1, 20)": 128,
               "split 128, Adaptive": 128}
    opts = {c: kfac(k, FixedRefresh(1, 10**9, 1)) for c, k in configs.items()
            if "Adaptive" not in c}
    opts["split 128, Adaptive"] = opts["split 128, Fixed(1, 20)"]  # same component times

    def plain(opt):
        def fn() -> None:
            opt.cov_interval = 10**9
            opt.step(x, y)
        return fn

    def cov(opt):
        def fn() -> None:
            opt.cov_interval = 1
            opt.step(x, y)
        return fn

    def inv(opt):
        def fn() -> None:
            for block in opt.engine.blocks.values():
                block.stale = True
            opt.engine.refresh()
        return fn

    unique = {id(o): o for o in opts.values()}
    for o in unique.values():  # warm-up (the first step also computes the first inverses)
        cov(o)(), plain(o)()
    sgd_step()
    times: dict[str, list[float]] = {"sgd": []}
    for o in unique.values():
        times.update({f"{id(o)}:{k}": [] for k in ("plain", "cov", "inv")})
    for _ in range(repeats):
        times["sgd"].append(_timed(sgd_step, device))
        for o in unique.values():
            for k, f in (("plain", plain), ("cov", cov), ("inv", inv)):
                times[f"{id(o)}:{k}"].append(_timed(f(o), device))
    med = {k: statistics.median(v) for k, v in times.items()}

    policy = kfac(128, AdaptiveRefresh(**adaptive))
    gen = torch.Generator(device="cpu").manual_seed(1)
    steps = []
    for _ in range(policy_steps):
        xb = torch.randn(batch, *shape, generator=gen).to(device)
        yb = torch.randint(0, 10, (batch,), generator=gen).to(device)
        steps.append(_timed(lambda xb=xb, yb=yb: policy.step(xb, yb), device))
    f_adaptive = _fractions(policy, policy_steps)

    out = {}
    for c, o in opts.items():
        t = {k: med[f"{id(o)}:{k}"] for k in ("plain", "cov", "inv")}
        f_cov, f_inv = f_adaptive if "Adaptive" in c else (1.0, 1 / 20)
        mem = (policy if "Adaptive" in c else o).memory_usage()
        row = {**t, "sgd": med["sgd"], "f_cov": f_cov, "f_inv": f_inv,
               "amortized": t["plain"] + (t["cov"] - t["plain"]) * f_cov + t["inv"] * f_inv,
               "factors_bytes": mem["factors"], "inverses_bytes": mem["inverses"]}
        if "Adaptive" in c:
            row["measured"] = statistics.mean(steps[min(3, len(steps) - 1):])
        out[c] = row
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| model | configuration | SGD (ms) | K-FAC plain / cov / inverse (ms) | "
             "f_cov / f_inv | amortized K-FAC / SGD | measured / SGD | factors (MB) | "
             "inverses (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        for c, t in rows.items():
            measured = f"{t['measured'] / t['sgd']:.2f}" if "measured" in t else "—"
            lines.append(
                f"| {model} | {c} | {1e3 * t['sgd']:.1f} | {1e3 * t['plain']:.1f} / "
                f"{1e3 * t['cov']:.1f} / {1e3 * t['inv']:.1f} | {t['f_cov']:.3f} / "
                f"{t['f_inv']:.3f} | {t['amortized'] / t['sgd']:.2f} | {measured} | "
                f"{t['factors_bytes'] / 2**20:.2f} | {t['inverses_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--policy-steps", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn-wide"], choices=sorted(NETS))
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--grow", choices=["add1", "double"], default=None)
    parser.add_argument("--shrink", choices=["reset", "halve"], default=None)
    parser.add_argument("--max-interval", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.policy_steps < 1:
        parser.error("--repeats and --policy-steps must be >= 1")
    device = torch.device(args.device)
    adaptive = {k: v for k, v in (("alpha", args.alpha), ("grow", args.grow),
                                  ("shrink", args.shrink), ("max_interval", args.max_interval))
                if v is not None}
    torch.manual_seed(0)
    results = {m: measure(m, repeats=args.repeats, policy_steps=args.policy_steps,
                          device=device, adaptive=adaptive) for m in args.models}
    print(f"device={device}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}, policy steps={args.policy_steps}, "
          f"{AdaptiveRefresh(**adaptive)!r} (medians, interleaved)\n")
    print(table(results))


if __name__ == "__main__":
    main()
