"""Offline, deterministic data sets for curvlab experiments and tests.

Everything returns a :class:`Dataset` whose tensors already live on the requested device.
Nothing is ever downloaded: generated sets (:func:`make_mnist1d`, :func:`make_curves`,
:func:`make_synthetic_images`) are built from a seed, :func:`load_digits` uses scikit-learn's
bundled copy, and the file loaders (:func:`load_mnist`, :func:`load_cifar10`) read a directory
given by ``root=`` or the ``CURVLAB_DATA`` environment variable.

Example:
    >>> from curvlab.data import get_dataset, MiniBatchLoader
    >>> ds = get_dataset("mnist1d", quick=True)
    >>> xb, yb = next(iter(MiniBatchLoader(*ds.train, batch_size=32, seed=0)))
    >>> xb.shape
    torch.Size([32, 40])
"""

from curvlab.data.batching import MiniBatchLoader, iterate_minibatches
from curvlab.data.cifar import CIFAR10_CLASSES, load_cifar10, read_cifar_batch, write_cifar_batch
from curvlab.data.curves import make_curves, render_bezier_curves
from curvlab.data.dataset import Dataset, as_dataset
from curvlab.data.digits import load_digits
from curvlab.data.idx import MNIST_FILES, load_mnist, read_idx, write_idx
from curvlab.data.mnist1d import make_mnist1d, mnist1d_templates
from curvlab.data.paths import DATA_ENV_VAR, find_file, resolve_data_root
from curvlab.data.registry import DATASETS, DatasetSpec, get_dataset, list_datasets
from curvlab.data.split import split_indices, subsample, train_test_split
from curvlab.data.synthetic import make_synthetic_images
from curvlab.data.text import (
    decode_tokens,
    encode_text,
    load_pydoc_topics,
    pydoc_topics,
    text_vocabulary,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DATA_ENV_VAR",
    "MNIST_FILES",
    "Dataset",
    "DatasetSpec",
    "MiniBatchLoader",
    "as_dataset",
    "decode_tokens",
    "encode_text",
    "find_file",
    "get_dataset",
    "iterate_minibatches",
    "list_datasets",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_pydoc_topics",
    "make_curves",
    "make_mnist1d",
    "make_synthetic_images",
    "mnist1d_templates",
    "pydoc_topics",
    "read_cifar_batch",
    "read_idx",
    "render_bezier_curves",
    "resolve_data_root",
    "split_indices",
    "subsample",
    "text_vocabulary",
    "train_test_split",
    "write_cifar_batch",
    "write_idx",
]
