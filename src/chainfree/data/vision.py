"""Vision data for HBLL's experiments: Fashion-MNIST from idx files and CIFAR-10 from its python pickles.

Nothing downloads. Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (idx files under
/usr/share/datasets/fashion-mnist, gzipped) or any folder holding the four standard idx files (set
`root` or $CHAINFREE_FASHION_MNIST). CIFAR-10 is read from the "python version" folder
(data_batch_1..5, test_batch: pickled dicts with b'data' uint8 [n, 3072] and b'labels').
Images are returned as uint8 arrays; `to_tensors` scales them to float and normalises with the train
split's mean/std (statistics of the train split only, so the test split stays unseen).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chainfree.errors import DataError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


@dataclass
class VisionData:
    train_x: np.ndarray  # uint8 [n, H, W] or [n, C, H, W]
    train_y: np.ndarray  # int64 [n]
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str

    def to_tensors(self, device: str | torch.device = "cpu", flatten: bool = True):
        """(train_x, train_y, test_x, test_y) float tensors normalised by the train split's mean/std."""
        tx = torch.from_numpy(self.train_x.astype(np.float32) / 255.0)
        vx = torch.from_numpy(self.test_x.astype(np.float32) / 255.0)
        mean, std = tx.mean(), tx.std().clamp_min(1e-6)
        tx, vx = (tx - mean) / std, (vx - mean) / std
        if flatten:
            tx, vx = tx.reshape(len(tx), -1), vx.reshape(len(vx), -1)
        ty, vy = torch.from_numpy(self.train_y.astype(np.int64)), torch.from_numpy(self.test_y.astype(np.int64))
        return tx.to(device), ty.to(device), vx.to(device), vy.to(device)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0x0000 <dtype byte> <ndim byte>, big-endian int32 dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an idx file (bad magic {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown idx element type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(f"{path}: idx header says {dims} ({count * dtype.itemsize} bytes) but body has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(root: str | Path | None = None) -> VisionData:
    """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from idx files; never downloads."""
    candidates = [Path(root)] if root else []
    if not root and os.environ.get("CHAINFREE_FASHION_MNIST"):
        candidates.append(Path(os.environ["CHAINFREE_FASHION_MNIST"]))
    if not root:
        candidates += [Path(d) for d in FASHION_MNIST_DIRS]
    for cand in candidates:
        paths = {key: _find(cand, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(paths.values()):
            arrays = {key: read_idx(p) for key, p in paths.items()}  # type: ignore[arg-type]
            for split in ("train", "test"):
                if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
                    raise DataError(f"{cand}: {split} images and labels differ in count")
            return VisionData(arrays["train_x"], arrays["train_y"].astype(np.int64), arrays["test_x"],
                              arrays["test_y"].astype(np.int64), FASHION_MNIST_CLASSES, f"fashion-mnist:{cand}")
    where = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Fashion-MNIST idx files not found (looked in {where}). Install the Debian package: "
        "`sudo apt-get install -y dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
        "or point $CHAINFREE_FASHION_MNIST / root= at a folder with train-images-idx3-ubyte[.gz] and the "
        "other three standard files."
    )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar10(root: str | Path) -> VisionData:
    """CIFAR-10 'python version' folder (data_batch_1..5, test_batch). Images as uint8 [n, 3, 32, 32]."""
    root = Path(root)
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.is_file():
        raise DataError(
            f"{root}: not a CIFAR-10 python folder (need data_batch_1..5 and test_batch, as in "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
        )

    def read(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for p in paths:
            d = _unpickle(p)
            if b"data" not in d or b"labels" not in d:
                raise DataError(f"{p}: CIFAR batch without b'data'/b'labels' keys (got {sorted(d)[:5]})")
            x = np.asarray(d[b"data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"{p}: CIFAR data must be uint8 [n, 3072], got {x.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    tx, ty = read(train_files)
    vx, vy = read([test_file])
    return VisionData(tx, ty, vx, vy, CIFAR10_CLASSES, f"cifar10:{root}")
