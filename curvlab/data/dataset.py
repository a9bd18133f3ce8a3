"""The common in-memory container returned by every data set function in :mod:`curvlab.data`.

Conventions
-----------
* All four tensors live on one device and are created there once (no per-batch host-to-device
  copies); inputs have a floating dtype (``torch.float32`` unless asked otherwise).
* Classification targets are ``torch.int64`` class indices of shape ``(N,)``.
* Reconstruction (auto-encoder) data sets set ``task="reconstruction"``, ``num_classes=None`` and
  use the inputs as targets (``y_train is x_train``: the same tensor, not a copy).
* ``input_shape`` is the shape of one example, ``x_train.shape[1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "as_dataset"]

Task = Literal["classification", "reconstruction", "regression"]
_TASKS = ("classification", "reconstruction", "regression")


def _check_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a :class:`torch.device`, raising ``ValueError`` if it is not one."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device or a str, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a valid torch device string") from err


def _check_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """Raise unless ``dtype`` is a floating-point torch dtype."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    return dtype


def _check_seed(seed: int, name: str = "seed") -> int:
    """Raise unless ``seed`` is a non-negative Python/numpy integer (not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be >= 0, got {seed}")
    return int(seed)


def _check_count(value: int, name: str, *, minimum: int = 0) -> int:
    """Raise unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _to_tensor(array: Any, *, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """Convert a numpy array or tensor to a tensor on ``device`` (one copy at most)."""
    if isinstance(array, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        tensor = array
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a numpy array or torch.Tensor, got {type(array).__name__}")
    return tensor.to(device=device, dtype=dtype)


def _uint8_images_to_tensor(
    images: np.ndarray, *, scale: bool, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Move uint8 pixels to ``device`` as uint8 (4x less traffic), cast, then scale by 1/255."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device=_check_device(device))
    t = t.to(dtype=_check_float_dtype(dtype))
    return t.div_(255.0) if scale else t


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of tensors plus minimal metadata.

    Attributes:
        x_train: Training inputs, shape ``(N_train, *input_shape)``, floating dtype.
        y_train: Training targets: ``int64`` labels ``(N_train,)`` for classification, the inputs
            themselves for reconstruction, floats for regression.
        x_test: Test inputs, shape ``(N_test, *input_shape)``.
        y_test: Test targets (same convention as ``y_train``).
        name: Registry-style name, e.g. ``"digits"``.
        num_classes: Number of classes, or ``None`` for non-classification tasks.
        input_shape: Shape of one example (``x_train.shape[1:]``).
        task: ``"classification"``, ``"reconstruction"`` or ``"regression"``.

    Example:
        >>> import torch
        >>> ds = Dataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
        ...              torch.zeros(3, 2), torch.zeros(3, dtype=torch.long),
        ...              name="toy", num_classes=2, input_shape=(2,))
        >>> ds.num_train, ds.num_test, ds.train[0].shape
        (4, 3, torch.Size([4, 2]))
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    name: str
    num_classes: int | None
    input_shape: tuple[int, ...]
    task: Task = "classification"

    def __post_init__(self) -> None:
        for field in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, field)
            if not isinstance(value, Tensor):
                raise TypeError(f"{field} must be a torch.Tensor, got {type(value).__name__}")
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {self.task!r}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} and y_{split} disagree on the number of examples: "
                    f"{x.shape[0]} vs {y.shape[0]}"
                )
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"x_{split} has example shape {tuple(x.shape[1:])}, expected input_shape "
                    f"{self.input_shape}"
                )
        if self.task == "classification":
            if self.num_classes is None or self.num_classes < 1:
                raise ValueError(
                    f"num_classes must be a positive int for classification, got {self.num_classes}"
                )
            for field in ("y_train", "y_test"):
                if getattr(self, field).dtype != torch.int64:
                    raise ValueError(
                        f"{field} must hold int64 class labels, got {getattr(self, field).dtype}"
                    )

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.x_train.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the inputs."""
        return self.x_train.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Dataset:
        """Return a copy with tensors moved to ``device`` and inputs cast to ``dtype``.

        Integer labels keep ``int64``; reconstruction targets follow the inputs (and stay the same
        tensor object).

        Example:
            >>> import torch
            >>> ds = Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long),
            ...              torch.zeros(1, 1), torch.zeros(1, dtype=torch.long),
            ...              name="toy", num_classes=1, input_shape=(1,))
            >>> ds.to(dtype=torch.float64).x_train.dtype
            torch.float64
        """
        dev = self.device if device is None else _check_device(device)
        dt = self.dtype if dtype is None else _check_float_dtype(dtype)
        x_train = self.x_train.to(device=dev, dtype=dt)
        x_test = self.x_test.to(device=dev, dtype=dt)
        return Dataset(
            x_train,
            self._move_target(self.y_train, self.x_train, x_train, dev, dt),
            x_test,
            self._move_target(self.y_test, self.x_test, x_test, dev, dt),
            name=self.name,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            task=self.task,
        )

    @staticmethod
    def _move_target(
        y: Tensor, x_old: Tensor, x_new: Tensor, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        if y is x_old:
            return x_new
        if y.dtype.is_floating_point:
            return y.to(device=device, dtype=dtype)
        return y.to(device=device)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={self.num_train}, "
            f"test={self.num_test}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, dtype={self.dtype}, device={self.device})"
        )


def as_dataset(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    name: str,
    num_classes: int | None,
    task: Task = "classification",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Build a :class:`Dataset` from numpy arrays or tensors, moving everything to ``device`` once.

    Inputs are cast to ``dtype``; classification labels to ``int64``; regression targets to
    ``dtype``. For ``task="reconstruction"`` pass ``y_train=None, y_test=None``: the targets become
    the input tensors themselves.

    Example:
        >>> import numpy as np
        >>> ds = as_dataset(np.ones((5, 3)), np.arange(5) % 2, np.ones((2, 3)), np.zeros(2),
        ...                 name="toy", num_classes=2)
        >>> ds.x_train.dtype, ds.y_train.dtype, ds.input_shape
        (torch.float32, torch.int64, (3,))
    """
    dev = _check_device(device)
    dt = _check_float_dtype(dtype)
    xt = _to_tensor(x_train, device=dev, dtype=dt)
    xs = _to_tensor(x_test, device=dev, dtype=dt)
    if task == "reconstruction":
        if y_train is not None or y_test is not None:
            raise ValueError("for task='reconstruction' pass y_train=None and y_test=None")
        yt, ys = xt, xs
    elif task == "classification":
        yt = _to_tensor(y_train, device=dev, dtype=torch.int64)
        ys = _to_tensor(y_test, device=dev, dtype=torch.int64)
    elif task == "regression":
        yt = _to_tensor(y_train, device=dev, dtype=dt)
        ys = _to_tensor(y_test, device=dev, dtype=dt)
    else:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    return Dataset(
        xt,
        yt,
        xs,
        ys,
        name=name,
        num_classes=num_classes,
        input_shape=tuple(xt.shape[1:]),
        task=task,
    )
