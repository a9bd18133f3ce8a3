r"""Operation-count floor of every benchmarked step: multiply-adds per step, per kind of work.

Not a timing. For a network, a batch size and a setting, counts the multiply-adds (MACs; one
MAC = one multiply + one add = 2 flops) of the matrix products a step cannot avoid, and divides
by the same count for the SGD step (or the gradient) on the same network and batch: the *floor*
of the measured ratio in ``optimizers.py`` / ``products.py`` / ``kfac_step.py``. A measured
ratio at its floor is as cheap as the arithmetic allows; "vs floor" = measured / floor.

Counted (``nn.Linear`` and ``nn.Conv2d`` only; activations, pooling, normalization, the loss
and bias additions are left out — elementwise, a few % at most on these networks). Per layer
with ``n`` examples, ``t`` output positions (1 for Linear, H_out·W_out for Conv2d), fan-in
``d_in`` (``C_in/groups·kh·kw`` for Conv2d) and ``d_out`` outputs, the layer's product costs
``m = n·t·d_in·d_out`` MACs:

* forward ``F = Σ m``; backward ``B = Bw + Bi`` with weight gradients ``Bw = Σ m`` and input
  gradients ``Bi = Σ m`` over every layer but the first (its input needs no gradient);
* tangent pass (forward-mode ``J v``): ``dW·a + W·da``, i.e. ``T = Bw + Bi``;
* SGD step ``F + B + P`` (``P`` parameters: the update), momentum ``+P``, Adam ``+4P``;
* gradient ``F + B``; GGN product ``F + T + B`` (forward, ``J v``, ``Jᵀ(H_L J v)``; the MC
  Fisher product the same); Hessian product ``F + B + T + 2B`` (forward-over-reverse:
  tangents of the forward and of both backward products);
* CurveBall ``F + 2T + B + 6P`` (one forward, tangents ``J z`` and ``J Δz``, one backward
  for ``Jᵀ(H_L J z + ∇L)``), plus ``F/lambda_interval`` for the λ test (a re-evaluation forward
  every ``lambda_interval = 5`` steps); HessianFree with ``c`` CG iterations
  ``2F + B + c(T + B)`` (gradient, ``c`` GGN products on one linearization, one forward for
  the reduction ratio);
* K-FAC (``fisher='mc'``, one sample) on a factor step: the sampled backward stops at the layer
  outputs, ``Bi`` (no weight-gradient products); factors ``A = aᵀa`` and ``G = gᵀg``:
  ``n_s·t·(a² + g²)`` with ``a = d_in (+1 for a bias)``, ``g = d_out`` per group and ``n_s =
  ⌈stats_fraction·n⌉``; with ``split_dim = k`` each factor is its block-diagonal part, so
  ``a² → Σ_blocks b²`` (and ``a³ → Σ b³`` below);
* K-FAC refresh per factor of size ``s``: ``inverse='eigen'`` one ``eigh``, counted as
  ``9 s³`` flops = 4.5 s³ MACs — Golub & Van Loan's count for the symmetric eigenvalues *and*
  eigenvectors (tridiagonal reduction 4/3 s³ + accumulating Q and the iterations); LAPACK's
  divide-and-conquer (``syevd``, what ``torch.linalg.eigh`` calls) does the same reduction and
  back-transformation (about 4/3 s³ + 2 s³ flops) and a D&C stage bounded by the same count, so
  9 s³ is the conventional, slightly pessimistic constant (a floor that is too high only makes
  "vs floor" look better: see the table's note); ``'factored'``: that ``eigh`` plus the explicit
  inverse ``(U/d)Uᵀ`` (s³ MACs); ``'cholesky'``: Cholesky (s³/3 flops) + the inverse from the
  factor (2 s³/3 flops) = s³ flops = 0.5 s³ MACs;
* K-FAC preconditioning per layer: ``'factored'``/``'cholesky'`` two products
  ``G⁻¹ V A⁻¹``: ``g²a + g a²``; ``'eigen'`` four (into and out of the eigenbasis) plus the
  elementwise division: ``2(g²a + g a²) + g a``; then the momentum update ``2P``.

Amortized K-FAC step = plain step + (sampled backward + factors)/cov_interval +
refresh/inv_interval (the benchmark settings: cov_interval=10, inv_interval=100 and 1/20).

    python benchmarks/flops.py [--models mlp cnn]
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass

import torch
from _common import MODELS  # benchmarks/_common.py: shared networks
from torch import nn

#: MACs of one symmetric eigendecomposition with eigenvectors, per s³ (9 s³ flops).
EIGH_MACS = 4.5
#: MACs of a Cholesky factorization + the inverse from it, per s³ (s³ flops).
CHOLESKY_MACS = 0.5
#: The two benchmarked K-FAC interval settings (cov_interval, inv_interval).
KFAC_CONFIGS: tuple[tuple[int, int], ...] = ((10, 100), (1, 20))
INVERSES = ("eigen", "factored", "cholesky")


@dataclass(frozen=True)
class LayerShape:
    """One Linear/Conv2d layer as the FLOP model sees it (sizes per group).

    Attributes:
        name: Module name. n: Batch size. positions: Output positions per example.
        fan_in: Inputs per output per group (``C_in/groups·kh·kw``; Linear: in_features).
        fan_out: Outputs per group. groups: Convolution groups (1 for Linear).
        bias: Whether the layer has a bias (adds a column to ``A``). first: No input gradient.
    """

    name: str
    n: int
    positions: int
    fan_in: int
    fan_out: int
    groups: int = 1
    bias: bool = True
    first: bool = False

    @property
    def macs(self) -> int:
        """Multiply-adds of the layer's forward product."""
        return self.n * self.positions * self.fan_in * self.fan_out * self.groups

    @property
    def a_dim(self) -> int:
        return self.fan_in + int(self.bias)

    @property
    def params(self) -> int:
        return self.groups * self.fan_out * self.a_dim


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> list[LayerShape]:
    """The Linear/Conv2d layers of ``model`` in forward order, from one forward at batch 1.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> [(s.fan_in, s.fan_out, s.first) for s in layer_shapes(net, (3,), 5)]
        [(3, 4, True), (4, 2, False)]
    """
    found: list[LayerShape] = []

    def hook(module: nn.Module, args, output) -> None:
        name = names[module]
        if isinstance(module, nn.Linear):
            positions = math.prod(output.shape[1:-1])
            found.append(LayerShape(name, batch, positions, module.in_features,
                                    module.out_features, 1, module.bias is not None,
                                    not found))
        else:
            g = module.groups
            fan_in = module.in_channels // g * math.prod(module.kernel_size)
            found.append(LayerShape(name, batch, math.prod(output.shape[2:]), fan_in,
                                    module.out_channels // g, g, module.bias is not None,
                                    not found))

    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    if not names:
        raise ValueError("benchmarks.flops.layer_shapes: the model has no nn.Linear/nn.Conv2d")
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
    return found


def _blocks(size: int, split_dim: int | None) -> list[int]:
    if split_dim is None or size <= split_dim:
        return [size]
    m, r = divmod(size, split_dim)
    return [split_dim] * m + ([r] if r else [])


def passes(shapes: list[LayerShape]) -> dict[str, float]:
    """MACs of the forward ``F``, backward ``B`` (``Bw`` + ``Bi``), tangent ``T``; ``P``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> passes(layer_shapes(net, (3,), 5))
        {'F': 100, 'Bw': 100, 'Bi': 40, 'B': 140, 'T': 140, 'P': 26}
    """
    f = sum(s.macs for s in shapes)
    bi = sum(s.macs for s in shapes if not s.first)
    return {"F": f, "Bw": f, "Bi": bi, "B": f + bi, "T": f + bi,
            "P": sum(s.params for s in shapes)}


def kfac_parts(shapes: list[LayerShape], inverse: str = "eigen", *, split_dim: int | None = None,
               stats_fraction: float = 1.0) -> dict[str, float]:
    """MACs of K-FAC's kinds of work: ``sampled`` backward, ``factors``, ``refresh``,
    ``precondition`` (see the module docstring for each count).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> kfac_parts(layer_shapes(net, (3,), 5), "factored")
        {'sampled': 40, 'factors': 305.0, 'refresh': 1435.5, 'precondition': 198.0}
    """
    if inverse not in INVERSES:
        raise ValueError(f"benchmarks.flops.kfac_parts: inverse must be one of {INVERSES}, "
                         f"got {inverse!r}")
    if not 0 < stats_fraction <= 1:
        raise ValueError(f"benchmarks.flops.kfac_parts: stats_fraction must be in (0, 1], got "
                         f"{stats_fraction}")
    per_cube = {"eigen": EIGH_MACS, "factored": EIGH_MACS + 1.0, "cholesky": CHOLESKY_MACS}
    factors = refresh = precondition = 0.0
    for s in shapes:
        rows = math.ceil(stats_fraction * s.n) * s.positions
        a_blocks, g_blocks = _blocks(s.a_dim, split_dim), _blocks(s.fan_out, split_dim)
        a_sq, g_sq = sum(b * b for b in a_blocks), sum(b * b for b in g_blocks)
        cube = sum(b**3 for b in a_blocks) + sum(b**3 for b in g_blocks)
        a, g = s.a_dim, s.fan_out
        two = g_sq * a + g * a_sq  # G⁻¹ V and V A⁻¹ with (block-diagonal) factors
        factors += s.groups * rows * (a_sq + g_sq)
        refresh += s.groups * per_cube[inverse] * cube
        precondition += s.groups * (2 * two + g * a if inverse == "eigen" else two)
    return {"sampled": passes(shapes)["Bi"], "factors": factors, "refresh": refresh,
            "precondition": precondition}


def kfac_step(shapes: list[LayerShape], cov_interval: int, inv_interval: int,
              inverse: str = "eigen", **options) -> float:
    """Amortized MACs of one K-FAC step (``KFACOptimizer(fisher='mc', momentum)``)."""
    p, k = passes(shapes), kfac_parts(shapes, inverse, **options)
    return (p["F"] + p["B"] + k["precondition"] + 2 * p["P"]
            + (k["sampled"] + k["factors"]) / cov_interval + k["refresh"] / inv_interval)


def step_macs(shapes: list[LayerShape]) -> dict[str, float]:
    """MACs of the steps and products the benchmark tables time (keys = their row names)."""
    p = passes(shapes)
    f, b, t, n = p["F"], p["B"], p["T"], p["P"]
    ggn = f + t + b
    out = {
        "SGD": f + b + n, "SGD+momentum": f + b + 2 * n, "Adam": f + b + 4 * n,
        "CurveBall": f + 2 * t + b + 6 * n + f / 5, "CurveBall (no λ test)": f + 2 * t + b + 6 * n,
        "HessianFree (10 CG)": 2 * f + b + 10 * (t + b),
        "gradient": f + b, "GGN": ggn, "Hessian": f + b + t + 2 * b, "MC Fisher": ggn,
    }
    for inverse in INVERSES:
        for cov, inv in KFAC_CONFIGS:
            out[f"K-FAC {inverse} {cov}/{inv}"] = kfac_step(shapes, cov, inv, inverse)
    out["SGD+momentum (K-FAC baseline)"] = out["SGD+momentum"]
    return out


#: products.py row name -> the step_macs key whose count it has (None: not modelled).
PRODUCT_ROWS: dict[str, str | None] = {
    "gradient": "gradient", "GGN": "GGN", "Hessian": "Hessian", "MC Fisher": "MC Fisher",
    "empirical Fisher": None, "GGN (pure ggnvp)": "GGN", "GGN (linearize, no checks)": "GGN",
    "Hessian (pure fn)": "Hessian", "torch.func jvp-then-vjp GGN": "GGN",
    "torch.func jvp(grad) Hessian": "Hessian", "GGN, K=8 per column": "GGN",
    "Hessian, K=8 per column": "Hessian",
}


@functools.lru_cache(maxsize=16)
def _cached_shapes(model_name: str, builder: object) -> tuple[LayerShape, ...]:
    model, shape, batch = MODELS[model_name]()
    return tuple(layer_shapes(model, shape, batch))


def _shapes(model_name: str) -> list[LayerShape]:
    return list(_cached_shapes(model_name, MODELS[model_name]))


def floor_ratio(model_name: str, row: str, baseline: str = "SGD") -> float:
    """Floor by operation count of a table row: its MACs / the baseline's (``nan`` when the
    row is not modelled, or the network has no Linear/Conv2d)."""
    key = PRODUCT_ROWS.get(row, row)
    try:
        macs = step_macs(_shapes(model_name))
    except ValueError:
        return math.nan
    if key is None or key not in macs:
        return math.nan
    return macs[key] / macs[baseline]


def kfac_floor(model_name: str, cov_interval: int, inv_interval: int, inverse: str = "eigen",
               **options) -> float:
    """Floor of the amortized K-FAC step / the SGD-with-momentum step (``kfac_step.py``'s
    baseline) by operation count."""
    shapes = _shapes(model_name)
    sgd = passes(shapes)
    return kfac_step(shapes, cov_interval, inv_interval, inverse, **options) / (
        sgd["F"] + sgd["B"] + 2 * sgd["P"])


def floor_rows(model_name: str) -> list[dict[str, object]]:
    """One row per setting (model, setting, MACs, floor ratio to the SGD step), incl. the
    K-FAC options ``split_dim`` (128, 512) and ``stats_fraction`` (1/8)."""
    shapes = _shapes(model_name)
    macs = step_macs(shapes)
    rows = [{"model": model_name, "setting": k, "gmacs": v / 1e9,
             "floor": v / macs["gradient" if k in PRODUCT_ROWS else "SGD"]}
            for k, v in macs.items() if not k.endswith("(K-FAC baseline)")]
    sgdm = macs["SGD+momentum"]
    for inverse in INVERSES:
        for split in (128, 512):
            for cov, inv in KFAC_CONFIGS:
                v = kfac_step(shapes, cov, inv, inverse, split_dim=split)
                rows.append({"model": model_name, "gmacs": v / 1e9, "floor": v / macs["SGD"],
                             "setting": f"K-FAC {inverse} {cov}/{inv} split_dim={split}"})
    for cov, inv in KFAC_CONFIGS:
        v = kfac_step(shapes, cov, inv, "eigen", stats_fraction=1 / 8)
        rows.append({"model": model_name, "gmacs": v / 1e9, "floor": v / macs["SGD"],
                     "setting": f"K-FAC eigen {cov}/{inv} stats_fraction=1/8"})
    for r in rows:
        if str(r["setting"]).startswith("K-FAC"):
            r["floor_vs_sgd_momentum"] = r["gmacs"] * 1e9 / sgdm
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
    args = parser.parse_args(argv)
    print("Floor by operation count (MACs; eigh = 9 s³ flops, Cholesky + inverse = s³ flops); "
          "products relative to one gradient, steps to one SGD step (K-FAC also to "
          "SGD+momentum, kfac_step.py's baseline)\n")
    print("| model | setting | GMAC | floor | K-FAC floor vs SGD+momentum |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        for r in floor_rows(name):
            extra = f"{r['floor_vs_sgd_momentum']:.3f}x" if "floor_vs_sgd_momentum" in r else ""
            print(f"| {name} | {r['setting']} | {r['gmacs']:.3f} | {r['floor']:.3f}x | {extra} |")


if __name__ == "__main__":
    main()
