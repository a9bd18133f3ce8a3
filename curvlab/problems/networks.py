"""Network builders for experiments, benchmarks and tests.

Every builder returns a plain :class:`torch.nn.Sequential` of standard layers (``Linear``,
``Conv2d``, ``BatchNorm1d/2d``, ``ReLU``, ``Tanh``, ``Sigmoid``, ``MaxPool2d``, ``AvgPool2d``,
``Flatten``, ``Dropout``) so that layer-wise engines (K-FAC, tangent propagation) can walk them.
Classifiers return logits; the auto-encoders return output logits (use
:func:`~curvlab.problems.bernoulli_nll_loss` or ``nn.BCEWithLogitsLoss``).

Initialisation is reproducible when a ``generator`` is passed (all draws come from it); with
``generator=None`` builders that use PyTorch's default initialisation draw from the global RNG,
exactly like ``nn.Linear(...)`` would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "autoencoder",
    "basic_cifar_net",
    "benchmark_mlp",
    "cnn_3c3d",
    "reset_parameters_",
    "small_cnn",
    "small_mlp",
    "sparse_init_",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
}

_AUTOENCODER_LAYERS = {
    # encoder hidden sizes (logistic), code size (linear) -- Hinton & Salakhutdinov 2006,
    # Martens 2010, K-FAC.
    "mnist": ((1000, 500, 250), 30),
    "curves": ((400, 200, 100, 50, 25), 6),
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, int | float) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return float(width)


def _scaled(size: int, width: float) -> int:
    return max(1, round(size * width))


def _pooled(size: int) -> int:
    """Output size of a 3x3, stride-2, padding-1 pooling layer (``ceil(size / 2)``)."""
    return (size - 1) // 2 + 1


def reset_parameters_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-run PyTorch's default initialisation of every Linear/Conv/BatchNorm, drawing from
    ``generator``.

    Linear and Conv weights: ``kaiming_uniform_(a=sqrt(5))`` (i.e. ``U(-1/sqrt(fan_in),
    1/sqrt(fan_in))``); biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; BatchNorm weight 1, bias 0,
    running statistics reset. With ``generator=None`` the global RNG is used; otherwise the
    generator must live on the parameters' device (build on the CPU, then move the model).

    Returns:
        ``module`` (modified in place).

    Example:
        >>> import torch
        >>> a = reset_parameters_(nn.Linear(3, 2), torch.Generator().manual_seed(0))
        >>> b = reset_parameters_(nn.Linear(3, 2), torch.Generator().manual_seed(0))
        >>> bool(torch.equal(a.weight, b.weight))
        True
    """
    _check_generator(generator)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv1d):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    fan_in = m.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in)
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.reset_parameters()
    return module


def sparse_init_(
    module: nn.Module,
    num_nonzero: int = 15,
    *,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Martens' (2010) sparse initialisation, applied to every Linear/Conv layer of ``module``.

    Each output unit gets exactly ``min(num_nonzero, fan_in)`` nonzero incoming weights, at input
    positions chosen uniformly without replacement, with values ``std · N(0, 1)``; all other
    weights and all biases are zero. (For Conv layers the incoming connections of an output
    channel are its ``in_channels · kh · kw`` kernel entries.) This differs from
    ``torch.nn.init.sparse_``, which zeroes a fraction of each column.

    Returns:
        ``module`` (modified in place).

    Example:
        >>> import torch
        >>> lin = sparse_init_(nn.Linear(100, 4), generator=torch.Generator().manual_seed(0))
        >>> (lin.weight != 0).sum(dim=1).tolist(), float(lin.bias.abs().sum())
        ([15, 15, 15, 15], 0.0)
    """
    _check_positive_int(num_nonzero, "num_nonzero")
    _check_generator(generator)
    if not isinstance(std, int | float) or std <= 0:
        raise ValueError(f"std must be a positive number, got {std!r}")
    layers = [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    if not layers:
        raise TypeError(f"sparse_init_ found no Linear or Conv layer in {type(module).__name__}")
    with torch.no_grad():
        for m in layers:
            w = m.weight.view(m.weight.shape[0], -1)
            fan_out, fan_in = w.shape
            k = min(num_nonzero, fan_in)
            dev = generator.device if generator is not None else torch.device("cpu")
            scores = torch.rand(fan_out, fan_in, generator=generator, device=dev)
            idx = scores.argsort(dim=1)[:, :k]
            values = std * torch.randn(
                fan_out, k, generator=generator, dtype=torch.float64, device=dev
            )
            dense = torch.zeros(fan_out, fan_in, dtype=torch.float64, device=dev)
            dense.scatter_(1, idx, values)
            w.copy_(dense)
            if m.bias is not None:
                m.bias.zero_()
    return module


def small_mlp(
    in_features: int = 4,
    hidden: Sequence[int] = (8,),
    out_features: int = 3,
    *,
    activation: str = "tanh",
    bias: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A small fully connected network ``Linear → act → ... → Linear`` (for tests).

    Example:
        >>> import torch
        >>> net = small_mlp(4, (8, 8), 3, generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(5, 4)).shape
        torch.Size([5, 3])
    """
    _check_positive_int(in_features, "in_features")
    _check_positive_int(out_features, "out_features")
    _activation(activation)  # validate the name even when there are no hidden layers
    sizes = [in_features, *[_check_positive_int(h, "hidden size") for h in hidden], out_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    net = nn.Sequential(*layers)
    return reset_parameters_(net, generator) if generator is not None else net


def small_cnn(
    in_channels: int = 1,
    num_classes: int = 3,
    *,
    image_size: int = 8,
    channels: Sequence[int] = (4, 8),
    activation: str = "relu",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A small CNN: per stage ``Conv2d(3x3, padding 1) → act → MaxPool2d(2)``, then
    ``Flatten → Linear`` (for tests).

    Each pooling halves the spatial size (floor); ``image_size`` must survive all stages.

    Example:
        >>> import torch
        >>> net = small_cnn(1, 3, image_size=8, generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """
    _check_positive_int(in_channels, "in_channels")
    _check_positive_int(num_classes, "num_classes")
    size = _check_positive_int(image_size, "image_size")
    layers: list[nn.Module] = []
    prev = in_channels
    for c in channels:
        _check_positive_int(c, "channel count")
        size //= 2
        if size < 1:
            raise ValueError(
                f"image_size={image_size} is too small for {len(channels)} pooling stages"
            )
        layers += [nn.Conv2d(prev, c, 3, padding=1), _activation(activation), nn.MaxPool2d(2)]
        prev = c
    layers += [nn.Flatten(), nn.Linear(prev * size * size, num_classes)]
    net = nn.Sequential(*layers)
    return reset_parameters_(net, generator) if generator is not None else net


def benchmark_mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (1000, 500, 250),
    num_classes: int = 10,
    *,
    activation: str = "tanh",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """The benchmark MLP 784-1000-500-250-10 with tanh units (PyTorch default init).

    Example:
        >>> import torch
        >>> net = benchmark_mlp(generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(2, 784)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 1413260)
    """
    return small_mlp(in_features, hidden, num_classes, activation=activation, generator=generator)


def _glorot_normal_(net: nn.Module, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.xavier_normal_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)


def cnn_3c3d(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    *,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """DeepOBS-like 3c3d CNN: conv64(5) → pool → conv96(3) → pool → conv128(3) → pool →
    fc512 → fc256 → fc``num_classes``, ReLU everywhere.

    Differences from DeepOBS (deliberate, to work at any ``image_size``): every convolution uses
    "same" padding (2 for 5x5, 1 for 3x3) and every max-pool is 3x3, stride 2, padding 1, so each
    stage maps size ``s`` to ``ceil(s / 2)``; at 32x32 the flattened size is 128·4·4 = 2048
    (DeepOBS: 1152). Weights are Glorot-normal, biases zero (drawn from ``generator``).

    Example:
        >>> import torch
        >>> net = cnn_3c3d(generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_positive_int(in_channels, "in_channels")
    _check_positive_int(num_classes, "num_classes")
    _check_generator(generator)
    s = _pooled(_pooled(_pooled(_check_positive_int(image_size, "image_size"))))
    net = nn.Sequential(
        nn.Conv2d(in_channels, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * s * s, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
    _glorot_normal_(net, generator)
    return net


def basic_cifar_net(
    batch_norm: bool = True,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width: float = 1.0,
    *,
    bn_eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """The CurveBall paper's basic CIFAR CNN (AutoNN ``BasicCifarNet``), as a Sequential.

    Layers (``c = 32, 32, 64, 64`` channels times ``width``; BN before ReLU when ``batch_norm``):

    conv5x5 (pad 2) → [BN] → ReLU → maxpool 3/2 (pad 1) → conv5x5 → [BN] → ReLU → avgpool 3/2
    (pad 1) → conv5x5 → [BN] → ReLU → avgpool 3/2 (pad 1) → conv kxk → [BN] → ReLU → conv1x1 →
    Flatten.

    ``k`` is the remaining spatial size (``ceil`` of ``image_size / 8``: 4 at 32x32, as in the
    original, 1 at 8x8, 4 at 28x28), so the 1x1 head sees a 1x1 map and the output is
    ``(N, num_classes)``. Init: weights ``N(0, σ²)`` with ``σ = 0.01`` for the first convolution
    and ``0.05`` for all others, biases 0; convolutions followed by BN have no bias (BN's shift
    replaces it); BN weight 1, bias 0, ``eps = bn_eps`` (1e-4, as the PyTorch CurveBall port).
    Average pools use PyTorch's default ``count_include_pad=True``.

    Example:
        >>> import torch
        >>> net = basic_cifar_net(generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_positive_int(in_channels, "in_channels")
    _check_positive_int(num_classes, "num_classes")
    _check_generator(generator)
    w = _check_width(width)
    k = _pooled(_pooled(_pooled(_check_positive_int(image_size, "image_size"))))
    c1, c2, c3, c4 = (_scaled(c, w) for c in (32, 32, 64, 64))
    bias = not batch_norm

    def block(cin: int, cout: int, kernel: int, padding: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout, eps=bn_eps))
        layers.append(nn.ReLU())
        return layers

    net = nn.Sequential(
        *block(in_channels, c1, 5, 2),
        nn.MaxPool2d(3, stride=2, padding=1),
        *block(c1, c2, 5, 2),
        nn.AvgPool2d(3, stride=2, padding=1),
        *block(c2, c3, 5, 2),
        nn.AvgPool2d(3, stride=2, padding=1),
        *block(c3, c4, k, 0),
        nn.Conv2d(c4, num_classes, 1),
        nn.Flatten(),
    )
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs):
            nn.init.normal_(conv.weight, 0.0, 0.01 if i == 0 else 0.05, generator=generator)
            if conv.bias is not None:
                conv.bias.zero_()
    return net


def autoencoder(
    kind: str = "mnist",
    width: float = 1.0,
    input_dim: int = 784,
    *,
    init: str = "sparse",
    num_nonzero: int = 15,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """The deep auto-encoders of Hinton & Salakhutdinov (2006) used by HF and K-FAC.

    * ``"mnist"``: 784-1000-500-250-30-250-500-1000-784;
    * ``"curves"``: 784-400-200-100-50-25-6-25-50-100-200-400-784.

    Hidden units are logistic (``Sigmoid``), the code layer is linear, and the output layer returns
    **logits** (apply the logistic output through ``BCEWithLogits`` /
    :func:`~curvlab.problems.bernoulli_nll_loss`). ``width`` scales every hidden layer except the
    code layer (``max(1, round(h · width))``), for quick CPU runs.

    Args:
        kind: ``"mnist"`` or ``"curves"``.
        width: Hidden-size multiplier.
        input_dim: Input and output dimension (784 for 28x28 images).
        init: ``"sparse"`` (Martens' sparse init: ``num_nonzero`` N(0,1) incoming weights per
            unit, zero biases; the default) or ``"default"`` (PyTorch's).
        num_nonzero: Nonzero incoming weights per unit for the sparse init.
        generator: Source of the initial weights.

    Example:
        >>> import torch
        >>> net = autoencoder("curves", generator=torch.Generator().manual_seed(0))
        >>> net(torch.zeros(2, 784)).shape, net[10].out_features
        (torch.Size([2, 784]), 6)
    """
    if kind not in _AUTOENCODER_LAYERS:
        raise ValueError(f"kind must be one of {sorted(_AUTOENCODER_LAYERS)}, got {kind!r}")
    if init not in ("sparse", "default"):
        raise ValueError(f"init must be 'sparse' or 'default', got {init!r}")
    _check_generator(generator)
    w = _check_width(width)
    _check_positive_int(input_dim, "input_dim")
    hidden, code = _AUTOENCODER_LAYERS[kind]
    enc = [_scaled(h, w) for h in hidden]
    sizes = [input_dim, *enc, code, *reversed(enc), input_dim]
    code_index = len(enc) + 1  # index in `sizes` of the code layer
    layers: list[nn.Module] = []
    for i in range(1, len(sizes)):
        layers.append(nn.Linear(sizes[i - 1], sizes[i]))
        if i != code_index and i != len(sizes) - 1:
            layers.append(nn.Sigmoid())
    net = nn.Sequential(*layers)
    if init == "sparse":
        return sparse_init_(net, num_nonzero, generator=generator)
    return reset_parameters_(net, generator) if generator is not None else net
