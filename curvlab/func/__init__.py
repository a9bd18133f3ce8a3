"""Pure curvature functions on ``torch.func``: loss-Hessian rules, linearization, products."""

from curvlab.func.linearize import Linearization, linearize
from curvlab.func.losses import (
    AutodiffLossRule,
    BCEWithLogitsRule,
    CrossEntropyRule,
    LossRule,
    MSERule,
    loss_rule,
)
from curvlab.func.params import flatten, select_params, unflatten
from curvlab.func.products import (
    empirical_fisher_vector_product,
    fisher_vector_product,
    ggn_vector_product,
    ggnvp,
    hessian_vector_product,
    hessian_vector_products,
    hvp,
)

__all__ = [
    "AutodiffLossRule",
    "BCEWithLogitsRule",
    "CrossEntropyRule",
    "Linearization",
    "LossRule",
    "MSERule",
    "empirical_fisher_vector_product",
    "fisher_vector_product",
    "flatten",
    "ggn_vector_product",
    "ggnvp",
    "hessian_vector_product",
    "hessian_vector_products",
    "hvp",
    "linearize",
    "loss_rule",
    "select_params",
    "unflatten",
]
