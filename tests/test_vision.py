"""Vision loaders on small generated files in the real formats (idx, gzipped idx, CIFAR-10 python pickles)."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from chainfree.data.vision import load_cifar10, load_fashion_mnist, read_idx
from chainfree.errors import DataError
from chainfree.models.vision import VisionNet


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fashion(root, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        write_idx(root / name, arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    arrays = make_fashion(tmp_path, gz=gz)
    data = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(data.train_x, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.train_y, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.test_x, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test_y, arrays["t10k-labels-idx1-ubyte"])
    tx, ty, vx, vy = data.to_tensors()
    assert tx.shape == (12, 784) and vx.shape == (5, 784) and ty.dtype == torch.int64
    assert abs(float(tx.mean())) < 1e-4 and abs(float(tx.std()) - 1) < 1e-3  # train statistics


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_idx_rejects_truncated_file(tmp_path):
    write_idx(tmp_path / "x", np.zeros((3, 4), np.uint8), gz=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-2])
    with pytest.raises(DataError, match="body has"):
        read_idx(tmp_path / "x")


def test_cifar10_pickle_loader(tmp_path):
    rng = np.random.default_rng(1)
    batches = {}
    for name, n in [("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}
        batches[name] = batch
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_cifar10(tmp_path)
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(data.train_x[6].reshape(-1), batches["data_batch_2"][b"data"][0])
    np.testing.assert_array_equal(data.train_y[:6], batches["data_batch_1"][b"labels"])
    assert data.classes[0] == "airplane"
    with pytest.raises(DataError, match="CIFAR-10 python folder"):
        load_cifar10(tmp_path / "nowhere")


def test_vision_net_shapes():
    model = VisionNet(784, 10, d=32, n_layers=2)
    x = torch.randn(5, 784)
    assert model(x).shape == (5, 10)
    assert model(x, torch.zeros(5, dtype=torch.long)).dim() == 0
