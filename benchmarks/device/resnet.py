"""A ResNet-18 for 3x32x32 inputs, built here because ``curvlab.problems`` has none (no
torchvision): the CIFAR variant of He et al. 2016 (3x3 stem, no max-pool, four stages of two
BasicBlocks, widths ``w, 2w, 4w, 8w`` with ``w = 64``, global average pool, linear head).

BatchNorm uses batch statistics only (``track_running_stats=False``): a forward pass mutates no
buffer, so ``torch.func`` transforms (the curvature products) apply to it as to a plain network.
With ``width=64`` it has 11,173,962 parameters; ``width=4`` gives a tiny copy for CPU smoke runs.

Example:
    >>> import torch
    >>> net = resnet18(width=4, generator=torch.Generator().manual_seed(0))
    >>> net(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in resnet18().parameters())
    11173962
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "resnet18"]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (1x1-conv-BN when the shape changes) shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _bn(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          _bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10, width: int = 64, *,
             generator: torch.Generator | None = None) -> nn.Sequential:
    """ResNet-18 (CIFAR variant) with base width ``width``; weights drawn from ``generator``.

    Convolutions: Kaiming-normal (fan-out, ReLU); BatchNorm: weight 1, bias 0; the head: PyTorch's
    default ``Linear`` initialization drawn from ``generator``. Input ``(N, 3, H, W)``, any
    ``H, W >= 8``; output logits ``(N, num_classes)``.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"resnet18: width must be a positive int, got {width!r}")
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), _bn(width), nn.ReLU()]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            layers.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and block == 0) else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu",
                                        generator=generator)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / c_in**0.5
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)
    return net
