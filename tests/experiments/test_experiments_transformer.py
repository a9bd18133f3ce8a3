"""The transformer LM study: model against dense float64 oracles, its parts, a tiny end-to-end
run (seconds; results are not checked for quality), resumability and the CSVs' provenance."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
from _oracles import all_names, dense_ggn, dense_hessian
from torch import nn

import curvlab
from curvlab.data import load_pydoc_topics
from curvlab.experiments.harness.registry import make_context
from curvlab.experiments.harness.runner import read_results
from curvlab.experiments.studies import transformer_lm as study
from curvlab.experiments.studies import transformer_lm_parts as parts
from curvlab.experiments.studies.transformer_lm_parts import (
    KINDS,
    LMMethod,
    build_stepper,
    curvature_probe,
)
from curvlab.func import linearize
from curvlab.linalg import DiagonalEstimate
from curvlab.problems import BLOCK_NAMES, block_of, causal_transformer, parameter_blocks

V, S = 3, 3


def tiny(tied: bool = False, layout: str = "ncs") -> nn.Module:
    """67 parameters: dense oracles in well under a second."""
    net = causal_transformer(V, S, width=2, depth=1, heads=1, mlp_ratio=1, tied=tied,
                             layout=layout, generator=torch.Generator().manual_seed(0))
    return net.double()


def batch(pad: bool = True, flat: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, S), generator=g)
    y = torch.randint(0, V, (3, S), generator=g)
    if pad:
        y[0, 1:] = -100
    return x, (y.reshape(-1) if flat else y)


@pytest.mark.parametrize(("tied", "layout"), [(False, "ncs"), (True, "flat")])
def test_ggn_and_hessian_match_dense_oracles(tied, layout):
    net, loss_fn = tiny(tied, layout), nn.CrossEntropyLoss()
    x, y = batch(flat=layout == "flat")
    names = all_names(net)
    for op, oracle in ((curvlab.GGN, dense_ggn), (curvlab.Hessian, dense_hessian)):
        dense = op(net, loss_fn, (x, y)).to_dense()
        torch.testing.assert_close(dense, oracle(net, loss_fn, x, y, names), rtol=1e-8,
                                   atol=1e-10)


def test_model_traces_with_fx_and_causality():
    net = tiny()
    x, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the functional engine warns
        lin = linearize(net, dict(net.named_parameters()), x)
    assert type(lin).__name__.startswith("Layerwise")
    # position t's logits do not depend on later tokens; shorter sequences work
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % V
    out, out2 = net(x), net(x2)
    torch.testing.assert_close(out[..., :-1], out2[..., :-1], rtol=0, atol=0)
    torch.testing.assert_close(net(x[:, :2]), out[..., :2], rtol=1e-12, atol=1e-12)


def test_blocks_and_validation():
    net = causal_transformer(V, S, width=4, depth=2, heads=2)
    blocks = parameter_blocks(net)
    assert list(blocks) == list(BLOCK_NAMES)
    listed = [n for names in blocks.values() for n in names]
    assert sorted(listed) == sorted(n for n, _ in net.named_parameters())
    assert "head" not in parameter_blocks(causal_transformer(V, S, width=4, heads=2, tied=True))
    with pytest.raises(ValueError, match="not part of a CausalTransformer"):
        block_of("encoder.weight")
    with pytest.raises(ValueError, match="divisible"):
        causal_transformer(V, S, width=6, heads=4)
    with pytest.raises(ValueError, match="layout"):
        causal_transformer(V, S, width=4, heads=2, layout="nsc")
    with pytest.raises(ValueError, match="depth"):
        causal_transformer(V, S, width=4, heads=2, depth=0)


def test_curvature_probe_against_dense(monkeypatch):
    net, loss_fn = tiny(), nn.CrossEntropyLoss()
    x, y = batch()
    names = all_names(net)
    p = sum(q.numel() for q in net.parameters())
    H, G = dense_hessian(net, loss_fn, x, y, names), dense_ggn(net, loss_fn, x, y, names)
    c = curvature_probe(net, loss_fn, (x, y), lanczos_iter=p, probes=32)
    assert c["hessian_top"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert c["ggn_top"] == pytest.approx(float(torch.linalg.eigvalsh(G)[-1]), rel=1e-8)
    for name, dense in (("hessian", H), ("ggn", G)):
        assert abs(c[f"{name}_trace"] - float(dense.trace())) < 5 * c[f"{name}_trace_se"]
    # block grouping, exactly: with the exact diagonal in place of the Hutchinson estimate
    monkeypatch.setattr(parts, "hutchinson_diagonal",
                        lambda op, **kw: DiagonalEstimate(op.diag(), None))
    c = curvature_probe(net, loss_fn, (x, y), lanczos_iter=4, probes=2)
    diag, start, exact, sizes = torch.diagonal(G), 0, {}, {}
    for name, q in net.named_parameters():
        b = block_of(name)
        exact[b] = exact.get(b, 0.0) + float(diag[start:start + q.numel()].sum())
        sizes[b] = sizes.get(b, 0) + q.numel()
        start += q.numel()
    assert set(exact) == set(BLOCK_NAMES)
    for b in exact:
        assert c[f"ggn_diag_{b}"] == pytest.approx(exact[b], rel=1e-8, abs=1e-12), b
        assert c[f"ggn_diag_mean_{b}"] == pytest.approx(exact[b] / sizes[b], rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_every_optimizer_kind_steps(kind):
    hp = {"adamw": {"lr": 1e-3}, "sgd": {"lr": 0.1}, "muon": {"lr": 0.02, "adamw_lr": 1e-3},
          "kfac-adamw": {"lr": 1e-3, "damping": 0.1}, "kfac-sgd": {"lr": 0.01, "damping": 0.1,
                                                                  "kl_clip": 1e-3},
          "curveball": {}}[kind]
    net = causal_transformer(V, S, width=4, depth=1, heads=2,
                             generator=torch.Generator().manual_seed(0))
    x, y = batch()
    before = [q.detach().clone() for q in net.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepper = build_stepper(kind, net, nn.CrossEntropyLoss(), hp)
        loss = stepper.step(x, y)
    assert math.isfinite(float(loss))
    assert any(not torch.equal(b, q) for b, q in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="kind"):
        LMMethod("x", "lbfgs")


def test_tiny_study_runs_end_to_end_and_resumes(tmp_path):
    ctx = make_context(tmp_path, device="cpu", progress=False)
    settings = study.tiny_settings()
    out = study.run_transformer_lm(ctx, settings, seeds=[0])
    labels = {m.label for m in study.lm_methods()}
    assert set(out.table["method"]) == labels
    assert out.table["iterations"].eq(settings.iterations).all()
    assert {c.name.split(" ")[0] for c in out.claims} >= {"Muon", "K-FAC", "Untuned"}
    assert any("edge of stability" in c.name for c in out.claims)
    assert any("GGN's top eigenvalue" in c.name for c in out.claims)
    assert {p.name for p in out.figures} == {"training_loss.png", "validation_loss.png",
                                             "curvature.png", "edge_of_stability.png"}
    assert all(p.exists() for p in out.figures)
    summary, trace = read_results(tmp_path, study.NAME)
    n_runs = sum(len(m.grid_points()) for m in study.lm_methods()) + len(settings.eos_lrs)
    assert len(summary) == n_runs
    assert {"git_commit", "torch_version", "device", "timestamp"} <= set(summary.columns)
    tracked = trace[trace["track"].eq(True)].dropna(subset=["hessian_top"])
    assert sorted(tracked["iteration"]) == [0, 2, 4]
    assert {f"ggn_diag_mean_{b}" for b in BLOCK_NAMES} <= set(trace.columns)
    eos = trace[trace["part"] == "eos"]
    assert list(eos["step"]) == [0, 2, 4] and (eos["two_over_lr"] == 20.0).all()
    again = study.run_transformer_lm(ctx, settings, seeds=[0])   # resumed: nothing re-run
    pd.testing.assert_frame_equal(again.table, out.table)
    assert len(read_results(tmp_path, study.NAME)[0]) == n_runs


def test_registered_and_quick_sizes():
    from curvlab.experiments import get_experiment

    assert get_experiment(study.NAME).paper
    assert study.QUICK.width in range(64, 129) and 2 <= study.QUICK.depth <= 4
    assert study.FULL.width >= study.QUICK.width and study.FULL.iterations > study.QUICK.iterations
    data = load_pydoc_topics(study.QUICK.context)
    assert data.num_classes == 256
