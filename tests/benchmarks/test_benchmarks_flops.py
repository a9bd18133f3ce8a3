"""The FLOP model of ``benchmarks/flops.py``: every count on tiny networks, worked by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import flops  # benchmarks/ is a folder of scripts, not a package

# Linear(3, 4) -> tanh -> Linear(4, 2), batch 5:
#   layer 1: m = 5·3·4 = 60, A 4×4 (3 + bias), G 4×4;  layer 2: m = 5·4·2 = 40, A 5×5, G 2×2
#   F = 100, Bw = 100, Bi = 40 (no input gradient of layer 1), B = 140, T = 140, P = 16 + 10
MLP = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _mlp():
    return flops.layer_shapes(MLP, (3,), 5)


def test_passes_by_hand():
    assert flops.passes(_mlp()) == {"F": 100, "Bw": 100, "Bi": 40, "B": 140, "T": 140, "P": 26}


def test_steps_and_products_by_hand():
    m = flops.step_macs(_mlp())
    assert m["SGD"] == 100 + 140 + 26
    assert m["SGD+momentum"] == 100 + 140 + 52
    assert m["gradient"] == 240
    assert m["GGN"] == 100 + 140 + 140  # forward, J v, Jᵀ(H_L J v)
    assert m["MC Fisher"] == m["GGN"]
    assert m["Hessian"] == 100 + 140 + 140 + 280  # forward-over-reverse
    assert m["CurveBall (no λ test)"] == 100 + 2 * 140 + 140 + 6 * 26
    assert m["CurveBall"] == pytest.approx(m["CurveBall (no λ test)"] + 100 / 5)
    assert m["HessianFree (10 CG)"] == 200 + 140 + 10 * 280


@pytest.mark.parametrize("inverse, refresh, precondition", [
    # refresh per factor size s: eigh 4.5 s³ MACs; factored + explicit inverse s³; Cholesky 0.5 s³
    # factor sizes 4, 4, 5, 2: Σ s³ = 64 + 64 + 125 + 8 = 261
    # precondition: layer 1 g²a + g a² = 16·4 + 4·16 = 128; layer 2 4·5 + 2·25 = 70
    ("eigen", 4.5 * 261, 2 * 198 + 4 * 4 + 2 * 5),
    ("factored", 5.5 * 261, 198),
    ("cholesky", 0.5 * 261, 198),
])
def test_kfac_parts_by_hand(inverse, refresh, precondition):
    parts = flops.kfac_parts(_mlp(), inverse)
    assert parts["sampled"] == 40  # stops at the layer outputs: input gradients of layer 2 only
    assert parts["factors"] == 5 * (16 + 16) + 5 * (25 + 4)
    assert parts["refresh"] == pytest.approx(refresh)
    assert parts["precondition"] == pytest.approx(precondition)


def test_kfac_amortized_step_and_floor():
    shapes = _mlp()
    parts = flops.kfac_parts(shapes, "factored")
    plain = 100 + 140 + parts["precondition"] + 2 * 26
    step = plain + (40 + 305) / 10 + parts["refresh"] / 100
    assert flops.kfac_step(shapes, 10, 100, "factored") == pytest.approx(step)
    assert flops.kfac_step(shapes, 1, 20, "factored") == pytest.approx(
        plain + 40 + 305 + parts["refresh"] / 20)


def test_split_dim_and_stats_fraction():
    # split_dim=2: A (5) -> blocks 2, 2, 1; A (4) and G (4) -> 2, 2; G (2) unsplit
    parts = flops.kfac_parts(_mlp(), "cholesky", split_dim=2)
    assert parts["factors"] == 5 * (8 + 8) + 5 * (9 + 4)
    assert parts["refresh"] == pytest.approx(0.5 * (16 + 16 + 17 + 8))
    # precondition with block-diagonal factors: Σ_blocks(g_b²)·a + g·Σ_blocks(a_b²)
    assert parts["precondition"] == pytest.approx((8 * 4 + 4 * 8) + (4 * 5 + 2 * 9))
    # stats_fraction=0.5: ⌈2.5⌉ = 3 of 5 examples
    assert flops.kfac_parts(_mlp(), "eigen", stats_fraction=0.5)["factors"] == 3 * (32 + 29)


def test_conv_layer_by_hand():
    # Conv2d(2, 3, 3, padding=1) on 4×4, batch 2: 16 positions, fan-in 2·9 = 18, 3 outputs
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(48, 5, bias=False))
    conv, fc = flops.layer_shapes(net, (2, 4, 4), 2)
    assert (conv.positions, conv.fan_in, conv.fan_out, conv.macs) == (16, 18, 3, 2 * 16 * 18 * 3)
    assert (fc.macs, fc.a_dim, fc.first) == (2 * 48 * 5, 48, False)
    parts = flops.kfac_parts([conv, fc], "eigen")
    assert parts["factors"] == 2 * 16 * (19**2 + 3**2) + 2 * (48**2 + 5**2)
    grouped = flops.layer_shapes(nn.Conv2d(4, 6, 1, groups=2), (4, 3, 3), 1)[0]
    assert (grouped.fan_in, grouped.fan_out, grouped.groups, grouped.macs) == (2, 3, 2, 9 * 12)


def test_benchmark_models_and_bad_input():
    for name in ("mlp", "cnn"):
        for cov, inv in flops.KFAC_CONFIGS:
            for inverse in flops.INVERSES:
                assert flops.kfac_floor(name, cov, inv, inverse) > 1
        assert flops.floor_ratio(name, "SGD") == 1.0
        assert flops.floor_ratio(name, "gradient", baseline="gradient") == 1.0
        assert math.isnan(flops.floor_ratio(name, "empirical Fisher"))
    with pytest.raises(ValueError, match="inverse"):
        flops.kfac_parts(_mlp(), "qr")
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        flops.layer_shapes(nn.Sequential(nn.Tanh()), (3,), 1)
