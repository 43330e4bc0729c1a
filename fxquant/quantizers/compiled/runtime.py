"""Compiling, caching and calling the TVM kernels of the soft quantizers, and their vector arithmetic.

A kernel is a ``PrimFunc`` builder registered under a name (:func:`register_kernel`); it is compiled for the
host CPU (``fxquant.tvm_host.host_target_dict``) the first time it is used in a process and
called on torch tensors through DLPack (no copy). Kernels write explicit 8-lane float32 vectors (one AVX2
register, two NEON registers): TVM's loop vectorizer mishandles values bound inside a vectorized loop, and
LLVM would call scalar ``expf`` for every lane, hence :func:`VectorOps.exp`.
"""

from __future__ import annotations

import collections
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxquant.tvm_host import ensure_pool_size, host_target_dict

__all__ = [
    "CALLS", "KERNEL_BLOCK", "LANES", "register_kernel", "kernels_enabled", "call_kernel", "as_blocks", "tvm_tensor",
    "block_args", "scalar_args", "VectorOps",
]

KERNEL_BLOCK = 4096  #: elements per parallel task; a kernel covers ``numel // KERNEL_BLOCK`` whole blocks
LANES = 8
ROWS = KERNEL_BLOCK // LANES  # vectors per block
F32 = "float32"

_BUILDERS: dict[str, Callable] = {}
#: calls per kernel name in this process (what a training step actually ran)
CALLS: collections.Counter[str] = collections.Counter()


def register_kernel(name: str) -> Callable[[Callable], Callable]:
    """Register a builder ``() -> PrimFunc`` (the function named ``name``)."""

    def wrap(builder: Callable) -> Callable:
        if name in _BUILDERS:
            raise ValueError(f"kernel {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return wrap


def kernels_enabled(kernel: str, x: torch.Tensor) -> bool:
    """Whether kernel ``kernel`` may run on ``x``: contiguous float32 on CPU, at least one block, eager mode.

    ``FXQUANT_TVM_KERNELS=0`` turns every kernel off (the PyTorch code, the reference, runs instead).
    """
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.is_contiguous()
        and x.numel() >= KERNEL_BLOCK
        and not torch.compiler.is_compiling()
        and os.environ.get("FXQUANT_TVM_KERNELS", "1") != "0"
        and _compiled(kernel) is not None
    )


def as_blocks(t: torch.Tensor, blocks: int):
    """The leading ``blocks`` whole blocks of contiguous ``t`` as a ``(blocks, ROWS, LANES)`` TVM tensor."""
    import tvm

    return tvm.runtime.from_dlpack(t.view(-1)[: blocks * KERNEL_BLOCK].view(blocks, ROWS, LANES))


def tvm_tensor(t: torch.Tensor):
    import tvm

    return tvm.runtime.from_dlpack(t)


def block_args(T, blocks, names: tuple[str, ...], dtype: str = F32) -> list:
    """Kernel arguments ``names``, each ``blocks`` whole blocks as ``(blocks, ROWS, LANES)`` (see :func:`as_blocks`)."""
    return [T.arg(n, T.buffer((blocks, ROWS, LANES), dtype)) for n in names]


def scalar_args(T, names: tuple[str, ...], dtype: str = F32) -> list:
    """Scalar kernel arguments ``names``."""
    from tvm import tirx

    return [T.arg(n, tirx.Var(n, dtype)) for n in names]


def call_kernel(name: str, *args) -> None:
    """Run kernel ``name``; tensor arguments must already be TVM tensors (:func:`as_blocks`)."""
    ensure_pool_size(torch.get_num_threads())
    _compiled(name)(*args)
    CALLS[name] += 1


@functools.cache
def _compiled(name: str) -> Callable | None:
    """The compiled kernel, or None (with one warning) when TVM cannot build it for this host."""
    try:
        import tvm

        module = tvm.compile(tvm.IRModule({name: _BUILDERS[name]()}), target=host_target_dict())
        return module[name]
    except Exception as exc:  # a host TVM cannot target: fall back rather than fail training
        warnings.warn(f"fxquant: TVM kernel {name!r} could not be built ({exc}); using the PyTorch code", stacklevel=3)
        return None


@dataclass(frozen=True)
class VectorOps:
    """Helpers for ``float32x8`` expressions."""

    lanes: int = LANES

    @property
    def ramp(self):
        from tvm import tirx

        return tirx.Ramp(0, 1, self.lanes)

    def const(self, value: float, dtype: str = F32):
        from tvm import tirx

        return tirx.Broadcast(tirx.const(value, dtype), self.lanes)

    def splat(self, scalar):
        from tvm import tirx

        return tirx.Broadcast(scalar, self.lanes)

    def fence(self, value):
        """Keep ``value`` rounded on its own: LLVM may not contract it into a following add (bit-exact values)."""
        from tvm import tirx

        return tirx.call_llvm_pure_intrin(str(value.ty), "llvm.arithmetic.fence", value)

    def exp(self, x):
        """``exp``: ``2^n·p(r)`` with ``|r| ≤ ln2/2`` and Cephes ``expf``'s polynomial (about 1 ulp).

        Inputs are clamped to ±88.38; at the bottom the result is 0 rather than a subnormal.
        """
        from tvm import tirx

        x = tirx.max(tirx.min(x, self.const(88.3762626647949)), self.const(-88.3762626647949))
        n = tirx.floor(x * self.const(1.44269504088896341) + self.const(0.5))
        r = x - n * self.const(0.693359375) - n * self.const(-2.12194440e-4)  # ln 2 in two parts
        p = self.const(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = p * r + self.const(c)
        p = p * r * r + r + self.const(1.0)
        biased = tirx.Cast(f"int32x{self.lanes}", n) + self.const(127, "int32")
        return p * tirx.reinterpret(f"{F32}x{self.lanes}", biased << self.const(23, "int32"))

    def sigmoid(self, x):
        return self.const(1.0) / (self.const(1.0) + self.exp(self.const(0.0) - x))
