"""The kfac-anatomy experiment's building blocks (small and fast)."""

from __future__ import annotations

import torch

from curvlab.experiments.studies.kfac_anatomy import (
    commutation_matrix,
    compute_anatomy,
    exact_fisher_by_enumeration,
    inversion_costs,
    make_data,
    make_thor_net,
)
from curvlab.operators import GGN


def test_enumerated_true_fisher_equals_ggn():
    net = make_thor_net()
    x, y = make_data(8)
    ggn = GGN(net, torch.nn.CrossEntropyLoss(), (x, y)).to_dense()
    torch.testing.assert_close(exact_fisher_by_enumeration(net, x), ggn, rtol=1e-10, atol=1e-13)


def test_anatomy_shapes_and_single_example_identity():
    a = compute_anatomy(n=1)
    torch.testing.assert_close(a.kfac, a.block_diagonal(), rtol=1e-10, atol=1e-13)
    A1, G1 = a.factors["0"]
    assert A1.shape == (3, 3) and G1.shape == (4, 4)
    k = commutation_matrix(4, 3)
    torch.testing.assert_close(k @ torch.kron(A1, G1) @ k.T, torch.kron(G1, A1))


def test_inversion_cost_flops():
    costs = inversion_costs([3, 5], repeats=1)
    ratio = costs.flops_dense / costs.flops_kronecker
    expected = torch.tensor([54.0, 250.0], dtype=torch.float64)  # 2 w³
    torch.testing.assert_close(torch.tensor(ratio.to_numpy()), expected, rtol=1e-12, atol=0)
