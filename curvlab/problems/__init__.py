"""Test problems and network builders for second-order optimisation research.

Toy problems with known curvature (stochastic Rosenbrock, Rahimi–Recht degenerate linear net,
DeepOBS ``quadratic_deep`` and noisy 2-D functions) plus ``nn.Sequential`` network builders.
Every problem exposes a model, a ``loss_fn(output, target)`` and data, so a curvature operator
can be built as ``Op(model, loss_fn, (inputs, targets))``.

Example:
    >>> import torch
    >>> from curvlab.problems import make_quadratic_deep
    >>> prob = make_quadratic_deep()
    >>> x, t = prob.dataset.train
    >>> float(prob.loss_fn(prob.model(x), t).detach()) > 0
    True
"""

from curvlab.problems.losses import (
    bernoulli_nll_loss,
    mean_output_loss,
    reconstruction_sq_error,
    sum_of_squares_loss,
)
from curvlab.problems.networks import (
    autoencoder,
    basic_cifar_net,
    benchmark_mlp,
    cnn_3c3d,
    reset_parameters_,
    small_cnn,
    small_mlp,
    sparse_init_,
)
from curvlab.problems.quadratic import (
    QUADRATIC_DEEP_DIM,
    QuadraticDeepModel,
    QuadraticDeepProblem,
    QuadraticLoss,
    haar_orthogonal,
    make_quadratic_deep,
    quadratic_deep_eigenvalues,
)
from curvlab.problems.rahimi_recht import (
    RAHIMI_RECHT_TOLERANCE,
    RahimiRechtProblem,
    make_rahimi_recht,
)
from curvlab.problems.rosenbrock import (
    ROSENBROCK_MINIMUM,
    ROSENBROCK_START,
    ROSENBROCK_TOLERANCE,
    RosenbrockResidualModel,
    StochasticRosenbrock,
    deterministic_rosenbrock,
    rosenbrock,
    rosenbrock_gradient,
    rosenbrock_residuals,
)
from curvlab.problems.transformer import (
    BLOCK_NAMES,
    CausalSelfAttention,
    CausalTransformer,
    TransformerBlock,
    block_of,
    causal_transformer,
    parameter_blocks,
)
from curvlab.problems.two_d import (
    TWO_D_FUNCTIONS,
    NoisyTwoDModel,
    NoisyTwoDProblem,
    TwoDFunction,
    beale,
    branin,
    make_noisy_two_d,
    rosenbrock_2d,
)

__all__ = [
    "BLOCK_NAMES",
    "QUADRATIC_DEEP_DIM",
    "RAHIMI_RECHT_TOLERANCE",
    "ROSENBROCK_MINIMUM",
    "ROSENBROCK_START",
    "ROSENBROCK_TOLERANCE",
    "TWO_D_FUNCTIONS",
    "CausalSelfAttention",
    "CausalTransformer",
    "NoisyTwoDModel",
    "NoisyTwoDProblem",
    "QuadraticDeepModel",
    "QuadraticDeepProblem",
    "QuadraticLoss",
    "RahimiRechtProblem",
    "RosenbrockResidualModel",
    "StochasticRosenbrock",
    "TransformerBlock",
    "TwoDFunction",
    "autoencoder",
    "basic_cifar_net",
    "beale",
    "benchmark_mlp",
    "bernoulli_nll_loss",
    "block_of",
    "branin",
    "causal_transformer",
    "cnn_3c3d",
    "deterministic_rosenbrock",
    "haar_orthogonal",
    "make_noisy_two_d",
    "make_quadratic_deep",
    "make_rahimi_recht",
    "mean_output_loss",
    "parameter_blocks",
    "quadratic_deep_eigenvalues",
    "reconstruction_sq_error",
    "reset_parameters_",
    "rosenbrock",
    "rosenbrock_2d",
    "rosenbrock_gradient",
    "rosenbrock_residuals",
    "small_cnn",
    "small_mlp",
    "sparse_init_",
    "sum_of_squares_loss",
]
