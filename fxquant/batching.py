"""Running a model compiled for fixed batch sizes on a batch of any size: cut, zero-padded, joined.

TVM builds have static shapes. A build can hold several batch sizes (``convert(..., batch_sizes=(1, 8))``);
a batch that matches none of them runs as a sequence of calls: the largest compiled size that fits first,
and a remainder smaller than every compiled size zero-padded up to the smallest one (its padded rows are
dropped from the outputs). That is exact for models that treat samples independently, which every
eval-mode classifier does (batch norm is folded into the integer layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fxquant.errors import ConfigError, InputError

__all__ = ["check_batch_sizes", "batch_plan", "split_batches", "join_batches", "run_in_batches"]


def check_batch_sizes(sizes: Sequence[int], option: str = "batch_sizes") -> tuple[int, ...]:
    """Distinct positive integers, in the order given (the first is the build's main function)."""
    if isinstance(sizes, int | str) or not isinstance(sizes, Sequence) or not sizes:
        raise ConfigError(f"{option}={sizes!r} is invalid: expected a non-empty list of positive integers")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{option}={list(sizes)!r} is invalid: {size!r} is not a positive integer")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"{option}={list(sizes)!r} is invalid: a batch size is listed twice")
    return tuple(sizes)


def batch_plan(samples: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(compiled size, real samples)`` for each call that runs ``samples`` samples.

    Greedy from the largest compiled size that fits, so no sample is computed twice and padding happens at
    most once, in the last call (when the remainder is smaller than every compiled size).
    """
    if samples < 1:
        raise InputError(f"a batch of {samples} samples cannot run: expected at least one")
    plan, left = [], samples
    descending = sorted(sizes, reverse=True)
    while left:
        fitting = [s for s in descending if s <= left]
        size = fitting[0] if fitting else min(sizes)
        plan.append((size, min(size, left)))
        left -= plan[-1][1]
    return plan


def split_batches(inputs: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[tuple[list[torch.Tensor], int]]:
    """``inputs`` (leading dimension = samples) cut by :func:`batch_plan`: each piece zero-padded to its
    compiled size, with the number of real samples in it."""
    counts = {int(x.shape[0]) if x.dim() else 0 for x in inputs}
    if len(counts) != 1 or 0 in counts:
        raise InputError("inputs of different batch sizes (or without a batch dimension) cannot be split into "
                         f"the compiled batch sizes {list(sizes)}")
    start, pieces = 0, []
    for size, real in batch_plan(counts.pop(), sizes):
        chunk = [x[start:start + real] for x in inputs]
        if real < size:
            chunk = [torch.cat([c, c.new_zeros((size - real, *c.shape[1:]))]) for c in chunk]
        pieces.append((chunk, real))
        start += real
    return pieces


def join_batches(outputs: Sequence[Sequence[torch.Tensor]], reals: Sequence[int]) -> list[torch.Tensor]:
    """Each piece's outputs cut to its real samples and joined in order (the inverse of :func:`split_batches`)."""
    for values, real in zip(outputs, reals, strict=True):
        if any(v.dim() == 0 or v.shape[0] < real for v in values):
            raise InputError("an output has no leading batch dimension, so its batches cannot be split and "
                             "joined: pass inputs of a compiled batch size")
    return [torch.cat([values[i][:real] for values, real in zip(outputs, reals, strict=True)])
            for i in range(len(outputs[0]))]


def run_in_batches(
    call: Callable[[list[torch.Tensor]], list[torch.Tensor]], inputs: Sequence[torch.Tensor], sizes: Sequence[int]
) -> list[torch.Tensor]:
    """``call`` on each piece of :func:`split_batches`, its outputs joined back in order."""
    pieces = split_batches(inputs, sizes)
    return join_batches([call(chunk) for chunk, _ in pieces], [real for _, real in pieces])
