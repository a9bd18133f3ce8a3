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
  ``stroke_width - 1`` and a one-pixel linear ramp on each side), where ``d`` is the exact
  distance to a polyline through the curve at uniformly spaced ``t`` with segments at most half
  a pixel long (it deviates from the curve by well under 0.01 pixel).

Values lie in ``[0, 1]``; background pixels are exactly 0.  The data set is for reconstruction
(auto-encoders): targets are the inputs.  Rendering is vectorised in torch (each segment updates
the small pixel window around it with a scatter-max); a few thousand 28x28 images take well
under a second or two on one CPU core.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.data.dataset import Dataset, _check_count, _check_seed, as_dataset

__all__ = ["make_curves", "render_bezier_curves"]


def _max_leg(control_points: Tensor) -> float:
    """Largest control-polygon leg; ``|B'(t)| <= 2 * max_leg`` for a quadratic Bezier."""
    legs = torch.linalg.vector_norm(control_points.diff(dim=1), dim=-1)
    return float(legs.max()) if legs.numel() else 0.0


def render_bezier_curves(
    control_points: Tensor,
    *,
    image_size: int = 28,
    stroke_width: float = 1.5,
    num_segments: int | None = None,
) -> Tensor:
    """Render quadratic Bezier curves into ``(N, image_size, image_size)`` images in ``[0, 1]``.

    Args:
        control_points: Shape ``(N, 3, 2)``, ``(x, y)`` pixel coordinates (``x`` = column,
            ``y`` = row, continuous, origin at the top-left corner of the image).
        image_size: Side length ``S`` of the square images.
        stroke_width: Width of the stroke in pixels (solid core ``stroke_width - 1`` plus a
            one-pixel anti-aliasing ramp on each side); must be in ``[1, 3]``.
        num_segments: Number of polyline segments per curve. ``None`` picks the smallest number
            that keeps every segment at most 0.5 pixel long for this batch; an explicit value
            must satisfy that bound too (checked).

    Returns:
        Float tensor (dtype of ``control_points``) of shape ``(N, S, S)``.

    Example:
        >>> import torch
        >>> pts = torch.tensor([[[4.0, 4.0], [14.0, 24.0], [24.0, 4.0]]])
        >>> img = render_bezier_curves(pts)
        >>> img.shape, float(img.max()), float(img.min())
        (torch.Size([1, 28, 28]), 1.0, 0.0)
    """
    if (
        not isinstance(control_points, Tensor)
        or control_points.ndim != 3
        or tuple(control_points.shape[1:]) != (3, 2)
    ):
        raise ValueError("control_points must be a tensor of shape (N, 3, 2)")
    if not control_points.dtype.is_floating_point:
        raise ValueError(f"control_points must be floating point, got {control_points.dtype}")
    size = _check_count(image_size, "image_size", minimum=2)
    if not isinstance(stroke_width, int | float) or not 1.0 <= stroke_width <= 3.0:
        raise ValueError(f"stroke_width must be a number in [1, 3], got {stroke_width!r}")
    # Segment between t_k and t_{k+1} is at most 2 * max_leg / num_segments long.
    needed = max(1, math.ceil(4 * _max_leg(control_points)))
    if num_segments is None:
        num_segments = needed
    elif _check_count(num_segments, "num_segments", minimum=1) < needed:
        raise ValueError(
            f"num_segments={num_segments} allows segments longer than 0.5 pixel for these "
            f"control points; use at least {needed}"
        )
    n = control_points.shape[0]
    dev, dt = control_points.device, control_points.dtype
    t = torch.linspace(0.0, 1.0, num_segments + 1, device=dev, dtype=dt)[None, :, None]
    p0, p1, p2 = (control_points[:, i : i + 1, :] for i in range(3))
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2  # (N, K+1, 2)
    ax, ay = pts[:, :-1, 0, None, None], pts[:, :-1, 1, None, None]  # (N, K, 1, 1) starts
    abx = pts[:, 1:, 0, None, None] - ax  # segment vectors
    aby = pts[:, 1:, 1, None, None] - ay
    # Pixel window around the pixel containing each segment midpoint. Centres in the window
    # reach at least radius - 0.5 from the midpoint; the support of the profile plus half a
    # segment (<= 0.25) must fit: radius - 0.5 >= stroke_width / 2 + 0.5 + 0.25.
    radius = math.ceil(stroke_width / 2 + 1.25)
    offs = torch.arange(-radius, radius + 1, device=dev)
    cols = torch.floor(ax + 0.5 * abx).long() + offs  # (N, K, 1, W)
    rows = torch.floor(ay + 0.5 * aby).long() + offs[:, None]  # (N, K, W, 1)
    px = cols.to(dt) + 0.5 - ax  # centre minus segment start
    py = rows.to(dt) + 0.5 - ay
    len2 = (abx * abx + aby * aby).clamp_min(torch.finfo(dt).tiny)
    proj = ((px * abx + py * aby) / len2).clamp_(0.0, 1.0)  # (N, K, W, W)
    ex = px - proj * abx
    ey = py - proj * aby
    dist = torch.sqrt(ex * ex + ey * ey)
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
    # One segment count for all chunks (from the largest possible leg), so an image does not
    # depend on which chunk it falls in.
    num_segments = max(1, math.ceil(4 * math.sqrt(2) * (size - 2 * margin)))
    chunks = [
        render_bezier_curves(
            pts[i : i + 2048],
            image_size=size,
            stroke_width=stroke_width,
            num_segments=num_segments,
        )
        for i in range(0, n, 2048)
    ]
    images = torch.cat(chunks) if chunks else torch.zeros(0, size, size)
    x = images.reshape(n, size * size) if flatten else images.reshape(n, 1, size, size)
    return as_dataset(
        x[:n_train],
        None,
        x[n_train:],
        None,
        name="curves",
        num_classes=None,
        task="reconstruction",
        device=device,
        dtype=dtype,
    )
