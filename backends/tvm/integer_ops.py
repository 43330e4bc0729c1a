"""TE computes around the integer kernels: activation quantization to codes and the float32 rescale.

They follow :mod:`fxquant.integer` operation by operation so that codes and rescaled outputs match the
reference bit for bit. LLVM contracts ``a * b + c`` into a fused multiply-add (TVM enables FP-op fusion),
which rounds once instead of twice; ``llvm.arithmetic.fence`` around a product keeps it rounded the way
PyTorch's separate kernels round it. It costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

__all__ = ["fence", "uniform_codes", "threshold_codes", "lookup_values", "rescale"]


def fence(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """Keep ``value`` rounded on its own: LLVM may not fuse it into a neighbouring add."""
    return tirx.call_llvm_pure_intrin(str(value.ty), "llvm.arithmetic.fence", value)


def uniform_codes(x: te.Tensor, low: float, step: float, bits: int) -> te.Tensor:
    """``clamp(floor((x - low) / step + 0.5), 0, 2**bits - 1)`` as int32, in float32 like the reference."""
    low_c, step_c = tirx.const(low, "float32"), tirx.const(step, "float32")
    half, top = tirx.const(0.5, "float32"), tirx.const(float(2**bits - 1), "float32")
    zero = tirx.const(0.0, "float32")

    def code(*idx: tirx.Var) -> tirx.PrimExpr:
        value = tirx.floor((fence(x(*idx)) - low_c) / step_c + half)
        return tirx.max(tirx.min(value, top), zero).astype("int32")

    return te.compute(x.shape, code, name="codes")


def threshold_codes(x: te.Tensor, thresholds: te.Tensor) -> te.Tensor:
    """How many sorted thresholds ``x`` reaches (``bucketize(right=True)``), as int32.

    A reduction over the threshold axis: a sum of unrolled comparisons grows TVM's simplification
    time with the square of its length, and a let-bound binary search breaks block region analysis.
    """
    k = te.reduce_axis((0, int(thresholds.shape[0])), "k")
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")
    return te.compute(
        x.shape, lambda *idx: te.sum(tirx.Select(thresholds[k] <= fence(x(*idx)), one, zero), axis=k), name="codes"
    )


def lookup_values(codes: te.Tensor, table: te.Tensor) -> te.Tensor:
    """Codebook inputs: each code replaced by its integer level, ``table[code]``."""
    return te.compute(codes.shape, lambda *idx: table[codes(*idx)].astype("int32"), name="levels")


def _broadcast(t: te.Tensor, idx: Sequence[tirx.Var]) -> tirx.PrimExpr:
    """``t`` indexed numpy-style: its size-1 dimensions broadcast against the output index."""
    offset = len(idx) - len(t.shape)
    return t(*[0 if int(t.shape[d]) == 1 else idx[offset + d] for d in range(len(t.shape))])


def rescale(acc: te.Tensor, scale: te.Tensor, const: te.Tensor) -> te.Tensor:
    """``float32(acc) * scale + const``: two roundings, as in the reference (``const`` holds bias and offset)."""

    def value(*idx: tirx.Var) -> tirx.PrimExpr:
        return fence(acc(*idx).astype("float32") * _broadcast(scale, idx)) + _broadcast(const, idx)

    return te.compute(acc.shape, value, name="rescale")
