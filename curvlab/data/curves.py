"""A CURVES-like data set: images of random smooth curves (cf. Hinton & Salakhutdinov, 2006).

The original CURVES set (used by the deep-autoencoder benchmarks of Hinton & Salakhutdinov 2006,
Martens 2010 and K-FAC) consists of 28x28 images of random curves built from three random
points.  We do not have the original generator; this module produces a set in the same spirit
with its own, documented procedure:

* three control points ``P0, P1, P2`` are drawn uniformly from the square
  ``[margin, S - margin]^2`` of the ``S x S`` image (pixel ``(r, c)`` covers
  ``[c, c+1) x [r, r+1)``, so its centre is ``(c + 0.5, r + 0.5)``);
* the curve is the quadratic Bezier ``B(t) = (1-t)^2 P0 + 2t(1-t) P1 + t^2 P2``, ``t`` in
  ``[0, 1]``: it starts at ``P0``, ends at ``P2``, bends towards ``P1`` and stays inside the
  triangle of the three points, hence inside the image;
* it is rendered with an anti-aliased stroke: a pixel whose centre is at distance ``d`` from
  the curve gets intensity ``clip(stroke_width / 2 + 0.5 - d, 0, 1)`` (a solid core of width
  ``stroke_width - 1`` and a one-pixel linear ramp on each side), where ``d`` is measured to
  ``4 S`` points sampled uniformly in ``t``.

Values lie in ``[0, 1]``; background pixels are exactly 0.  The data set is for reconstruction
(auto-encoders): targets are the inputs.  Rendering is vectorised in torch (a scatter-max of each
curve sample's 5x5 pixel neighbourhood), a few thousand images take well under a second.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.data.dataset import Dataset, _check_count, _check_seed, as_dataset

__all__ = ["make_curves", "render_bezier_curves"]


def render_bezier_curves(
    control_points: Tensor, *, image_size: int = 28, stroke_width: float = 1.5
) -> Tensor:
    """Render quadratic Bezier curves into ``(N, image_size, image_size)`` images in ``[0, 1]``.

    Args:
        control_points: Shape ``(N, 3, 2)``, ``(x, y)`` pixel coordinates (``x`` = column,
            ``y`` = row, continuous, origin at the top-left corner of the image).
        image_size: Side length ``S`` of the square images.
        stroke_width: Width of the stroke in pixels (solid core ``stroke_width - 1`` plus a
            one-pixel anti-aliasing ramp on each side); must be in ``[1, 3]``.

    Returns:
        Float tensor (dtype of ``control_points``) of shape ``(N, S, S)``.

    Example:
        >>> import torch
        >>> pts = torch.tensor([[[4.0, 4.0], [14.0, 24.0], [24.0, 4.0]]])
        >>> img = render_bezier_curves(pts)
        >>> img.shape, float(img.max()), float(img.min())
        (torch.Size([1, 28, 28]), 1.0, 0.0)
    """
    if not isinstance(control_points, Tensor) or control_points.ndim != 3 or tuple(
        control_points.shape[1:]
    ) != (3, 2):
        raise ValueError("control_points must be a tensor of shape (N, 3, 2)")
    if not control_points.dtype.is_floating_point:
        raise ValueError(f"control_points must be floating point, got {control_points.dtype}")
    size = _check_count(image_size, "image_size", minimum=2)
    if not isinstance(stroke_width, int | float) or not 1.0 <= stroke_width <= 3.0:
        raise ValueError(f"stroke_width must be a number in [1, 3], got {stroke_width!r}")
    n = control_points.shape[0]
    dev, dt = control_points.device, control_points.dtype
    t = torch.linspace(0.0, 1.0, 4 * size, device=dev, dtype=dt)[None, :, None]
    p0, p1, p2 = (control_points[:, i : i + 1, :] for i in range(3))
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2  # (N, T, 2)
    # 5x5 pixel neighbourhood around the pixel containing each sample (radius 2 covers the
    # whole support d < stroke_width / 2 + 0.5 <= 2 of the intensity profile).
    offs = torch.arange(-2, 3, device=dev)
    base = torch.floor(pts).long()  # (N, T, 2): column, row
    cols = base[..., 0, None, None] + offs[None, None, None, :]  # (N, T, 1, 5)
    rows = base[..., 1, None, None] + offs[None, None, :, None]  # (N, T, 5, 1)
    dx = cols.to(dt) + 0.5 - pts[..., 0, None, None]
    dy = rows.to(dt) + 0.5 - pts[..., 1, None, None]
    dist = torch.sqrt(dx**2 + dy**2)  # (N, T, 5, 5)
    val = torch.clamp(stroke_width / 2 + 0.5 - dist, 0.0, 1.0)
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    val = torch.where(inside, val, torch.zeros((), device=dev, dtype=dt))
    flat = (
        torch.arange(n, device=dev)[:, None, None, None] * (size * size)
        + rows.clamp(0, size - 1) * size
        + cols.clamp(0, size - 1)
    )
    out = torch.zeros(n * size * size, device=dev, dtype=dt)
    out.scatter_reduce_(0, flat.reshape(-1), val.reshape(-1), reduce="amax", include_self=True)
    return out.reshape(n, size, size)


def make_curves(
    num_train: int = 20000,
    num_test: int = 10000,
    *,
    seed: int = 0,
    image_size: int = 28,
    stroke_width: float = 1.5,
    margin: float = 2.0,
    flatten: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Generate the CURVES-like reconstruction data set (see the module docstring).

    Generation runs on the CPU in float32 with a ``torch.Generator`` seeded by ``seed`` (train
    and test come from one stream: the first ``num_train`` curves are the training set), then
    the result is moved to ``device`` and cast to ``dtype`` once.

    Args:
        num_train: Training images (default 20000, as CURVES).
        num_test: Test images (default 10000, as CURVES).
        seed: Seed of the generator.
        image_size: Side length of the square images (default 28).
        stroke_width: Stroke width in pixels, in ``[1, 3]``.
        margin: Control points are drawn from ``[margin, image_size - margin]^2``.
        flatten: Inputs of shape ``(N, S*S)`` (default, for MLP auto-encoders) or ``(N, 1, S, S)``.
        device: Device of the tensors.
        dtype: Floating dtype.

    Returns:
        A :class:`~curvlab.data.Dataset` named ``"curves"`` with ``task="reconstruction"``
        (targets are the inputs), ``num_classes=None``, values in ``[0, 1]``.

    Example:
        >>> ds = make_curves(num_train=8, num_test=4, seed=0)
        >>> ds.x_train.shape, ds.y_train is ds.x_train, ds.task
        (torch.Size([8, 784]), True, 'reconstruction')
    """
    n_train = _check_count(num_train, "num_train")
    n_test = _check_count(num_test, "num_test")
    size = _check_count(image_size, "image_size", minimum=2)
    if not isinstance(margin, int | float) or not 0 <= margin < size / 2:
        raise ValueError(f"margin must be a number in [0, image_size / 2), got {margin!r}")
    gen = torch.Generator().manual_seed(_check_seed(seed))
    n = n_train + n_test
    u = torch.rand(n, 3, 2, generator=gen, dtype=torch.float32)
    pts = margin + (size - 2 * margin) * u
    chunks = [
        render_bezier_curves(pts[i : i + 4096], image_size=size, stroke_width=stroke_width)
        for i in range(0, n, 4096)
    ]
    images = torch.cat(chunks) if chunks else torch.zeros(0, size, size)
    x = images.reshape(n, size * size) if flatten else images.reshape(n, 1, size, size)
    return as_dataset(
        x[:n_train], None, x[n_train:], None, name="curves", num_classes=None,
        task="reconstruction", device=device, dtype=dtype,
    )
