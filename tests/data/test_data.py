"""Tests for curvlab.data: generators, file loaders, registry and mini-batching."""

from __future__ import annotations

import gzip
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.data import (
    DATA_ENV_VAR,
    MNIST_FILES,
    Dataset,
    MiniBatchLoader,
    as_dataset,
    get_dataset,
    iterate_minibatches,
    list_datasets,
    load_cifar10,
    load_digits,
    load_mnist,
    make_curves,
    make_mnist1d,
    make_synthetic_images,
    mnist1d_templates,
    read_cifar_batch,
    read_idx,
    render_bezier_curves,
    split_indices,
    subsample,
    train_test_split,
    write_cifar_batch,
    write_idx,
)
from curvlab.data.mnist1d import _draw, _gaussian_filter_rows, _interp_rows, _transform

# --------------------------------------------------------------------------- container / helpers


def _toy(n_train: int = 6, n_test: int = 4) -> Dataset:
    return as_dataset(
        np.arange(n_train * 2, dtype=np.float64).reshape(n_train, 2),
        np.arange(n_train) % 3,
        np.zeros((n_test, 2)),
        np.zeros(n_test, dtype=np.int64),
        name="toy",
        num_classes=3,
    )


def test_dataset_container_validates_and_converts():
    ds = _toy()
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (2,) and ds.num_train == 6 and ds.num_test == 4
    d64 = ds.to(dtype=torch.float64)
    assert d64.x_test.dtype == torch.float64 and d64.y_test.dtype == torch.int64
    with pytest.raises(ValueError, match="disagree"):
        Dataset(
            torch.zeros(3, 2),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.long),
            name="bad",
            num_classes=2,
            input_shape=(2,),
        )
    with pytest.raises(ValueError, match="int64"):
        Dataset(
            torch.zeros(2, 2),
            torch.zeros(2),
            torch.zeros(1, 2),
            torch.zeros(1),
            name="bad",
            num_classes=2,
            input_shape=(2,),
        )
    with pytest.raises(ValueError, match="dtype"):
        as_dataset(
            np.zeros((1, 1)), [0], np.zeros((1, 1)), [0], name="x", num_classes=1, dtype=torch.int32
        )
    with pytest.raises(ValueError, match="device"):
        as_dataset(
            np.zeros((1, 1)),
            [0],
            np.zeros((1, 1)),
            [0],
            name="x",
            num_classes=1,
            device="not-a-device",
        )


def test_reconstruction_targets_are_inputs_and_follow_to():
    ds = make_curves(4, 2, seed=0)
    assert ds.y_train is ds.x_train and ds.y_test is ds.x_test
    d64 = ds.to(dtype=torch.float64)
    assert d64.y_train is d64.x_train and d64.x_train.dtype == torch.float64


def test_split_indices_and_train_test_split():
    tr, te = split_indices(20, 5, seed=3)
    assert len(tr) == 15 and len(te) == 5 and not set(tr) & set(te)
    tr2, te2 = split_indices(20, 5, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not np.array_equal(te, split_indices(20, 5, seed=4)[1])
    x = torch.arange(20.0)
    xt, yt, xs, _ = train_test_split(x, x.long(), num_test=5, seed=3)
    assert torch.equal(xt.long(), yt) and xs.shape == (5,)
    with pytest.raises(ValueError, match="num_test"):
        split_indices(3, 4, seed=0)


def test_subsample_keeps_metadata_and_is_seeded():
    ds = make_synthetic_images(30, 10, image_shape=(1, 2, 2), seed=0)
    a = subsample(ds, num_train=7, num_test=3, seed=1)
    b = subsample(ds, num_train=7, num_test=3, seed=1)
    assert a.num_train == 7 and a.num_test == 3 and a.name == ds.name
    assert torch.equal(a.x_train, b.x_train)
    with pytest.raises(ValueError, match="num_train"):
        subsample(ds, num_train=31)


# --------------------------------------------------------------------------- mini-batching


def test_iterate_minibatches_covers_every_example_once():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_minibatches(x, y, 3, generator=g))
    assert [len(b) for b, _ in batches] == [3, 3, 3, 1]
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(10))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)
    dropped = list(iterate_minibatches(x, y, 3, generator=g, drop_last=True))
    assert [len(b) for b, _ in dropped] == [3, 3, 3]
    ordered = list(iterate_minibatches(x, y, 4, shuffle=False))
    assert torch.equal(ordered[0][1], torch.arange(4))


def test_iterate_minibatches_is_seeded_and_validates():
    x, y = torch.randn(12, 2), torch.arange(12)
    a = [yb for _, yb in iterate_minibatches(x, y, 5, generator=torch.Generator().manual_seed(1))]
    b = [yb for _, yb in iterate_minibatches(x, y, 5, generator=torch.Generator().manual_seed(1))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="generator"):
        iterate_minibatches(x, y, 5)  # shuffle=True without a generator
    with pytest.raises(ValueError, match="batch_size"):
        iterate_minibatches(x, y, 0, shuffle=False)
    with pytest.raises(ValueError, match="same number"):
        iterate_minibatches(x, y[:5], 2, shuffle=False)


def test_minibatch_loader_epochs_reproducible():
    x, y = torch.randn(9, 2), torch.arange(9)
    loader = MiniBatchLoader(x, y, batch_size=4, seed=5)
    assert len(loader) == 3
    e1 = torch.cat([yb for _, yb in loader])
    e2 = torch.cat([yb for _, yb in loader])
    assert not torch.equal(e1, e2) and sorted(e1.tolist()) == list(range(9))
    loader.reset()
    assert torch.equal(torch.cat([yb for _, yb in loader]), e1)
    assert len(MiniBatchLoader(x, y, batch_size=4, drop_last=True)) == 2


# --------------------------------------------------------------------------- digits


def test_load_digits_shapes_values_and_split():
    ds = load_digits()
    assert (ds.num_train, ds.num_test) == (1500, 297)
    assert ds.x_train.shape == (1500, 64) and ds.num_classes == 10
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert set(ds.y_train.unique().tolist()) == set(range(10))
    img = load_digits(flatten=False, scale=False, num_test=100, seed=1, dtype=torch.float64)
    assert img.x_train.shape == (1697, 1, 8, 8) and float(img.x_train.max()) == 16.0
    again = load_digits()
    assert torch.equal(again.x_test, ds.x_test)
    assert not torch.equal(load_digits(seed=1).y_test, ds.y_test)
    with pytest.raises(ValueError, match="num_test"):
        load_digits(num_test=5000)


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_templates():
    t = mnist1d_templates()
    assert t.shape == (10, 12)
    np.testing.assert_allclose(t[:, 0], 0.0, atol=1e-15)
    np.testing.assert_allclose(t[:, -1], 0.0, atol=1e-12)
    # standardised then shifted and divided by 6: each row has std 1/6
    np.testing.assert_allclose(t.std(axis=1), 1 / 6, rtol=1e-12)


def test_mnist1d_shapes_standardisation_and_balance():
    ds = make_mnist1d()
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    allx = torch.cat([ds.x_train, ds.x_test]).double()
    assert abs(float(allx.mean())) < 1e-5 and abs(float(allx.std(unbiased=False)) - 1) < 1e-5
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10)
    assert counts.tolist() == [500] * 10
    conv = make_mnist1d(20, 10, channel_dim=True)
    assert conv.x_train.shape == (20, 1, 40)


def test_mnist1d_deterministic_by_seed():
    a, b = make_mnist1d(50, 20, seed=3), make_mnist1d(50, 20, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, make_mnist1d(50, 20, seed=4).x_train)


def test_mnist1d_helpers_match_scipy_and_numpy():
    pytest.importorskip("scipy")
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 72))
    np.testing.assert_allclose(
        _gaussian_filter_rows(a, 2.0),
        gaussian_filter1d(a, 2.0, axis=1, mode="reflect"),
        atol=1e-12,
    )
    lengths = np.array([48, 60, 72])
    vals = rng.standard_normal((3, 72))
    out = _interp_rows(vals, lengths, 72)
    for i, n in enumerate(lengths):
        ref = np.interp(np.linspace(0, 1, 72), np.linspace(0, 1, n), vals[i, :n])
        np.testing.assert_allclose(out[i], ref, atol=1e-12)


def _mnist1d_one_example(template, d, i, *, padding=(36, 60), final=40):
    """Straightforward per-example version of the MNIST-1D steps (scipy, no vectorisation)."""
    pytest.importorskip("scipy")
    from scipy.interpolate import interp1d
    from scipy.ndimage import gaussian_filter

    def resample(v, n):
        return interp1d(np.linspace(0, 1, len(v)), v, kind="linear")(np.linspace(0, 1, n))

    x = np.concatenate([template + 1e-8, np.zeros(d["pad"][i])])
    x = resample(x, 12 + padding[1])
    x = x * (1 + 0.4 * (d["scale_u"][i] - 0.5))
    x = np.roll(x, d["shift"][i])
    mask = x != 0
    x = mask * x + (1 - mask) * gaussian_filter(0.25 * d["corr_z"][i], 2)
    x = x + 0.02 * d["iid_z"][i]
    x = x - 0.75 * (d["shear_u"][i] - 0.5) * np.linspace(-0.5, 0.5, len(x))
    return resample(x, final)


def test_mnist1d_vectorised_pipeline_matches_per_example_version():
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 10
    draws = _draw(30, rng, padding=(36, 60), max_translation=48)
    out = _transform(
        labels,
        draws,
        padding=(36, 60),
        scale_coeff=0.4,
        corr_noise_scale=0.25,
        iid_noise_scale=0.02,
        shear_scale=0.75,
        final_seq_length=40,
    )
    templates = mnist1d_templates()
    for i, label in enumerate(labels):
        ref = _mnist1d_one_example(templates[label], draws, i)
        np.testing.assert_allclose(out[i], ref, rtol=1e-9, atol=1e-12)


def test_mnist1d_noise_free_is_resampled_template():
    """With all randomness switched off the pipeline reduces to interpolating the template."""
    ds = make_mnist1d(
        10,
        0,
        padding=(0, 0),
        scale_coeff=0.0,
        max_translation=1,
        corr_noise_scale=0.0,
        iid_noise_scale=0.0,
        shear_scale=0.0,
        dtype=torch.float64,
    )
    t = mnist1d_templates() + 1e-8
    raw = np.stack([np.interp(np.linspace(0, 1, 40), np.linspace(0, 1, 12), r) for r in t])
    raw = raw[ds.y_train.numpy()]
    expected = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.x_train.numpy(), expected, atol=1e-10)


def test_mnist1d_rejects_bad_arguments():
    with pytest.raises(ValueError, match="padding"):
        make_mnist1d(10, 10, padding=(5, 1))
    with pytest.raises(ValueError, match="max_translation"):
        make_mnist1d(10, 10, max_translation=0)
    with pytest.raises(TypeError, match="num_train"):
        make_mnist1d(10.0, 10)


# --------------------------------------------------------------------------- curves


def test_curves_shapes_values_and_determinism():
    ds = make_curves(300, 100, seed=0)
    assert ds.x_train.shape == (300, 784) and ds.task == "reconstruction"
    assert ds.num_classes is None
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert bool((ds.x_train.amax(dim=1) > 0.5).all())  # every image shows a stroke
    frac_on = float((ds.x_train > 0).float().mean())
    assert 0.02 < frac_on < 0.4
    assert torch.equal(ds.x_test, make_curves(300, 100, seed=0).x_test)
    assert not torch.equal(ds.x_train, make_curves(300, 100, seed=1).x_train)
    img = make_curves(3, 1, flatten=False, image_size=16)
    assert img.x_train.shape == (3, 1, 16, 16)


def test_curves_quick_size_is_fast():
    start = time.perf_counter()
    ds = make_curves(2000, 1000, seed=0)
    assert ds.num_train == 2000
    assert time.perf_counter() - start < 5.0  # generous: the CPU may be shared


def test_render_straight_stroke_profile():
    pts = torch.tensor([[[4.0, 14.5], [14.0, 14.5], [24.0, 14.5]]], dtype=torch.float64)
    img = render_bezier_curves(pts, stroke_width=1.5)[0]
    assert torch.allclose(img[14, 5:23], torch.ones(18, dtype=torch.float64))
    assert torch.allclose(img[13, 5:23], torch.full((18,), 0.25, dtype=torch.float64))
    assert torch.allclose(img[15, 5:23], torch.full((18,), 0.25, dtype=torch.float64))
    assert float(img[:12].abs().sum()) == 0.0 and float(img[17:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="stroke_width"):
        render_bezier_curves(pts, stroke_width=5.0)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_images():
    ds = make_synthetic_images(8, 4, seed=0)
    assert ds.x_train.shape == (8, 3, 32, 32) and ds.y_train.max() < 10
    assert torch.equal(ds.x_train, make_synthetic_images(8, 4, seed=0).x_train)
    small = make_synthetic_images(2, 2, image_shape=(1, 8, 8), num_classes=3, dtype=torch.float64)
    assert small.x_train.shape == (2, 1, 8, 8) and small.x_train.dtype == torch.float64


# --------------------------------------------------------------------------- IDX / MNIST


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path: Path, dtype: type, suffix: str):
    arr = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, arr)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed
        with gzip.open(path, "rb") as f:
            header = f.read(4)
        assert header[:2] == b"\x00\x00" and header[3] == 3


def test_idx_header_validation(tmp_path: Path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00\x00\x00\x01" + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x00")
    with pytest.raises(ValueError, match="unknown IDX element type"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"\x00\x00")
    with pytest.raises(ValueError, match="needs 5 data bytes"):
        read_idx(bad)
    with pytest.raises(ValueError, match="cannot be stored"):
        write_idx(tmp_path / "c", np.zeros(2, dtype=np.uint32))


def _write_mnist(
    directory: Path, *, n_train: int = 5, n_test: int = 3, gz: bool = False, offset: int = 0
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(offset)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        ((np.arange(n_test) + offset) % 10).astype(np.uint8),
    ]
    arrays[0][0, 0, 0] = 255
    for name, arr in zip(MNIST_FILES, arrays):
        write_idx(directory / (name + (".gz" if gz else "")), arr)


def test_load_mnist_plain_files_in_root(tmp_path: Path):
    _write_mnist(tmp_path)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.x_train.shape == (5, 784) and ds.x_test.shape == (3, 784)
    assert float(ds.x_train[0, 0]) == 1.0 and float(ds.x_train.min()) >= 0.0
    raw = read_idx(tmp_path / MNIST_FILES[0])
    np.testing.assert_allclose(ds.x_train.numpy().reshape(5, 28, 28), raw / 255.0, rtol=1e-6)
    img = load_mnist(tmp_path, flatten=False, scale=False)
    assert img.x_train.shape == (5, 1, 28, 28) and float(img.x_train.max()) == 255.0


def test_load_mnist_gz_torchvision_layout_and_env(tmp_path: Path, monkeypatch):
    _write_mnist(tmp_path / "MNIST" / "raw", gz=True, offset=0)
    _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True, n_train=4, offset=1)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    mnist = load_mnist()
    fashion = load_mnist(kind="fashion")
    assert mnist.num_train == 5 and fashion.num_train == 4 and fashion.name == "fashion-mnist"
    assert fashion.y_test.tolist() == [1, 2, 3]


def test_load_mnist_kind_specific_directory_wins(tmp_path: Path):
    _write_mnist(tmp_path, n_train=7)  # plain files in root
    _write_mnist(tmp_path / "FashionMNIST" / "raw", n_train=2)
    assert load_mnist(tmp_path, kind="fashion").num_train == 2
    assert load_mnist(tmp_path, kind="mnist").num_train == 7


def test_load_mnist_missing_file_message(tmp_path: Path, monkeypatch):
    _write_mnist(tmp_path)
    (tmp_path / MNIST_FILES[3]).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    msg = str(info.value)
    assert MNIST_FILES[3] in msg and "CURVLAB_DATA" in msg
    assert str(tmp_path / "MNIST" / "raw" / MNIST_FILES[3]) in msg
    assert str(tmp_path / (MNIST_FILES[3] + ".gz")) in msg
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="CURVLAB_DATA"):
        load_mnist()
    with pytest.raises(ValueError, match="kind"):
        load_mnist(tmp_path, kind="kmnist")


def test_load_mnist_content_validation(tmp_path: Path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES[1], np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="5 images but"):
        load_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES[1], np.full(5, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"0\.\.9"):
        load_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES[1], np.zeros((5, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected labels"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(directory: Path, n: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        imgs = np.full((n, 3, 32, 32), 10 * i, dtype=np.uint8)
        write_cifar_batch(directory / f"data_batch_{i}", imgs, [(i + j) % 10 for j in range(n)])
    test = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    test[0, 0, 0, 0] = 255  # red channel, top-left pixel
    test[0, 2, 31, 31] = 51  # blue channel, bottom-right pixel
    write_cifar_batch(directory / "test_batch", test, list(range(n)))


def test_load_cifar10_layout_and_values(tmp_path: Path, monkeypatch):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    ds = load_cifar10()
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.y_train.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert float(ds.x_test[0, 0, 0, 0]) == 1.0
    assert float(ds.x_test[0, 2, 31, 31]) == pytest.approx(0.2)
    assert float(ds.x_test.sum()) == pytest.approx(1.2)
    assert float(ds.x_train[-1].max()) == pytest.approx(50 / 255)
    flat = load_cifar10(tmp_path, flatten=True)
    assert flat.x_train.shape == (10, 3072)


def test_load_cifar10_normalize(tmp_path: Path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(d / name, rng.integers(0, 256, (3, 3072), dtype=np.uint8), [0, 1, 2])
    ds = load_cifar10(tmp_path, normalize=True, dtype=torch.float64)
    mean = ds.x_train.mean(dim=(0, 2, 3))
    std = ds.x_train.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_load_cifar10_missing_and_malformed(tmp_path: Path):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path)
    msg = str(info.value)
    assert "test_batch" in msg and "CURVLAB_DATA" in msg
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in msg
    bad = tmp_path / "bad_batch"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        read_cifar_batch(bad)
    with open(bad, "wb") as f:
        pickle.dump({b"labels": [0]}, f)
    with pytest.raises(ValueError, match="missing key"):
        read_cifar_batch(bad)


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_cifar_reader_refuses_arbitrary_globals(tmp_path: Path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_batch(path)
    # Python 3 native pickles (protocol 5) of numpy arrays are accepted
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [4]}, f, protocol=5)
    assert read_cifar_batch(path)[1].tolist() == [4]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_quick_sizes():
    assert set(list_datasets()) == {
        "digits",
        "mnist1d",
        "curves",
        "synthetic-cifar",
        "mnist",
        "fashion-mnist",
        "cifar10",
    }
    sizes = {
        name: (ds.num_train, ds.num_test)
        for name in ("digits", "mnist1d", "curves", "synthetic-cifar")
        for ds in [get_dataset(name, quick=True, seed=0)]
    }
    assert sizes == {
        "digits": (1500, 297),
        "mnist1d": (1000, 500),
        "curves": (2000, 1000),
        "synthetic-cifar": (1024, 256),
    }
    ds = get_dataset("synthetic-cifar", quick=True, dtype=torch.float64, image_shape=(3, 8, 8))
    assert ds.x_train.shape == (1024, 3, 8, 8) and ds.dtype == torch.float64


def test_registry_errors():
    with pytest.raises(ValueError, match="known data sets: digits, mnist1d"):
        get_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown option"):
        get_dataset("mnist1d", quick=True, root="/tmp")
    with pytest.raises(FileNotFoundError, match="CURVLAB_DATA"):
        get_dataset("cifar10", root="/nonexistent/curvlab-data")


def test_registry_file_sets(tmp_path: Path):
    _write_mnist(tmp_path / "FashionMNIST" / "raw", n_train=30, n_test=20)
    _write_cifar(tmp_path / "cifar-10-batches-py", n=4)
    fm = get_dataset("fashion-mnist", root=tmp_path)
    assert fm.num_train == 30 and fm.name == "fashion-mnist"
    quick = get_dataset("fashion-mnist", root=tmp_path, quick=True)  # smaller than quick size
    assert quick.num_train == 30
    cifar = get_dataset("cifar10", root=tmp_path, quick=True, seed=1, normalize=False)
    assert cifar.x_train.shape == (20, 3, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_datasets_on_cuda():
    ds = get_dataset("mnist1d", quick=True, device="cuda")
    assert ds.x_train.is_cuda and ds.y_test.is_cuda
    loader = MiniBatchLoader(*ds.train, batch_size=64, seed=0)
    xb, yb = next(iter(loader))
    assert xb.is_cuda and yb.is_cuda and xb.shape == (64, 40)
    small = subsample(ds, num_train=10, seed=0)
    assert small.x_train.is_cuda
    assert ds.to("cpu").x_train.device.type == "cpu"
