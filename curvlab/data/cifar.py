"""CIFAR-10 from the official "python version" pickle batches (no download, no torchvision).

The directory ``cifar-10-batches-py`` of the official archive holds ``data_batch_1`` ...
``data_batch_5`` (10000 training images each) and ``test_batch`` (10000 test images). Each is a
pickled ``dict`` with ``b"data"``: a ``(10000, 3072)`` uint8 array whose rows are the 1024 red,
then 1024 green, then 1024 blue values of a 32x32 image in row-major order, and ``b"labels"``: a
list of ints in ``0..9``.

Unpickling arbitrary files can execute code, so batches are read with a restricted unpickler
that only resolves the few numpy globals needed to rebuild arrays; anything else raises
:class:`pickle.UnpicklingError`.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlab.data.dataset import Dataset, _uint8_images_to_tensor, as_dataset
from curvlab.data.paths import find_file, resolve_data_root

__all__ = ["CIFAR10_CLASSES", "load_cifar10", "read_cifar_batch", "write_cifar_batch"]

#: CIFAR-10 class names in label order.
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
_MULTIARRAY = f"{_CORE}.multiarray"
_NUMERIC = f"{_CORE}.numeric"
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes inside protocol-2 pickles written by Python 3
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a CIFAR batch (only numpy arrays, "
                "lists and dicts are allowed)"
            )
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return getattr(importlib.import_module(_MULTIARRAY), name)
        if module in ("numpy.core.numeric", "numpy._core.numeric"):
            return getattr(importlib.import_module(_NUMERIC), name)
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch file into ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``.

    Accepts ``bytes`` keys (the official files) and, for re-pickled copies, ``str`` keys.

    Raises:
        ValueError: Missing keys, wrong array shape/dtype, or labels outside 0..9.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "test_batch")
        >>> write_cifar_batch(p, np.zeros((2, 3, 32, 32), np.uint8), [3, 7])
        >>> x, y = read_cifar_batch(p)
        >>> x.shape, y.tolist()
        ((2, 3, 32, 32), [3, 7])
    """
    path = Path(path)
    with open(path, "rb") as f:
        obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise ValueError(f"{path}: missing key b{key!r} (keys: {sorted(map(repr, obj))})")

    data, labels = get("data"), get("labels")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else (type(data).__name__)
        )
        raise ValueError(f"{path}: b'data' must be a (N, 3072) uint8 array, got {desc}")
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1 or y.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: b'labels' must hold one label per image ({data.shape[0]}), "
            f"got shape {y.shape}"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9, found range [{y.min()}, {y.max()}]")
    return data.reshape(-1, 3, 32, 32), y


def write_cifar_batch(
    path: str | os.PathLike[str], images: np.ndarray, labels: Sequence[int] | np.ndarray
) -> None:
    """Write a CIFAR python batch file (a pickled dict with ``bytes`` keys, pickle protocol 2).

    Args:
        path: Output file.
        images: uint8 array of shape ``(N, 3, 32, 32)`` or ``(N, 3072)``.
        labels: ``N`` ints in ``0..9``.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "data_batch_1")
        >>> write_cifar_batch(p, np.zeros((1, 3072), np.uint8), [0])
        >>> read_cifar_batch(p)[0].shape
        (1, 3, 32, 32)
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError("images must be a uint8 numpy array")
    if images.ndim not in (2, 4) or images.reshape(len(images), -1).shape[1] != 3072:
        raise ValueError(f"images must have shape (N, 3, 32, 32) or (N, 3072), got {images.shape}")
    y = [int(v) for v in labels]
    if len(y) != len(images):
        raise ValueError(f"got {len(images)} images but {len(y)} labels")
    batch = {
        b"batch_label": b"written by curvlab",
        b"labels": y,
        b"data": np.ascontiguousarray(images.reshape(len(images), 3072)),
        b"filenames": [f"{i}.png".encode() for i in range(len(y))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def load_cifar10(
    root: str | os.PathLike[str] | None = None,
    *,
    scale: bool = True,
    normalize: bool = False,
    flatten: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load CIFAR-10 (50000 train / 10000 test 3x32x32 images) from the python pickle batches.

    Search order for each of ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (first hit
    wins), with ``root`` = the argument or, if ``None``, ``$CURVLAB_DATA``:

    1. ``root/cifar-10-batches-py/`` (the directory inside the official archive);
    2. ``root/`` itself.

    Args:
        root: Data directory, or ``None`` for ``$CURVLAB_DATA``.
        scale: Divide pixel values by 255 (to ``[0, 1]``).
        normalize: After scaling, standardise each channel with the *training* set's
            per-channel mean and standard deviation (computed in float64).
        flatten: Inputs ``(N, 3072)`` instead of ``(N, 3, 32, 32)``.
        device: Device of the tensors.
        dtype: Floating dtype of the inputs.

    Returns:
        Classification :class:`~curvlab.data.Dataset` named ``"cifar10"``, 10 classes.

    Raises:
        FileNotFoundError: A batch file is missing (lists every path tried, mentions
            CURVLAB_DATA).
        ValueError: Malformed batch contents.

    Example:
        >>> import numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        ...     write_cifar_batch(os.path.join(d, name), np.zeros((2, 3072), np.uint8), [0, 1])
        >>> ds = load_cifar10(d)
        >>> ds.x_train.shape, ds.num_test
        (torch.Size([10, 3, 32, 32]), 2)
    """
    base = resolve_data_root(root)
    dirs = [base / "cifar-10-batches-py", base]
    train_paths = [find_file(name, dirs) for name in _TRAIN_FILES]
    test_path = find_file(_TEST_FILE, dirs)
    train = [read_cifar_batch(p) for p in train_paths]
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    x_te, y_te = read_cifar_batch(test_path)
    xt = _uint8_images_to_tensor(x_tr, scale=scale, device=device, dtype=dtype)
    xs = _uint8_images_to_tensor(x_te, scale=scale, device=device, dtype=dtype)
    if normalize:
        stats = xt.to(torch.float64)
        mean = stats.mean(dim=(0, 2, 3), keepdim=True)
        std = stats.std(dim=(0, 2, 3), keepdim=True)
        if bool((std == 0).any()):
            raise ValueError("normalize=True but a channel of the training images is constant")
        xt = ((stats - mean) / std).to(dtype)
        xs = ((xs.to(torch.float64) - mean) / std).to(dtype)
    if flatten:
        xt, xs = xt.reshape(len(xt), -1), xs.reshape(len(xs), -1)
    return as_dataset(
        xt, y_tr, xs, y_te, name="cifar10", num_classes=10, device=device, dtype=dtype
    )
