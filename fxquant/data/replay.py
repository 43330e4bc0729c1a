"""Replaying an epoch: the one way a resumed run (training or the SDQ search) gets back the batches it had not
yet consumed, in the order an uninterrupted run would have seen them."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["loader_generator", "replay_epoch"]


def loader_generator(loader: Iterable[Any]) -> torch.Generator | None:
    """The generator a loader shuffles with (``TensorBatches``, or a ``DataLoader`` given one), if any."""
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def replay_epoch(
    loader: Iterable[Any], loader_rng: torch.Tensor | None, skip: int, global_rng: torch.Tensor | None = None
) -> Iterator[Any]:
    """The batches of the epoch whose shuffle began at ``loader_rng`` (the loader's generator state) and, for
    loaders that shuffle with torch's global RNG, ``global_rng``, from batch ``skip`` on.

    The skipped batches are drawn now, before this returns, so whatever RNG they consume is consumed at the
    same point as in the original run (a caller restores its own RNG state afterwards).
    """
    if global_rng is not None:
        torch.set_rng_state(global_rng)
    gen = loader_generator(loader)
    if gen is not None and loader_rng is not None:
        gen.set_state(loader_rng)
    iterator = iter(loader)
    for _ in itertools.islice(iterator, skip):
        pass
    return iterator
