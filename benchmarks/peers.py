"""Our curvature products and K-FAC next to the peers', in one process (not a test).

Peers (each skipped, with the reason printed, when it does not import):

* curvlinops (``curvlinops-for-pytorch``): ``GGNLinearOperator``, ``HessianLinearOperator``,
  ``KFACLinearOperator`` (build and matvec);
* BackPACK (``backpack-for-pytorch``): ``ggn_vector_product_from_plist``,
  ``hessian_vector_product`` (its ``torchvision`` requirement is only imported by
  ``backpack.utils.examples``, so it runs without torchvision);
* ASDL (``asdfghjkl``, installed ``--no-deps``): ``KfacGradientMaker``;
* kfac-pytorch (``KFACPreconditioner``; not on the package index): imported from a source
  checkout via ``sys.path`` (``--kfac-pytorch``, default ``$KFAC_PYTORCH_SRC`` or
  ``/tmp/kfac-pytorch``: ``git archive`` of gpauloski/kfac-pytorch; its ``__init__`` reads
  its installed version, so the folder needs a ``kfac_pytorch-<v>.dist-info/METADATA`` with
  ``Name: kfac-pytorch`` and ``Version: <v>``).

Timing (``products.measure``: interleaved, shuffled order, medians over ``--repeats``) on the
benchmark models of ``_common`` in float32: products / one gradient (forward + backward), and
preconditioned steps (forward, backward, precondition, ``torch.optim.SGD`` step; ``--steps``
steps per timed call, so an interval of ``--intervals cov inv`` is amortized when ``--steps``
is a multiple of ``inv``) / one SGD step, at equal intervals and damping, empirical Fisher.

Agreement (float64, a tiny MLP and CNN): the same product or preconditioned gradient from us
and each peer, max relative difference; where conventions differ the table says which.

    python benchmarks/peers.py [--models mlp cnn] [--repeats 5] [--steps 20]
        [--intervals 1 20] [--damping 1e-2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _common import MODELS
from products import measure  # benchmarks/products.py: interleaved medians
from torch import nn

import curvlab
from curvlab.optim.preconditioner import KFACPreconditioner


def load_peers(kfac_src: str) -> tuple[dict[str, object], dict[str, str]]:
    """Import what installs: ``({peer: module}, {peer: reason it is skipped / where from})``."""
    mods: dict[str, object] = {}
    notes: dict[str, str] = {}
    for peer, name in (("curvlinops", "curvlinops"), ("BackPACK", "backpack"),
                       ("ASDL", "asdl")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mods[peer] = importlib.import_module(name)
        except Exception as err:  # any import failure: skip, say why
            notes[peer] = f"skipped: {type(err).__name__}: {err}"
    src = Path(kfac_src)
    if (src / "kfac" / "preconditioner.py").exists():
        sys.path.insert(0, str(src))
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")  # "NVIDIA Apex is not installed"
                mods["kfac-pytorch"] = importlib.import_module("kfac.preconditioner")
            notes["kfac-pytorch"] = f"imported from {src} via sys.path (not installed)"
        except Exception as err:
            notes["kfac-pytorch"] = f"skipped: {type(err).__name__}: {err}"
    else:
        notes["kfac-pytorch"] = f"skipped: no source checkout at {src} (--kfac-pytorch)"
    return mods, notes


# ---- products ------------------------------------------------------------------------------
def product_fns(mods: dict[str, object], model: nn.Module, x: torch.Tensor, y: torch.Tensor
                ) -> dict[str, Callable[[], object]]:
    """Name -> zero-argument callable; ``"gradient"`` is the baseline."""
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    v_list = [torch.randn_like(p) for p in params]
    v = torch.cat([t.reshape(-1) for t in v_list])
    data = (x, y)
    fns: dict[str, Callable[[], object]] = {
        "gradient": lambda: torch.autograd.grad(loss_fn(model(x), y), params)}
    ggn, hess = curvlab.GGN(model, loss_fn, data), curvlab.Hessian(model, loss_fn, data)
    fns["GGN matvec: curvlab"] = lambda: ggn @ v
    fns["Hessian matvec: curvlab"] = lambda: hess @ v
    kfac_ours = curvlab.KFAC(model, loss_fn, data, fisher="type2")
    fns["KFAC build (type-2): curvlab"] = lambda: curvlab.KFAC(model, loss_fn, data,
                                                                fisher="type2")
    fns["KFAC matvec: curvlab"] = lambda: kfac_ours @ v
    if "curvlinops" in mods:
        cl = mods["curvlinops"]
        kw = {"check_deterministic": False}
        g_op = cl.GGNLinearOperator(model, loss_fn, params, [data], **kw)
        h_op = cl.HessianLinearOperator(model, loss_fn, params, [data], **kw)
        fns["GGN matvec: curvlinops"] = lambda: g_op @ v
        fns["Hessian matvec: curvlinops"] = lambda: h_op @ v

        def kfac_cl():
            op = cl.KFACLinearOperator(model, loss_fn, params, [data], fisher_type="type-2",
                                       separate_weight_and_bias=False, **kw)
            op @ v  # curvlinops computes the factors lazily, on first use
            return op

        k_op = kfac_cl()
        fns["KFAC build (type-2): curvlinops"] = kfac_cl
        fns["KFAC matvec: curvlinops"] = lambda: k_op @ v
    if "BackPACK" in mods:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product

        def bp_ggn():
            out = model(x)
            return ggn_vector_product_from_plist(loss_fn(out, y), out, params, v_list)

        fns["GGN matvec: BackPACK"] = bp_ggn
        fns["Hessian matvec: BackPACK"] = lambda: hessian_vector_product(
            loss_fn(model(x), y), params, v_list)
    return fns


# ---- K-FAC preconditioned steps -------------------------------------------------------------
def kfac_steppers(mods: dict[str, object], build: Callable[[], nn.Module], x: torch.Tensor,
                  y: torch.Tensor, cov: int, inv: int, damping: float, lr: float = 1e-3
                  ) -> dict[str, Callable[[], None]]:
    """Name -> one training step (forward, backward, [precondition], SGD); ``"SGD"`` first."""
    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, Callable[[], None]] = {}

    def plain(net, pre=None):
        sgd = torch.optim.SGD(net.parameters(), lr=lr)

        def step():
            sgd.zero_grad()
            loss_fn(net(x), y).backward()
            if pre is not None:
                pre.step()
            sgd.step()
        return step

    out["SGD"] = plain(build())
    net = build()
    out["K-FAC eigen: curvlab"] = plain(net, KFACPreconditioner(
        net, loss_fn, damping=damping, cov_interval=cov, inv_interval=inv, inverse="eigen"))
    net = build()
    out["K-FAC factored: curvlab"] = plain(net, KFACPreconditioner(
        net, loss_fn, damping=damping, cov_interval=cov, inv_interval=inv, inverse="factored"))
    if "kfac-pytorch" in mods:
        net = build()
        out["K-FAC eigen: kfac-pytorch"] = plain(net, mods["kfac-pytorch"].KFACPreconditioner(
            net, factor_update_steps=cov, inv_update_steps=inv, damping=damping, kl_clip=1e30,
            lr=lr, loglevel=0))
    if "ASDL" in mods:
        asdl = mods["ASDL"]
        net = build()
        cfg = asdl.PreconditioningConfig(data_size=x.shape[0], damping=damping,
                                         curvature_upd_interval=cov,
                                         preconditioner_upd_interval=inv)
        gm = asdl.KfacGradientMaker(net, cfg, fisher_type="fisher_emp")
        sgd = torch.optim.SGD(net.parameters(), lr=lr)

        def asdl_step():
            sgd.zero_grad()
            dummy = gm.setup_model_call(net, x)
            gm.setup_loss_call(loss_fn, dummy, y)
            gm.forward_and_backward()
            sgd.step()
        out["K-FAC (damped factors): ASDL"] = asdl_step
    return out


# ---- agreement (float64) --------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _tiny(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        x = torch.randn(32, 12, generator=g)
    else:
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 5 * 5, 5))
        x = torch.randn(16, 2, 5, 5, generator=g)
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p, std=0.5)
    return net.double(), x.double(), torch.randint(0, 5, (x.shape[0],), generator=g)


def _precond_grads(make_pre, net, x, y, loss_fn, step_fn=None) -> torch.Tensor:
    pre = make_pre(net)
    net.zero_grad()
    if step_fn is not None:
        step_fn(pre)
    else:
        loss_fn(net(x), y).backward()
        pre.step()
    return _flat([p.grad for p in net.parameters()])


def agreement(mods: dict[str, object], damping: float) -> list[tuple[str, str, str, float, str]]:
    """Rows ``(model, quantity, peer, max relative difference to ours, note)``."""
    return [r for kind in ("mlp", "cnn") for r in _agreement_for(kind, mods, damping)]


def _agreement_for(kind: str, mods: dict[str, object], damping: float
                   ) -> list[tuple[str, str, str, float, str]]:
    rows = []
    loss_fn = nn.CrossEntropyLoss()
    net, x, y = _tiny(kind)
    params = list(net.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    v_list = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
    ours = {"GGN": curvlab.GGN(net, loss_fn, (x, y)) @ v,
            "Hessian": curvlab.Hessian(net, loss_fn, (x, y)) @ v,
            "KFAC (type-2)": curvlab.KFAC(net, loss_fn, (x, y), fisher="type2") @ v}
    if "curvlinops" in mods:
        cl, kw = mods["curvlinops"], {"check_deterministic": False}
        theirs = {
            "GGN": cl.GGNLinearOperator(net, loss_fn, params, [(x, y)], **kw) @ v,
            "Hessian": cl.HessianLinearOperator(net, loss_fn, params, [(x, y)], **kw) @ v,
            "KFAC (type-2)": cl.KFACLinearOperator(
                net, loss_fn, params, [(x, y)], fisher_type="type-2",
                separate_weight_and_bias=False, **kw) @ v}
        for q, t in theirs.items():
            rows.append((kind, q + " matvec", "curvlinops", _rel(t, ours[q]),
                         "separate_weight_and_bias=False (one [W|b] block, as ours)"
                         if q.startswith("KFAC") else ""))
    if "BackPACK" in mods:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product

        out = net(x)
        g = _flat(ggn_vector_product_from_plist(loss_fn(out, y), out, params, v_list))
        h = _flat(hessian_vector_product(loss_fn(net(x), y), params, v_list))
        rows.append((kind, "GGN matvec", "BackPACK", _rel(g, ours["GGN"]), ""))
        rows.append((kind, "Hessian matvec", "BackPACK", _rel(h, ours["Hessian"]), ""))
    # preconditioned gradients after one step (factors and inverse from this batch)
    ref_eigen = _precond_grads(lambda m: KFACPreconditioner(
        m, loss_fn, damping=damping, inverse="eigen", ema_decay=0.0), copy.deepcopy(net),
        x, y, loss_fn)
    ref_fact = _precond_grads(lambda m: KFACPreconditioner(
        m, loss_fn, damping=damping, inverse="factored", ema_decay=0.0),
        copy.deepcopy(net), x, y, loss_fn)
    if "kfac-pytorch" in mods:
        # kfac-pytorch's G is built from gradients of the mean loss, ours from N times them
        # (per-example scale): its (F/N² + λ)⁻¹ g = N² (F + N² λ)⁻¹ g, so we compare with
        # ours at damping N²·λ, times N².
        kp, n2 = mods["kfac-pytorch"], float(x.shape[0]) ** 2
        got = _precond_grads(lambda m: kp.KFACPreconditioner(
            m, factor_update_steps=1, inv_update_steps=1, damping=damping, kl_clip=1e30,
            lr=1.0, factor_decay=1e-12, inv_dtype=torch.float64, loglevel=0),
            copy.deepcopy(net), x, y, loss_fn)
        ref = n2 * _precond_grads(lambda m: KFACPreconditioner(
            m, loss_fn, damping=n2 * damping, inverse="eigen", ema_decay=0.0),
            copy.deepcopy(net), x, y, loss_fn)
        sizes = [p.numel() for p in params]
        for kind_cls, label in ((nn.Linear, "Linear"), (nn.Conv2d, "Conv2d")):
            ids = {id(p) for m in net.modules() if isinstance(m, kind_cls)
                   for p in m.parameters()}
            sel = [i for i, p in enumerate(params) if id(p) in ids]
            if not sel:
                continue
            a, b = got.split(sizes), ref.split(sizes)
            note = ("empirical Fisher, eigen; its λ = ours/N², result ×N²; factor_decay="
                    "1e-12 (its running average starts from I); kl_clip=1e30 (it always "
                    "clips)")
            if label == "Conv2d":
                note = ("differs: kfac-pytorch's Conv2d factors use another spatial "
                        "normalization (no single λ maps it to ours)")
            rows.append((kind, f"preconditioned gradient, {label} layers", "kfac-pytorch",
                         _rel(torch.cat([a[i] for i in sel]), torch.cat([b[i] for i in sel])),
                         note))
    if "ASDL" in mods:
        asdl = mods["ASDL"]

        def asdl_step(gm, net_):
            dummy = gm.setup_model_call(net_, x)
            gm.setup_loss_call(loss_fn, dummy, y)
            gm.forward_and_backward()

        m2 = copy.deepcopy(net)
        cfg = asdl.PreconditioningConfig(data_size=x.shape[0], damping=damping)
        got = _precond_grads(lambda m: asdl.KfacGradientMaker(m, cfg,
                                                               fisher_type="fisher_emp"),
                             m2, x, y, loss_fn, step_fn=lambda gm: asdl_step(gm, m2))
        rows.append((kind, "preconditioned gradient, factored", "ASDL", _rel(got, ref_fact),
                     "differs: ASDL's damping/scaling of the empirical factors is not "
                     "ours (tried π = 1 and G/N, G/N²: none match); vs ours eigen: "
                     f"{_rel(got, ref_eigen):.2e}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed K-FAC call")
    parser.add_argument("--intervals", type=int, nargs=2, default=[1, 20],
                        metavar=("COV", "INV"))
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--kfac-pytorch", default=os.environ.get("KFAC_PYTORCH_SRC",
                                                                 "/tmp/kfac-pytorch"))
    parser.add_argument("--quick", action="store_true",
                        help="check the script runs: batch 8, 2 steps per call")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    mods, notes = load_peers(args.kfac_pytorch)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats, float32")
    for peer in ("curvlinops", "BackPACK", "ASDL", "kfac-pytorch"):
        print(f"- {peer}: {notes.get(peer, 'imported')}")
    steps = 2 if args.quick else args.steps
    cov, inv = args.intervals
    print("\n| model | work | time / baseline | baseline |\n|---|---|---:|---|")
    for name in args.models:
        torch.manual_seed(0)
        model, shape, batch = MODELS[name]()
        batch = 8 if args.quick else batch
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        med = measure(product_fns(mods, model, x, y), args.repeats, device)
        for k, t in med.items():
            print(f"| {name} | {k} | {t / med['gradient']:.2f}x | gradient "
                  f"{1e3 * med['gradient']:.1f} ms |")
        init = MODELS[name]()[0].state_dict()

        def build(init=init, name=name):
            net = MODELS[name]()[0]
            net.load_state_dict(init)
            return net

        steppers = kfac_steppers(mods, build, x, y, cov, inv, args.damping)
        fns = {k: (lambda s=s: [s() for _ in range(steps)]) for k, s in steppers.items()}
        med = measure(fns, args.repeats, device)
        for k, t in med.items():
            work = k if k == "SGD" else (f"{k} + SGD, intervals {cov}/{inv}, damping "
                                         f"{args.damping:g}")
            print(f"| {name} | {work} | {t / med['SGD']:.2f}x | SGD step "
                  f"{1e3 * med['SGD'] / steps:.1f} ms |")
    print("\nAgreement with ours (float64, tiny MLP 12-16-5 and CNN; max relative difference):\n")
    print("| model | quantity | peer | rel. diff. | note |\n|---|---|---|---:|---|")
    for kind, q, peer, d, note in agreement(mods, args.damping):
        print(f"| {kind} | {q} | {peer} | {d:.2e} | {note} |")


if __name__ == "__main__":
    main()
