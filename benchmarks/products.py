"""Cost of curvature-vector products relative to one gradient (not a test).

For an MLP (784-1000-500-250-10, tanh, batch 512) and a 3c3d-like CNN (conv64(5)-pool-conv96(3)-
pool-conv128(3)-pool-fc512-fc256-fc10, ReLU, 32x32x3 inputs, batch 128), prints the median time of
each product divided by the median time of one gradient (forward + backward) on the same model and
batch. All timings are interleaved in one process (each of ``--repeats`` rounds runs every product
once, in a freshly shuffled order), float32, default ``torch.get_num_threads()``. Matrix
products (K = 8 columns) are reported per column. Prints a markdown table with, per model, the
measured ratio, the floor by operation count (``benchmarks/flops.py``: multiply-adds of the
product / those of one gradient) and "vs floor" (measured / floor: 1 = at the arithmetic's floor).

    python benchmarks/products.py [--repeats 20] [--models mlp cnn] [--device cpu]
                                  [--threads N] [--clock wall|cpu]

``--clock cpu`` (with ``--threads 1``) measures process CPU time instead of wall-clock time: a
robust comparison on a shared, overloaded machine (it ignores time spent waiting for a core).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import flops  # benchmarks/flops.py: the operation-count floor
import torch
from _common import MODELS, sync  # benchmarks/_common.py: shared networks
from torch import nn

from curvlab.func import ggnvp, hessian_vector_product, linearize, loss_rule, select_params
from curvlab.operators import GGN, EmpiricalFisher, Fisher, Hessian

K = 8
LABELS = {"mlp": "MLP 784-1000-500-250-10, bs 512", "cnn": "3c3d CNN, bs 128"}


def products(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    loss_fn = nn.CrossEntropyLoss()
    params = select_params(model)
    names = list(params)
    leaves = list(params.values())
    v = [torch.randn_like(p) for p in leaves]
    data = (x, y)
    ops = {
        "GGN": GGN(model, loss_fn, data),
        "Hessian": Hessian(model, loss_fn, data),
        "MC Fisher": Fisher(model, loss_fn, data),
        "empirical Fisher": EmpiricalFisher(model, loss_fn, data),
    }
    p = ops["GGN"].shape[0]
    flat = torch.randn(p, device=x.device)
    mat = torch.randn(p, K, device=x.device)
    rule = loss_rule(loss_fn)
    primals = {n: t.detach() for n, t in params.items()}
    tangents = dict(zip(names, v, strict=True))

    def gradient():
        loss = loss_fn(model(x), y)
        torch.autograd.grad(loss, leaves)

    def torch_func_ggn():
        def f(p):
            return torch.func.functional_call(model, p, (x,))

        out, u = torch.func.jvp(f, (primals,), (tangents,))
        _, vjp_fn = torch.func.vjp(f, primals)
        return vjp_fn(rule.hessian_vp(out, y, u))

    def torch_func_hvp():
        def f(p):
            return loss_fn(torch.func.functional_call(model, p, (x,)), y)

        return torch.func.jvp(torch.func.grad(f), (primals,), (tangents,))[1]

    def linearize_ggn():
        lin = linearize(model, params, x)
        out = lin.output.detach()
        return lin.vjp(rule.hessian_vp(out, y, lin.jvp(v)), retain_graph=False)

    fns: dict[str, Callable] = {"gradient": gradient}
    for name, op in ops.items():
        fns[name] = lambda op=op: op @ flat
    fns["GGN (pure ggnvp)"] = lambda: ggnvp(model, loss_fn, None, x, y, v)
    fns["GGN (linearize, no checks)"] = linearize_ggn
    fns["Hessian (pure fn)"] = lambda: hessian_vector_product(model, loss_fn, None, x, y, v)
    fns["torch.func jvp-then-vjp GGN"] = torch_func_ggn
    fns["torch.func jvp(grad) Hessian"] = torch_func_hvp
    fns[f"GGN, K={K} per column"] = lambda: ops["GGN"] @ mat
    fns[f"Hessian, K={K} per column"] = lambda: ops["Hessian"] @ mat
    return fns


def measure(fns: dict[str, Callable], repeats: int, device: torch.device,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no product always runs right after another (cache/allocator bias)
        for name in order:
            fn = fns[name]
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    for k in med:
        if k.endswith("per column"):
            med[k] /= K
    return med


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    for name in args.models:
        model, shape, batch = MODELS[name]()
        model = model.to(device)
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        results[name] = measure(products(model, x, y), args.repeats, device, clock)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats, float32, {args.clock} clock; floor by op count: "
          "benchmarks/flops.py (multiply-adds / those of one gradient); vs floor = measured / "
          "floor; peers (curvlinops, BackPACK): benchmarks/peers.py\n")
    header = "| product (time / gradient time) | " + " | ".join(
        f"{LABELS.get(m, m)} | floor by op count | vs floor" for m in results) + " |"
    print(header)
    print("|---|" + "---:|---:|---:|" * len(results))
    rows = next(iter(results.values())).keys()
    for row in rows:
        cells = []
        for m in results:
            ratio = results[m][row] / results[m]["gradient"]
            floor = flops.floor_ratio(m, row, baseline="gradient")
            first = (f"{results[m]['gradient'] * 1e3:.1f} ms (1.00x)" if row == "gradient"
                     else f"{ratio:.2f}x")
            cells += [first, "" if math.isnan(floor) else f"{floor:.2f}x",
                      "" if math.isnan(floor) else f"{ratio / floor:.2f}"]
        print(f"| {row} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
