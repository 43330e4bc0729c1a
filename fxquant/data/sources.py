"""Datasets the pipeline commands train and verify on, named by one string.

``"fashion-mnist"`` is the bundled Fashion-MNIST (:mod:`fxquant.data.fashion_mnist`). Any other value is a folder in
torchvision's ``ImageFolder`` layout (one sub-folder per class); when it has ``train/`` and ``val/`` (or
``test/``) sub-folders those are the splits, otherwise the folder serves both. Images are loaded into
memory (so they must share one size), as RGB, or as grayscale for one-channel models, scaled to [0, 1].
Batches come from :class:`fxquant.data.fashion_mnist.TensorBatches`, whose seeded shuffling the trainer can replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fxquant.data.fashion_mnist import FASHION_MNIST_DIR, TensorBatches, fashion_mnist_loaders
from fxquant.errors import ConfigError

__all__ = ["DataSpec", "open_data", "data_location", "DATA_SOURCES"]


@dataclass(frozen=True)
class DataSpec:
    """Which data, in which batches; ``*_subset`` keeps a seeded random subset of that many samples."""

    source: str = "fashion-mnist"
    batch_size: int = 64
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0
    channels: int | None = None  # image folders: 1 loads grayscale, anything else RGB

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} is invalid: expected a positive integer")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is invalid: expected a positive integer or none")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fashion_mnist(spec: DataSpec) -> tuple[TensorBatches, TensorBatches]:
    return fashion_mnist_loaders(spec.batch_size, spec.train_subset, spec.test_subset, spec.seed)


def _load_folder(root: Path, grayscale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets, transforms

    steps = [transforms.Grayscale(1)] if grayscale else []
    try:
        folder = datasets.ImageFolder(str(root), transform=transforms.Compose([*steps, transforms.ToTensor()]))
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"data folder {root}: {exc}") from exc
    images = []
    for i, (path, _) in enumerate(folder.samples):
        try:
            images.append(folder[i][0])
        except Exception as exc:  # PIL raises many types for damaged or foreign files
            raise ConfigError(f"data folder {root}: cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    sizes = sorted({tuple(im.shape) for im in images})
    if len(sizes) > 1:
        raise ConfigError(f"data folder {root}: images differ in size ({sizes[:3]}); resize them to one size first")
    return torch.stack(images), torch.tensor(folder.targets, dtype=torch.int64)


def _subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(labels):
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[keep], labels[keep]


def _image_folder(spec: DataSpec) -> tuple[TensorBatches, TensorBatches]:
    root = Path(spec.source)
    if not root.is_dir():
        raise ConfigError(
            f"data={spec.source!r} is neither a known dataset ({', '.join(DATA_SOURCES)}) nor an image folder"
        )
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    train_dir = root / "train" if (root / "train").is_dir() and test_dir is not None else root
    splits = ((train_dir, spec.train_subset, True), (test_dir or root, spec.test_subset, False))
    loaders = []
    for split_dir, subset, shuffle in splits:
        images, labels = _subset(*_load_folder(split_dir, spec.channels == 1), subset, spec.seed)
        loaders.append(TensorBatches(images, labels, spec.batch_size, shuffle, spec.seed))
    return loaders[0], loaders[1]


#: dataset name -> loader; any other source string is an ImageFolder path
DATA_SOURCES: dict[str, Callable[[DataSpec], tuple[TensorBatches, TensorBatches]]] = {
    "fashion-mnist": _fashion_mnist,
}


def open_data(spec: DataSpec) -> tuple[TensorBatches, TensorBatches]:
    """Train (shuffled, seeded) and test batches.

    Example::

        train, test = open_data(DataSpec("fashion-mnist", batch_size=32, train_subset=512))
    """
    return DATA_SOURCES.get(spec.source, _image_folder)(spec)


def data_location(spec: DataSpec) -> str | None:
    """The file or folder holding the data (reports hash it), or ``None`` when it does not exist."""
    path = FASHION_MNIST_DIR if spec.source == "fashion-mnist" else Path(spec.source)
    return str(path) if path.exists() else None
