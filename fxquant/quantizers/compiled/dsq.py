"""DSQ's training passes as TVM kernels: the hard forward and the soft backward with its parameter sums.

The arithmetic is that of ``fxquant.quantizers.dsq`` (``_hard`` and ``_soft_terms``), which documents it.
"""

from __future__ import annotations

import functools

import torch

from fxquant.quantizers.compiled.runtime import (
    F32,
    KERNEL_BLOCK,
    LANES,
    ROWS,
    VectorOps,
    as_blocks,
    block_args,
    call_kernel,
    register_kernel,
    scalar_args,
    tvm_tensor,
)

__all__ = ["forward_kernel", "dsq_forward", "dsq_backward", "DSQ_SUMS"]

DSQ_SUMS = 7  # Σ g·tc, Σ g·frac, Σ g·σ, Σ g, Σ grad_x·tc, Σ grad_x, Σ slope·z


def forward_kernel(has_low: bool) -> str:
    """The forward variant :func:`dsq_forward` runs (``has_low=False``: ``l = 0``)."""
    return "dsq_forward" if has_low else "dsq_forward_zero_low"


def dsq_forward(x: torch.Tensor, out: torch.Tensor, low: float | None, step: float, top: int) -> int:
    """``out = l + Δ·clamp(floor((x − l)/Δ + ½), 0, top)`` over the leading whole blocks; returns their length.

    ``low=None`` is ``l = 0`` without the subtraction and addition (bit-identical to ``_hard``).
    """
    blocks = x.numel() // KERNEL_BLOCK
    args = (as_blocks(x, blocks), as_blocks(out, blocks), 0.0 if low is None else low, step, float(top))
    call_kernel(forward_kernel(low is not None), *args)
    return blocks * KERNEL_BLOCK


def dsq_backward(
    x: torch.Tensor, grad: torch.Tensor, grad_x: torch.Tensor, low: float, step: float, top: int,
    two_k: float, two_s_k: float,
) -> tuple[int, torch.Tensor]:
    """DSQ's soft backward over the leading whole blocks of ``x``: ``(elements covered, sums)``.

    Per element, with ``t = (x − l)/Δ``, ``tc = clamp(t, 0, top)``, ``frac = tc − floor(tc)``,
    ``z = 2K(frac − ½)``, ``σ = sigmoid(z)`` and ``slope = g·σ(1 − σ)``: ``grad_x = slope·1{t = tc}·2sK``.
    ``sums`` (:data:`DSQ_SUMS` of them) are Σ g·tc, Σ g·frac, Σ g·σ, Σ g, Σ grad_x·tc, Σ grad_x, Σ slope·z.
    """
    blocks = x.numel() // KERNEL_BLOCK
    partial = torch.empty((blocks, DSQ_SUMS, LANES), dtype=torch.float32)
    call_kernel("dsq_backward", *(as_blocks(t, blocks) for t in (x, grad, grad_x)), tvm_tensor(partial),
                low, step, float(top), two_k, two_s_k)
    return blocks * KERNEL_BLOCK, partial.sum((0, 2))


def _build_forward(has_low: bool):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    v = VectorOps()
    blocks = tirx.Var("blocks", "int64")
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(forward_kernel(has_low))
            x, out = block_args(T, blocks, ("x", "out"))
            low, step, top = scalar_args(T, ("low", "step", "top"))
            T.func_attr({"tirx.noalias": True})
            with T.parallel(0, blocks) as b:
                with T.serial(0, ROWS) as j:
                    xv = x[b, j, v.ramp]
                    t = (xv - v.splat(low) if has_low else xv) / v.splat(step)
                    code = tirx.floor(tirx.min(tirx.max(t, v.const(0.0)), v.splat(top)) + v.const(0.5))
                    value = code * v.splat(step)
                    T.buffer_store(out, v.fence(value) + v.splat(low) if has_low else value, [b, j, v.ramp])
    return ib.get()


for _has_low in (True, False):
    register_kernel(forward_kernel(_has_low))(functools.partial(_build_forward, _has_low))


@register_kernel("dsq_backward")
def _build_backward():
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    v = VectorOps()
    blocks = tirx.Var("blocks", "int64")
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("dsq_backward")
            x, g, gx = block_args(T, blocks, ("x", "grad", "grad_x"))
            partial = T.arg("partial", T.buffer((blocks, DSQ_SUMS, LANES), F32))
            low, step, top, two_k, two_s_k = scalar_args(T, ("low", "step", "top", "two_k", "two_s_k"))
            T.func_attr({"tirx.noalias": True})
            with T.parallel(0, blocks) as b:
                acc = T.alloc_buffer((DSQ_SUMS, LANES), F32, scope="local")
                for k in range(DSQ_SUMS):
                    T.buffer_store(acc, v.const(0.0), [k, v.ramp])
                with T.serial(0, ROWS) as j:
                    gv = g[b, j, v.ramp]
                    t = (x[b, j, v.ramp] - v.splat(low)) / v.splat(step)
                    tc = tirx.min(tirx.max(t, v.const(0.0)), v.splat(top))
                    inside = tirx.Select(t == tc, v.const(1.0), v.const(0.0))
                    frac = tc - tirx.floor(tc)
                    z = v.splat(two_k) * (frac - v.const(0.5))
                    sig = v.sigmoid(z)
                    slope = gv * sig * (v.const(1.0) - sig)
                    gxv = slope * inside * v.splat(two_s_k)
                    T.buffer_store(gx, gxv, [b, j, v.ramp])
                    for k, term in enumerate((gv * tc, gv * frac, gv * sig, gv, gxv * tc, gxv, slope * z)):
                        T.buffer_store(acc, acc[k, v.ramp] + term, [k, v.ramp])
                for k in range(DSQ_SUMS):
                    T.buffer_store(partial, acc[k, v.ramp], [b, k, v.ramp])
    return ib.get()
