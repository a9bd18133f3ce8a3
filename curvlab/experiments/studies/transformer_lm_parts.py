"""Building blocks of the transformer language-model study (:mod:`.transformer_lm`).

* :class:`LMSettings`: sizes of one run (data, model, budget, curvature probes);
* :class:`LMMethod` and :func:`build_stepper`: the compared optimizers, each wrapped as an object
  with ``step(inputs, targets) -> loss`` (AdamW; Muon on the 2-D hidden weight matrices with
  AdamW on the rest; K-FAC as a preconditioner under AdamW or SGD-momentum; CurveBall);
* :func:`curvature_probe`: top Hessian and GGN eigenvalues (Lanczos), their Hutchinson traces,
  and the GGN diagonal estimate grouped by parameter block, on one fixed batch;
* :func:`train_lm`: the training loop (trace rows at evaluation points; optimizer wall-clock
  only, evaluation and curvature excluded; optional curvature rows at checkpoints).

Losses are ``nn.CrossEntropyLoss(ignore_index=-100)``: the mean over non-ignored next-token
positions, in nats per token.

Example:
    >>> m = LMMethod("AdamW", "adamw", {"weight_decay": 0.0}, {"lr": [1e-3, 3e-3]})
    >>> m.configs()
    [{'weight_decay': 0.0, 'lr': 0.001}, {'weight_decay': 0.0, 'lr': 0.003}]
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import curvlab
from curvlab.data import Dataset
from curvlab.experiments.harness.muon import MuonAdamW
from curvlab.linalg import hutchinson_diagonal, hutchinson_trace, lanczos
from curvlab.problems.transformer import block_of

__all__ = ["KINDS", "LMMethod", "LMSettings", "build_stepper", "curvature_probe",
           "edge_of_stability", "train_lm"]

#: Optimizer kinds understood by :func:`build_stepper`.
KINDS: tuple[str, ...] = ("adamw", "muon", "kfac-adamw", "kfac-sgd", "sgd", "curveball")


@dataclass(frozen=True)
class LMSettings:
    """Sizes of the study (quick and full presets live in :mod:`.transformer_lm`).

    Attributes:
        context, width, depth, heads: Data and model sizes (byte-level vocabulary, 256).
        batch: Sequences per optimizer step; ``iterations``, ``eval_every``: budget.
        eval_train, eval_val: Sequences used to evaluate training / validation loss
            (``None`` = all); fixed subsets.
        curv_batch: Sequences of the fixed curvature batch; ``curv_at``: fractions of
            ``iterations`` at which the tracked run is probed; ``lanczos_iter``/``probes``:
            Lanczos steps and Hutchinson probes per measurement.
        eos_batch, eos_steps, eos_every, eos_lrs, eos_lanczos_iter: full-batch GD on
            ``eos_batch`` fixed sequences, top Hessian eigenvalue of that loss every
            ``eos_every`` steps (warm-started Lanczos) for each fixed learning rate.
    """

    context: int = 32
    width: int = 64
    depth: int = 2
    heads: int = 4
    batch: int = 32
    iterations: int = 100
    eval_every: int = 10
    eval_train: int | None = 128
    eval_val: int | None = 128
    curv_batch: int = 8
    curv_at: tuple[float, ...] = (0.0, 0.5, 1.0)
    lanczos_iter: int = 15
    probes: int = 16
    eos_batch: int = 8
    eos_steps: int = 200
    eos_every: int = 20
    eos_lrs: tuple[float, ...] = (0.02, 0.05)
    eos_lanczos_iter: int = 8


@dataclass(frozen=True)
class LMMethod:
    """A compared optimizer: label, :data:`KINDS` entry, fixed kwargs, tuning grid."""

    label: str
    kind: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LMMethod {self.label!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points (``[{}]`` when untuned)."""
        names = list(self.grid)
        return [dict(zip(names, v)) for v in itertools.product(*(self.grid[n] for n in names))]

    def configs(self) -> list[dict[str, Any]]:
        """Fixed kwargs merged with every grid point."""
        return [{**self.fixed, **p} for p in self.grid_points()]


class _TorchStepper:
    """``step(x, y)``: zero grads, loss, backward, optional K-FAC preconditioning, step."""

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizers: list[torch.optim.Optimizer],
                 preconditioner: Any = None) -> None:
        self.model, self.loss_fn, self.optimizers = model, loss_fn, optimizers
        self.preconditioner = preconditioner

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        if self.preconditioner is not None:
            self.preconditioner.step()
        for opt in self.optimizers:
            opt.step()
        return loss.detach()


def _adamw(params: Any, hp: Mapping[str, Any], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(hp.get("beta1", 0.9), hp.get("beta2", 0.95)),
                             weight_decay=hp.get("weight_decay", 0.0))


def build_stepper(kind: str, model: nn.Module, loss_fn: Callable, hp: Mapping[str, Any]) -> Any:
    """Optimizer ``kind`` on ``model`` with flat hyperparameters ``hp``.

    ``adamw``: ``lr``, ``weight_decay``, ``beta1``/``beta2`` (default 0.9/0.95). ``muon``:
    ``torch.optim.Muon`` (``lr``, ``weight_decay``, ``momentum``) on every 2-D weight inside the
    blocks (attention and MLP matrices), AdamW (``adamw_lr``) on embeddings, head, biases and
    LayerNorm. ``kfac-adamw``/``kfac-sgd``: ``curvlab.KFACPreconditioner`` (``damping``,
    ``fisher``, ``inv_interval``, ``kl_clip``) rewrites the gradients of the layers it
    registers, then AdamW (``lr``...) or SGD (``lr``, ``momentum``) steps; unregistered
    parameters keep the plain gradient. ``sgd``: SGD (``lr``, ``momentum``). ``curveball``:
    ``curvlab.optim.CurveBall`` with its defaults (plus ``lr`` if given).

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> s = build_stepper("sgd", net, torch.nn.MSELoss(), {"lr": 0.1})
        >>> float(s.step(torch.ones(4, 3), torch.zeros(4, 2))) >= 0
        True
    """
    hp = dict(hp)
    if kind == "adamw":
        return _TorchStepper(model, loss_fn, [_adamw(model.parameters(), hp, hp["lr"])])
    if kind == "sgd":
        return _TorchStepper(model, loss_fn, [torch.optim.SGD(
            model.parameters(), lr=hp["lr"], momentum=hp.get("momentum", 0.0))])
    if kind == "muon":
        hidden = [p for n, p in model.named_parameters()
                  if p.ndim == 2 and n.startswith("blocks.")]
        opt = MuonAdamW(model.parameters(), lr=hp["lr"], muon_params=hidden,
                        momentum=hp.get("momentum", 0.95),
                        weight_decay=hp.get("weight_decay", 0.0), adamw_lr=hp["adamw_lr"],
                        adamw_betas=(hp.get("beta1", 0.9), hp.get("beta2", 0.95)))
        return _TorchStepper(model, loss_fn, [opt])
    if kind in ("kfac-adamw", "kfac-sgd"):
        pre = curvlab.KFACPreconditioner(
            model, loss_fn, damping=hp["damping"], fisher=hp.get("fisher", "empirical"),
            inv_interval=hp.get("inv_interval", 20), kl_clip=hp.get("kl_clip"),
            lr=hp["lr"] if hp.get("kl_clip") is not None else None)
        opt = (_adamw(model.parameters(), hp, hp["lr"]) if kind == "kfac-adamw" else
               torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp.get("momentum", 0.9)))
        return _TorchStepper(model, loss_fn, [opt], pre)
    if kind == "curveball":
        return curvlab.optim.CurveBall(model, loss_fn, **hp)
    raise ValueError(f"build_stepper: unknown kind {kind!r}; known: {KINDS}")


def _lanczos_top(op: Any, num_iter: int, seed: int, v0: Tensor | None = None
                 ) -> tuple[float, Tensor]:
    num_iter = min(num_iter, op.shape[0])
    res = lanczos(op, k=1, num_iter=num_iter, v0=v0,
                  generator=torch.Generator(device="cpu").manual_seed(seed))
    return float(res.eigenvalues[-1]), res.eigenvectors[:, -1]


def curvature_probe(model: nn.Module, loss_fn: Callable, batch: tuple[Tensor, Tensor], *,
                    lanczos_iter: int = 15, probes: int = 16, seed: int = 0) -> dict[str, float]:
    """Curvature of ``loss_fn`` (mean over tokens) at the model's parameters on ``batch``.

    Returns ``hessian_top``/``ggn_top`` (largest Ritz value of ``lanczos_iter`` Lanczos steps:
    a lower bound on λ_max that is tight once converged), ``hessian_trace``/``ggn_trace``
    (Hutchinson, ``probes`` Rademacher probes; ``*_trace_se`` their standard errors) and, per
    block ``b`` of :func:`curvlab.problems.transformer.block_of`, ``ggn_diag_<b>`` (the
    Hutchinson diagonal estimate of the GGN summed over the block: an unbiased estimate of the
    block's trace from the same probes) and ``ggn_diag_mean_<b>`` (divided by its size).

    Example:
        >>> from curvlab.problems.transformer import causal_transformer
        >>> net = causal_transformer(5, 4, width=8, depth=1, heads=2,
        ...                          generator=torch.Generator().manual_seed(0))
        >>> x = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(1))
        >>> c = curvature_probe(net, torch.nn.CrossEntropyLoss(), (x, x), lanczos_iter=5,
        ...                     probes=4)
        >>> c["ggn_top"] > 0 and c["ggn_diag_mlp"] > 0
        True
    """
    H = curvlab.Hessian(model, loss_fn, batch)
    G = curvlab.GGN(model, loss_fn, batch)
    out: dict[str, float] = {}
    out["hessian_top"], _ = _lanczos_top(H, lanczos_iter, seed)
    out["ggn_top"], _ = _lanczos_top(G, lanczos_iter, seed)
    for name, op in (("hessian", H), ("ggn", G)):
        tr = hutchinson_trace(op, num_samples=probes,
                              generator=torch.Generator().manual_seed(seed + 1))
        out[f"{name}_trace"] = float(tr.estimate)
        out[f"{name}_trace_se"] = float(tr.standard_error)
    diag = hutchinson_diagonal(G, num_samples=probes,
                               generator=torch.Generator().manual_seed(seed + 2)).estimate
    sums: dict[str, list[float]] = {}
    start = 0
    for pname, shape in zip(G.param_names, G.param_shapes):
        size = math.prod(shape)
        entry = sums.setdefault(block_of(pname), [0.0, 0.0])
        entry[0] += float(diag[start:start + size].sum())
        entry[1] += size
        start += size
    for block, (total, size) in sums.items():
        out[f"ggn_diag_{block}"] = total
        out[f"ggn_diag_mean_{block}"] = total / size
    return out


@torch.no_grad()
def _loss(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, chunk: int = 256) -> float:
    """Mean loss over the non-ignored target tokens of ``(x, y)`` (chunks weighted by count)."""
    was = model.training
    model.eval()
    try:
        ignore = getattr(loss_fn, "ignore_index", -100)
        total, count = 0.0, 0
        for s in range(0, x.shape[0], chunk):
            xb, yb = x[s:s + chunk], y[s:s + chunk]
            n = int((yb != ignore).sum())
            if n:
                total += float(loss_fn(model(xb), yb)) * n
                count += n
        return total / max(count, 1)
    finally:
        model.train(was)


def _subset(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.to(x.device)], y[idx.to(x.device)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_lm(make_stepper: Callable[[nn.Module], Any], model_factory: Callable[[], nn.Module],
             data: Dataset, loss_fn: Callable, s: LMSettings, *, seed: int = 0,
             curvature: bool = False, divergence: float = 3.0,
             ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train ``model_factory()`` (seeded) with mini-batches of ``s.batch`` random sequences.

    Returns ``(summary, trace, curvature_rows)``: trace rows at iterations ``0, eval_every, ...,
    iterations`` with ``iteration``, ``time_s`` (optimizer wall-clock, CUDA synchronized),
    ``train_loss``/``val_loss`` (fixed evaluation subsets), ``minibatch_loss``; curvature rows
    (when ``curvature``) at the checkpoints ``s.curv_at`` on the fixed batch of ``s.curv_batch``
    training sequences (:func:`curvature_probe`). A run stops as diverged when a loss is not
    finite or exceeds ``divergence`` × the initial training loss.
    """
    device = data.device
    xtr, ytr = data.train
    x_eval, y_eval = _subset(xtr, ytr, s.eval_train, 1)
    x_val, y_val = _subset(*data.test, s.eval_val, 2)
    curv_batch = _subset(xtr, ytr, s.curv_batch, 3)
    checkpoints = {round(f * s.iterations) for f in s.curv_at} if curvature else set()
    torch.manual_seed(seed)
    model = model_factory().to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stepper = make_stepper(model)
    gen = torch.Generator().manual_seed(seed)
    trace: list[dict[str, Any]] = []
    curv: list[dict[str, Any]] = []
    elapsed, recent, diverged, k = 0.0, [], False, 0

    def log(k: int) -> float:
        train_loss = _loss(model, loss_fn, x_eval, y_eval)
        trace.append({"iteration": k, "time_s": elapsed, "train_loss": train_loss,
                      "val_loss": _loss(model, loss_fn, x_val, y_val),
                      "minibatch_loss": sum(recent) / len(recent) if recent else math.nan})
        recent.clear()
        if k in checkpoints:
            curv.append({"iteration": k, **curvature_probe(
                model, loss_fn, curv_batch, lanczos_iter=s.lanczos_iter, probes=s.probes)})
        return train_loss

    initial = log(0)
    while k < s.iterations:
        idx = torch.randint(0, xtr.shape[0], (s.batch,), generator=gen).to(device)
        _sync(device)
        start = time.perf_counter()
        loss = float(stepper.step(xtr[idx], ytr[idx]))
        _sync(device)
        elapsed += time.perf_counter() - start
        k += 1
        recent.append(loss)
        if k % s.eval_every == 0 or k == s.iterations or not math.isfinite(loss):
            current = log(k)
            finite = math.isfinite(loss) and math.isfinite(current)
            if not finite or current > divergence * initial:
                diverged = True
                break
    last = trace[-1]
    summary = {"iterations": k, "train_time_s": elapsed, "final_train_loss": last["train_loss"],
               "final_val_loss": last["val_loss"],
               "best_val_loss": min((r["val_loss"] for r in trace if math.isfinite(r["val_loss"])),
                                    default=math.nan),
               "diverged": diverged, "n_warnings": len(caught),
               "first_warning": str(caught[0].message)[:200] if caught else ""}
    return summary, trace, curv


def edge_of_stability(model_factory: Callable[[], nn.Module], data: Dataset, loss_fn: Callable,
                      s: LMSettings, lr: float, *, seed: int = 0) -> list[dict[str, Any]]:
    """Full-batch gradient descent at a fixed ``lr`` on ``s.eos_batch`` fixed training sequences.

    Every ``s.eos_every`` steps (and at 0 and at the end): ``step``, ``loss`` on that batch and
    ``hessian_top``, the largest Ritz value of ``s.eos_lanczos_iter`` Lanczos steps on the
    Hessian of the same loss, warm-started from the previous top Ritz vector, next to
    ``two_over_lr = 2 / lr`` (the stability threshold of GD on a quadratic).

    Example:
        >>> from curvlab.data import load_pydoc_topics
        >>> from curvlab.problems.transformer import causal_transformer
        >>> s = LMSettings(context=8, width=8, depth=1, heads=2, eos_batch=2, eos_steps=2,
        ...                eos_every=1, eos_lanczos_iter=3)
        >>> rows = edge_of_stability(lambda: causal_transformer(256, 8, width=8, depth=1,
        ...     heads=2), load_pydoc_topics(8), torch.nn.CrossEntropyLoss(), s, lr=0.1)
        >>> [r["step"] for r in rows], rows[0]["two_over_lr"]
        ([0, 1, 2], 20.0)
    """
    batch = _subset(*data.train, s.eos_batch, 4)
    torch.manual_seed(seed)
    model = model_factory().to(data.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rows: list[dict[str, Any]] = []
    v0: Tensor | None = None
    for step in range(s.eos_steps + 1):
        if step % s.eos_every == 0 or step == s.eos_steps:
            top, v0 = _lanczos_top(curvlab.Hessian(model, loss_fn, batch), s.eos_lanczos_iter,
                                   seed, v0)
            rows.append({"step": step, "loss": _loss(model, loss_fn, *batch),
                         "hessian_top": top, "two_over_lr": 2.0 / lr})
        if step == s.eos_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch[0]), batch[1])
        if not math.isfinite(float(loss.detach())):
            break
        loss.backward()
        opt.step()
    return rows
