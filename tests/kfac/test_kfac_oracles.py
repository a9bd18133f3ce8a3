"""Self-checks of the K-FAC test helpers' dense oracles."""

from __future__ import annotations

import torch
from _kfac_helpers import _call, dense_empirical_fisher, dense_ggn, flat_params
from torch import nn


def test_oracle_ggn_equals_hessian_for_linear_model_mse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    names, shapes, theta = flat_params(net)
    hess = torch.func.hessian(lambda t: nn.MSELoss()(_call(net, names, shapes, t, x), y))(theta)
    torch.testing.assert_close(dense_ggn(net, nn.MSELoss(), x, y), hess, rtol=1e-10, atol=1e-12)


def test_oracle_empirical_fisher_single_example_is_grad_outer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    names, shapes, theta = flat_params(net)
    g = torch.func.grad(lambda t: nn.CrossEntropyLoss()(_call(net, names, shapes, t, x), y))(theta)
    torch.testing.assert_close(
        dense_empirical_fisher(net, nn.CrossEntropyLoss(), x, y), torch.outer(g, g)
    )
