"""The three optimizer studies (auto-encoder, CNN, large batch; Muon in each): settings,
tables, claims and tiny end-to-end smoke runs (a few iterations; quality is not checked)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import curvlab.experiments.studies.autoencoder as ae
import curvlab.experiments.studies.cnn_classification as cnn
import curvlab.experiments.studies.large_batch as lb
from curvlab.experiments.harness.registry import get_experiment, make_context


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, device="cpu", progress=False)


def test_registered():
    for name in ("deep-autoencoder", "cnn-classification", "large-batch"):
        assert get_experiment(name).paper


def test_autoencoder_methods_scale_with_input_dim():
    methods = {m.label: m for m in ae.autoencoder_methods(64)}
    assert methods["SGD-momentum"].fixed["weight_decay"] == pytest.approx(1e-5 / 64)
    assert methods["K-FAC (block-diag, adaptive)"].fixed["damping"] == pytest.approx(150 / 64)
    assert methods["K-FAC (block-tridiag, adaptive)"].fixed["structure"] == "block-tridiagonal"
    assert methods["Adam"].tuned and not methods["CurveBall"].tuned
    assert {m.label for m in ae.autoencoder_methods(64) if m.first_order} == {
        "SGD-momentum", "Adam", "Muon"}
    assert methods["Muon"].optimizer == "muon" and methods["Muon"].tuned
    # CurveBall twice: the reference's default, and λ per example (λ = 1/D on this loss)
    assert "damping_units" not in methods["CurveBall"].fixed
    remedy = methods[ae.CURVEBALL_PER_EXAMPLE]
    assert remedy.fixed["damping_units"] == "example" and not remedy.tuned


def test_autoencoder_quick_problems(ctx):
    for name, dim in (("digits", 64), ("curves", 196)):
        p = ae.autoencoder_problem(name, ctx)
        assert p.data.task == "reconstruction" and p.data.input_shape == (dim,)
        assert p.data.num_train == ae.QUICK_TRAIN
        x = p.data.x_train[:2]
        assert p.model_factory()(x).shape == x.shape
    with pytest.raises(ValueError, match="unknown problem"):
        ae.autoencoder_problem("faces", ctx)


def test_cnn_quick_problems(ctx):
    for bn in (True, False):
        p = cnn.cnn_problem(bn, ctx)
        assert p.data.input_shape == (1, 8, 8)
        assert p.model_factory()(p.data.x_train[:3]).shape == (3, 10)
        assert p.iterations == math.ceil(cnn.QUICK_EPOCHS[bn] * 1500 / 128)
    labels = [m.label for m in cnn.cnn_methods(False)]
    assert labels[0] == "CurveBall (untuned)"
    assert cnn.cnn_methods(False)[0].fixed["lambd"] == 10.0


def test_scaling_table_and_claims():
    rows = []
    for method, iters in (("SGD", [100, 30, 20]), ("K-FAC", [50, 14, 3])):
        for b, it in zip((10, 40, 160), iters):
            rows += [{"method": method, "batch_size": b, "hp.lr": 0.1, "seed": 0,
                      "iters_to_target": float(it)},
                     {"method": method, "batch_size": b, "hp.lr": 1.0, "seed": 0,
                      "iters_to_target": math.nan if b == 160 else float(it + 5)}]
    table = lb.scaling_table(pd.DataFrame(rows))
    sgd = table[table["method"] == "SGD"].set_index("batch_size")
    assert sgd.loc[160.0, "ideal_iters"] == pytest.approx(100 * 10 / 160)
    assert sgd.loc[160.0, "fraction_reached"] == 0.5 and sgd.loc[10.0, "fraction_reached"] == 1
    claims = {c.name: c for c in lb._claims(table)}
    scaling = next(c for n, c in claims.items() if n.startswith("K-FAC does not scale"))
    assert not scaling.holds  # K-FAC speed-up 50/3 > SGD 100/20
    fewer = next(c for n, c in claims.items() if n.startswith("K-FAC needs fewer"))
    assert fewer.holds
    assert all(c.holds for n, c in claims.items() if "shrinks" in n)


def test_autoencoder_claims_on_synthetic_table():
    table = pd.DataFrame({
        "problem": "digits", "status": "ran", "diverged": False,
        "method": ["K-FAC (block-diag, adaptive)", "K-FAC (block-diag, fixed lr)", "CurveBall",
                   "SGD-momentum", "Adam", "Hessian-free"],
        "final_train_error": [1.0, 2.0, 4.0, 3.0, 2.5, 0.5]})
    ttt = pd.DataFrame({"problem": "digits", "target": 2.5, "seed": 0,
                        "method": ["K-FAC (block-diag, adaptive)", "Adam", "Hessian-free"],
                        "time_to_target_s": [3.0, 2.0, 1.0]})
    claims = ae._claims(table, ttt, ["digits"])
    verdict = {c.name.split("] ", 1)[1][:40]: c.holds for c in claims}
    assert verdict["after equal iterations K-FAC has a lower"] is True
    assert verdict["untuned CurveBall beats tuned SGD-moment"] is False
    wall = [c for c in claims if ae.WALL_CLOCK_TAG in c.name]
    assert [c.holds for c in wall] == [False, False]


def test_cnn_claims_keep_a_diverged_kfac():
    table = pd.DataFrame({
        "problem": "batchnorm", "status": "ran",
        "method": ["CurveBall (untuned)", "SGD-momentum", "Adam", "Muon", "K-FAC (KFC)"],
        "diverged": [False, False, False, False, True],
        "final_train_loss": [0.13, 0.13, 0.6, 0.01, 345.0], "train_time_s": 1.0})
    claims = {c.name: c for c in cnn._claims(table, ["batchnorm"])}
    kfac = [c for n, c in claims.items() if "K-FAC/KFC reaches" in n]
    assert len(kfac) == 2 and not any(c.holds for c in kfac)  # diverged: listed, not dropped
    assert all("diverged" in c.detail for c in kfac)
    muon = next(c for n, c in claims.items() if "CurveBall" in n and "tuned Muon" in n)
    assert not muon.holds


def test_large_batch_smoke(ctx, monkeypatch):
    monkeypatch.setattr(lb, "large_batch_settings", lambda full=False: {
        "batch_sizes": [32, 256], "target": 2.0, "max_iterations": 4, "eval_every": 1,
        "hidden": [8]})
    monkeypatch.setattr(lb, "large_batch_grids", lambda full=False: {
        "SGD": {"lr": [0.1], "momentum": [0.0, 0.9]}, "K-FAC": {"lr": [0.1], "damping": [0.1]},
        "Muon": {"lr": [0.03], "momentum": [0.95]}})
    out = lb.run_large_batch(ctx)
    assert all(f.exists() for f in out.figures)
    if "K-FAC: not run" not in out.notes:
        assert set(out.table["method"]) == {"SGD", "K-FAC", "Muon"}
    assert (ctx.out_dir / "large-batch" / "summary.csv").exists()


def test_autoencoder_smoke(ctx, monkeypatch):
    monkeypatch.setattr(ae, "QUICK_ITERATIONS", {"digits": 2, "curves": 2})
    out = ae.run_deep_autoencoder(ctx, problems=("digits",))
    ran = out.table[out.table["status"] == "ran"]
    assert {"SGD-momentum", "Adam"} <= set(ran["method"])
    assert len(out.table) == len(ae.autoencoder_methods(64))  # every method: ran or "not run"
    assert out.figures and out.figures[0].exists()
    assert out.claims


def test_cnn_smoke(ctx, monkeypatch):
    monkeypatch.setattr(cnn, "QUICK_EPOCHS", {True: 0.1, False: 0.1})
    out = cnn.run_cnn_classification(ctx, batch_norm=(True,))
    assert len(out.table) == len(cnn.cnn_methods(True))
    assert all(f.exists() for f in out.figures)
