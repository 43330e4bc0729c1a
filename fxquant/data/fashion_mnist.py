"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, held in memory.

The IDX files are read directly (no download, no unpacking); batches are slices of one tensor, which
keeps data loading negligible next to the model on a 2-core machine.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fxquant.errors import FxQuantError

__all__ = ["FASHION_MNIST_DIR", "load_fashion_mnist", "TensorBatches", "fashion_mnist_loaders", "CLASSES"]

FASHION_MNIST_DIR = Path(os.environ.get("FXQUANT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise FxQuantError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as normalised float32 ``(N, 1, 28, 28)`` and labels as int64 ``(N,)``."""
    if split not in _FILES:
        raise FxQuantError(f"split={split!r} is invalid; allowed: train, test")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    paths = [root / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FxQuantError(
            f"Fashion-MNIST files not found: {missing}. Install them with `apt-get install dataset-fashion-mnist` "
            "or set FXQUANT_FASHION_MNIST to a folder holding the four IDX .gz files."
        )
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    return images, labels


class TensorBatches:
    """Mini-batches over in-memory tensors; reshuffled each epoch from a seeded generator (deterministic)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start: start + self.batch_size]
            yield self.images[idx], self.labels[idx]


def fashion_mnist_loaders(
    batch_size: int = 128, train_subset: int | None = None, test_subset: int | None = None, seed: int = 0
) -> tuple[TensorBatches, TensorBatches]:
    """Train and test batches; ``*_subset`` keeps a fixed, class-balanced-by-chance prefix of a seeded shuffle."""
    loaders = []
    for split, subset, shuffle in (("train", train_subset, True), ("test", test_subset, False)):
        images, labels = load_fashion_mnist(split)
        if subset is not None and subset < len(labels):
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:subset]
            images, labels = images[keep], labels[keep]
        loaders.append(TensorBatches(images, labels, batch_size, shuffle, seed))
    return loaders[0], loaders[1]
