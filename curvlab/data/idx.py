"""IDX files (the MNIST / Fashion-MNIST distribution format): reader, writer and loader.

IDX layout (LeCun's MNIST page): a 4-byte magic number ``00 00 TT DD`` where ``TT`` is the element
type (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
``0x0E`` float64) and ``DD`` the number of dimensions, then ``DD`` big-endian uint32 sizes, then
the data in C order, big-endian. MNIST images are ``0x00000803`` (uint8, 3-D), labels
``0x00000801`` (uint8, 1-D). Files may be gzip-compressed (detected from their first bytes).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from curvlab.data.dataset import Dataset, _uint8_images_to_tensor, as_dataset
from curvlab.data.paths import find_file, resolve_data_root

__all__ = ["MNIST_FILES", "load_mnist", "read_idx", "write_idx"]

_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}

#: The four standard file names: (train images, train labels, test images, test labels).
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_SUBDIRS = {"mnist": ("MNIST", "raw"), "fashion": ("FashionMNIST", "raw")}
_NAMES = {"mnist": "mnist", "fashion": "fashion-mnist"}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a native-endian numpy array.

    Raises:
        ValueError: If the magic number, element type or size is inconsistent (the message
            names the file).

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a-idx2-ubyte")
        >>> write_idx(p, np.arange(6, dtype=np.uint8).reshape(2, 3))
        >>> read_idx(p)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint8)
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number {raw[:4].hex()} does not start with 0000)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _CODE_TO_DTYPE:
        raise ValueError(
            f"{path}: unknown IDX element type 0x{code:02x} (expected one of "
            f"{', '.join(f'0x{c:02x}' for c in _CODE_TO_DTYPE)})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _CODE_TO_DTYPE[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX shape {shape} of {dtype.name} needs {expected} data bytes, file has "
            f"{len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzip-compressed if ``path`` ends with ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64 (at most 255 dimensions).

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
        >>> write_idx(p, np.array([1, 2], dtype=np.uint8))
        >>> read_idx(p).tolist()
        [1, 2]
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array must be a numpy.ndarray, got {type(array).__name__}")
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _KIND_TO_CODE:
        raise ValueError(
            f"array dtype {array.dtype} cannot be stored in IDX (use uint8, int8, int16, int32, "
            "float32 or float64)"
        )
    if array.ndim > 255:
        raise ValueError(f"array has {array.ndim} dimensions, IDX allows at most 255")
    code = _KIND_TO_CODE[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _read_checked(path: Path, ndim: int, what: str) -> np.ndarray:
    arr = read_idx(path)
    if arr.dtype != np.uint8 or arr.ndim != ndim:
        magic = 0x0800 + ndim
        raise ValueError(
            f"{path}: expected {what} (IDX magic 0x{magic:08x}: uint8, {ndim}-D), got "
            f"{arr.dtype} with shape {arr.shape}"
        )
    return arr


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    kind: Literal["mnist", "fashion"] = "mnist",
    *,
    flatten: bool = True,
    scale: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load MNIST or Fashion-MNIST from the four standard IDX files (no download).

    Search order for each file ``F`` (first hit wins; ``F`` before ``F.gz`` in each directory),
    with ``root`` = the argument or, if ``None``, ``$CURVLAB_DATA``:

    1. ``root/MNIST/raw/`` (``kind="mnist"``) or ``root/FashionMNIST/raw/`` (``kind="fashion"``),
       the torchvision layout;
    2. ``root/`` itself.

    The kind-specific directory comes first so that a root holding both data sets in
    torchvision layout can never serve MNIST for Fashion-MNIST; plain files directly in ``root``
    are taken to be the requested kind.

    Args:
        root: Data directory, or ``None`` for ``$CURVLAB_DATA``.
        kind: ``"mnist"`` or ``"fashion"``.
        flatten: Inputs ``(N, H*W)`` (default) or ``(N, 1, H, W)``.
        scale: Divide pixel values by 255 (to ``[0, 1]``).
        device: Device for the tensors.
        dtype: Floating dtype of the inputs (labels ``int64``).

    Returns:
        Classification :class:`~curvlab.data.Dataset` (``"mnist"`` or ``"fashion-mnist"``),
        10 classes, 60000 / 10000 examples for the real files.

    Raises:
        FileNotFoundError: A file is missing (lists every path tried, mentions CURVLAB_DATA).
        ValueError: Bad magic number, shape mismatch, or labels outside 0..9.

    Example:
        >>> import numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> for name, n in zip(MNIST_FILES, (3, 3, 2, 2)):
        ...     shape = (n, 28, 28) if "images" in name else (n,)
        ...     write_idx(os.path.join(d, name), np.zeros(shape, dtype=np.uint8))
        >>> ds = load_mnist(d)
        >>> ds.x_train.shape, ds.num_test
        (torch.Size([3, 784]), 2)
    """
    if kind not in _SUBDIRS:
        raise ValueError(f"kind must be 'mnist' or 'fashion', got {kind!r}")
    base = resolve_data_root(root)
    dirs = [base.joinpath(*_SUBDIRS[kind]), base]
    paths = [find_file(name, dirs, allow_gz=True) for name in MNIST_FILES]
    x_tr = _read_checked(paths[0], 3, "images")
    y_tr = _read_checked(paths[1], 1, "labels")
    x_te = _read_checked(paths[2], 3, "images")
    y_te = _read_checked(paths[3], 1, "labels")
    for x, y, px, py in ((x_tr, y_tr, paths[0], paths[1]), (x_te, y_te, paths[2], paths[3])):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{px} holds {x.shape[0]} images but {py} holds {y.shape[0]} labels")
        if y.size and int(y.max()) > 9:
            raise ValueError(f"{py}: labels must be in 0..9, found {int(y.max())}")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"train images {x_tr.shape[1:]} and test images {x_te.shape[1:]} differ in size"
        )
    h, w = x_tr.shape[1:]

    def prep(x: np.ndarray) -> torch.Tensor:
        x = x.reshape(len(x), h * w) if flatten else x.reshape(len(x), 1, h, w)
        return _uint8_images_to_tensor(x, scale=scale, device=device, dtype=dtype)

    return as_dataset(
        prep(x_tr),
        y_tr,
        prep(x_te),
        y_te,
        name=_NAMES[kind],
        num_classes=10,
        device=device,
        dtype=dtype,
    )
