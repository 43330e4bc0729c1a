"""A converted model checks its input against the shape it was prepared for, and refuses NaN and Inf.

Integer layers check channels, but a wrong height/width or a stray dtype can still flow through pooling
and give confident nonsense; deployed artifacts are built for one input shape, so the reference is too.

Non-finite inputs are refused (:class:`~fxquant.errors.InputError`) rather than propagated: the first
integer layer rounds them to some code, and which code differs between the torch reference, the x86 and
the aarch64 builds, so no backend could promise the reference's output. Every backend checks the same way:
this guard, ``TvmModule`` (``"tvm-llvm"``) and ``run_model.py`` (``"tvm-arm"``, exit status 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fxquant.errors import InputError

__all__ = ["InputGuard", "check_finite"]


def _all_finite(x: torch.Tensor) -> bool:
    """numpy's check for CPU float32/float64 tensors: one thread, where PyTorch's parallel reduction waits for
    its intra-op pool, whose threads share the cores with a running TVM pool (23 ms instead of 0.1 ms for one
    224x224 image, measured on the 2-core host after a TVM call)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise :class:`InputError` naming ``what`` and the count of NaN/Inf values when ``x`` has any."""
    if x.is_floating_point() and not _all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        nan = int(torch.isnan(x).sum())
        raise InputError(f"{what} holds {bad} non-finite value(s) ({nan} NaN, {bad - nan} Inf) of {x.numel()}; "
                         "fxquant models accept finite inputs only")


class InputGuard(nn.Module):
    """Calls ``model`` after checking that the input is a float32 ``(N, *input_shape)`` tensor.

    Example::

        ref = InputGuard(fxquant.convert(qmodel), (1, 28, 28))
        ref(torch.zeros(2, 3, 28, 28))   # InputError: expected input of shape (N, 1, 28, 28) ...
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.dtype = dtype

    def check(self, x: object) -> None:
        expected = f"(N, {', '.join(map(str, self.input_shape))}) {str(self.dtype).removeprefix('torch.')}"
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a tensor of shape {expected}, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise InputError(f"expected input of shape {expected}, got dtype {str(x.dtype).removeprefix('torch.')}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"expected input of shape {expected}, got shape {tuple(x.shape)}")
        check_finite(x, "the input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.model(x)
