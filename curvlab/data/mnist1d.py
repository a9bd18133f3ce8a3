"""MNIST-1D, generated procedurally (Greydanus 2020, "Scaling down deep learning").

Reference: S. Greydanus, arXiv 2011.14439; generator in github.com/greydanus/mnist1d.

This is an independent, vectorised numpy implementation of the published generator's procedure.
Each example starts from one of ten hand-made length-12 "digit" templates and goes through:

1. add ``1e-8`` (so the signal is distinguishable from padding), append ``p`` zeros with ``p``
   uniform on ``{padding[0], ..., padding[1]}``;
2. linearly interpolate ("dilate") the padded signal to ``12 + padding[1]`` points (= 72);
3. multiply by ``1 + scale_coeff * (U[0,1] - 0.5)``;
4. circularly shift right by ``k`` uniform on ``{0, ..., max_translation - 1}``;
5. replace every exact zero (the padding) by correlated noise: ``corr_noise_scale * N(0, 1)``
   smoothed by a Gaussian filter (sigma 2, truncated at 4 sigma, mirror-reflected boundary);
6. add iid noise ``iid_noise_scale * N(0, 1)`` everywhere;
7. shear: subtract ``c * linspace(-0.5, 0.5, 72)`` with ``c = shear_scale * (U[0,1] - 0.5)``;
8. linearly interpolate to ``final_seq_length`` (= 40) points.

Finally the whole data set (train and test together) is centred and scaled to unit standard
deviation with one global mean and std, as the reference does.  Classes are balanced before
shuffling (example ``i`` of the unshuffled set has label ``i mod 10``).

Defaults (equal to the reference's ``get_dataset_args``): 4000 train / 1000 test (5000 samples,
80/20 split), padding ``(36, 60)``, ``scale_coeff=0.4``, ``max_translation=48``,
``corr_noise_scale=0.25``, ``iid_noise_scale=0.02``, ``shear_scale=0.75``, length 40.
The random draws use ``numpy.random.default_rng(seed)`` in a vectorised order, so the samples are
statistically equivalent to, but not bit-identical with, the reference's pickled data set.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from curvlab.data.dataset import Dataset, _check_count, _check_seed, as_dataset

__all__ = ["MNIST1D_TEMPLATE_LENGTH", "make_mnist1d", "mnist1d_templates"]

#: Length of each raw digit template.
MNIST1D_TEMPLATE_LENGTH = 12

# The ten hand-drawn 1-D digit shapes of the MNIST-1D paper (values before normalisation).
_RAW_TEMPLATES = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ],
    dtype=np.float64,
)


def mnist1d_templates() -> np.ndarray:
    """Return the ten normalised MNIST-1D templates, shape ``(10, 12)``, row ``d`` = digit ``d``.

    Each raw template is standardised (zero mean, unit std per row), shifted so that it starts
    at 0 (all templates start and end with the same raw value, so they also end at 0), and
    divided by 6.

    Example:
        >>> t = mnist1d_templates()
        >>> t.shape, bool(abs(t[:, 0]).max() == 0.0)
        ((10, 12), True)
    """
    x = _RAW_TEMPLATES.copy()
    x -= x.mean(axis=1, keepdims=True)
    x /= x.std(axis=1, keepdims=True)
    x -= x[:, :1]
    return x / 6.0


def _gaussian_filter_rows(a: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian-smooth every row of ``a`` (mirror boundary ``d c b a | a b c d | d c b a``)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(a, ((0, 0), (radius, radius)), mode="symmetric")
    return sliding_window_view(padded, 2 * radius + 1, axis=1) @ kernel


def _interp_rows(values: np.ndarray, lengths: np.ndarray, num_points: int) -> np.ndarray:
    """Linearly resample row ``i`` (its first ``lengths[i]`` entries on a uniform grid over
    ``[0, 1]``) at ``num_points`` uniformly spaced points of ``[0, 1]``."""
    pos = np.linspace(0.0, 1.0, num_points)[None, :] * (lengths[:, None] - 1)
    left = np.clip(np.floor(pos).astype(np.int64), 0, lengths[:, None] - 2)
    frac = pos - left
    v0 = np.take_along_axis(values, left, axis=1)
    v1 = np.take_along_axis(values, left + 1, axis=1)
    return v0 * (1.0 - frac) + v1 * frac


def _draw(
    n: int, rng: np.random.Generator, *, padding: tuple[int, int], max_translation: int
) -> dict[str, np.ndarray]:
    """All random quantities of ``n`` examples (raw uniforms/normals; scales applied later)."""
    width = MNIST1D_TEMPLATE_LENGTH + padding[1]
    return {
        "pad": padding[0] + np.floor(rng.random(n) * (padding[1] - padding[0] + 1)).astype(int),
        "scale_u": rng.random(n),
        "shift": rng.integers(0, max_translation, size=n),
        "corr_z": rng.standard_normal((n, width)),
        "iid_z": rng.standard_normal((n, width)),
        "shear_u": rng.random(n),
    }


def _transform(
    labels: np.ndarray,
    draws: dict[str, np.ndarray],
    *,
    padding: tuple[int, int],
    scale_coeff: float,
    corr_noise_scale: float,
    iid_noise_scale: float,
    shear_scale: float,
    final_seq_length: int,
) -> np.ndarray:
    """Apply the MNIST-1D transformation pipeline to the templates of ``labels`` (unnormalised)."""
    n = len(labels)
    tl = MNIST1D_TEMPLATE_LENGTH
    width = tl + padding[1]
    signal = np.zeros((n, width))
    signal[:, :tl] = mnist1d_templates()[labels] + 1e-8
    x = _interp_rows(signal, tl + draws["pad"], width)  # pad + dilate
    x *= 1.0 + scale_coeff * (draws["scale_u"][:, None] - 0.5)  # scale
    cols = (np.arange(width)[None, :] - draws["shift"][:, None]) % width  # shift right
    x = np.take_along_axis(x, cols, axis=1)
    corr = _gaussian_filter_rows(corr_noise_scale * draws["corr_z"], sigma=2.0)
    x = np.where(x != 0, x, corr)  # correlated noise replaces the padding
    x += iid_noise_scale * draws["iid_z"]
    shear = shear_scale * (draws["shear_u"] - 0.5)
    x -= shear[:, None] * np.linspace(-0.5, 0.5, width)[None, :]
    return _interp_rows(x, np.full(n, width), final_seq_length)


def make_mnist1d(
    num_train: int = 4000,
    num_test: int = 1000,
    *,
    seed: int = 0,
    channel_dim: bool = False,
    padding: tuple[int, int] = (36, 60),
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 0.02,
    shear_scale: float = 0.75,
    final_seq_length: int = 40,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Generate the MNIST-1D classification data set (see the module docstring for the procedure).

    Args:
        num_train: Training examples (default 4000).
        num_test: Test examples (default 1000).
        seed: Seed of ``numpy.random.default_rng``; equal seeds give identical data.
        channel_dim: Return inputs of shape ``(N, 1, L)`` (for ``Conv1d``) instead of ``(N, L)``.
        padding: Inclusive range ``(low, high)`` of the number of zeros appended to a template.
        scale_coeff: Amplitude scaling range, factor ``1 + scale_coeff * (U - 0.5)``.
        max_translation: Circular shifts are drawn from ``{0, ..., max_translation - 1}``.
        corr_noise_scale: Std of the (pre-smoothing) correlated background noise.
        iid_noise_scale: Std of the additive iid noise.
        shear_scale: Range of the linear-trend ("shear") coefficient.
        final_seq_length: Output length ``L`` (default 40).
        device: Device for all tensors.
        dtype: Floating dtype of the inputs (labels are ``int64``).

    Returns:
        A classification :class:`~curvlab.data.Dataset` named ``"mnist1d"``, 10 classes; the
        inputs of train and test together have mean 0 and std 1.

    Example:
        >>> ds = make_mnist1d(num_train=100, num_test=50, seed=0)
        >>> ds.x_train.shape, ds.y_test.shape, ds.num_classes
        (torch.Size([100, 40]), torch.Size([50]), 10)
    """
    n_train = _check_count(num_train, "num_train")
    n_test = _check_count(num_test, "num_test")
    n = n_train + n_test
    if n < 2:
        raise ValueError(f"num_train + num_test must be >= 2, got {n}")
    if (
        not isinstance(padding, tuple | list)
        or len(padding) != 2
        or not all(isinstance(p, int | np.integer) for p in padding)
        or not 0 <= padding[0] <= padding[1]
    ):
        raise ValueError(
            f"padding must be a pair of ints (low, high) with 0 <= low <= high, got {padding!r}"
        )
    _check_count(max_translation, "max_translation", minimum=1)
    _check_count(final_seq_length, "final_seq_length", minimum=2)
    for name, value in (
        ("scale_coeff", scale_coeff),
        ("corr_noise_scale", corr_noise_scale),
        ("iid_noise_scale", iid_noise_scale),
        ("shear_scale", shear_scale),
    ):
        if not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    rng = np.random.default_rng(_check_seed(seed))
    labels = rng.permutation(np.arange(n) % 10)
    pad_range = (int(padding[0]), int(padding[1]))
    draws = _draw(n, rng, padding=pad_range, max_translation=int(max_translation))
    x = _transform(
        labels,
        draws,
        padding=pad_range,
        scale_coeff=scale_coeff,
        corr_noise_scale=corr_noise_scale,
        iid_noise_scale=iid_noise_scale,
        shear_scale=shear_scale,
        final_seq_length=int(final_seq_length),
    )
    x = (x - x.mean()) / x.std()
    if channel_dim:
        x = x[:, None, :]
    return as_dataset(
        x[:n_train],
        labels[:n_train],
        x[n_train:],
        labels[n_train:],
        name="mnist1d",
        num_classes=10,
        device=device,
        dtype=dtype,
    )
