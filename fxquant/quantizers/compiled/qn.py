"""Quantization Networks' training function for evenly spaced thresholds as two TVM kernels.

Forward: ``out = α·(S(βx) + q_0)`` with ``S`` the windowed sigmoid sum of
``fxquant.quantizers.qn._QNSoft.even_window`` (which documents the window: only the ``width`` thresholds
around each value get a sigmoid, those below add ``σ(10)`` and those above ``σ(−10)``), and ``D = S'(βx)``
(the original code's derivative, ``s·T·(Σ_window σ(1 − σ) + outside)``), kept for the backward instead of
the window's sigmoids. Backward: ``grad_x = g·αβ·D`` and the sums ``Σ g·x·D`` (for β) and ``Σ g·out``
(for α, ``∂out/∂α = out/α``).
"""

from __future__ import annotations

import functools
import math

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

__all__ = ["forward_kernel", "qn_even_forward", "qn_even_backward", "QN_SUMS"]

QN_SUMS = 2  # Σ g·x·D, Σ g·out
#: the largest T·gap for which the window's exponentials are a running product (see _build_forward)
GEOMETRIC_MAX_STEP = 50.0


_FORWARD_NAMES = {True: "qn_even_forward_geometric", False: "qn_even_forward"}  # by ``geometric``


def forward_kernel(temperature: float, gap: float) -> str:
    """The forward variant :func:`qn_even_forward` runs for this temperature and threshold gap."""
    return _FORWARD_NAMES[temperature * gap <= GEOMETRIC_MAX_STEP]


def qn_even_forward(
    x: torch.Tensor, out: torch.Tensor, derivative: torch.Tensor, *, alpha: float, beta: float, low_target: float,
    first_bias: float, gap: float, reach: float, last_first: int, width: int, temperature: float, height: float,
    top: float, clamp: float, outside_slope: float,
) -> int:
    """Fill ``out`` and ``derivative`` over the leading whole blocks of ``x``; returns the elements covered.

    ``last_first = n − width`` (the highest first threshold of a window), ``top = σ(clamp)``,
    ``outside_slope = (n − width)·top·(1 − top)``, ``low_target = q_0``.
    """
    blocks = x.numel() // KERNEL_BLOCK
    t_gap = temperature * gap
    call_kernel(
        forward_kernel(temperature, gap), *(as_blocks(t, blocks) for t in (x, out, derivative)),
        alpha, beta, low_target, first_bias, gap, reach / gap, float(last_first), t_gap, height, top,
        clamp, outside_slope, height * temperature, math.exp(min(t_gap, GEOMETRIC_MAX_STEP)), math.exp(-clamp),
        math.exp(clamp), width,
    )
    return blocks * KERNEL_BLOCK


def qn_even_backward(
    x: torch.Tensor, grad: torch.Tensor, derivative: torch.Tensor, out: torch.Tensor, grad_x: torch.Tensor,
    alpha_beta: float,
) -> tuple[int, torch.Tensor]:
    """``grad_x = g·αβ·D`` over the leading whole blocks: ``(elements covered, [Σ g·x·D, Σ g·out])``."""
    blocks = x.numel() // KERNEL_BLOCK
    partial = torch.empty((blocks, QN_SUMS, LANES), dtype=torch.float32)
    call_kernel("qn_even_backward", *(as_blocks(t, blocks) for t in (x, grad, derivative, out, grad_x)),
                tvm_tensor(partial), alpha_beta)
    return blocks * KERNEL_BLOCK, partial.sum((0, 2))


def _build_forward(geometric: bool):
    """The forward; ``geometric`` computes the window's ``exp(−T(z − b_k))`` as one ``exp`` times ``e^{Tg}``
    per threshold (a multiply instead of an ``exp``), clamped to ``e^{±10}`` like the arguments. Exact in
    real arithmetic while the products stay within float32's range around the clamp: ``Tg ≤ 50`` (inputs
    far beyond the thresholds saturate ``exp`` at ``e^{±88}``, at least 38 from the clamp, and a window
    spans at most ``20 + Tg``)."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    v = VectorOps()
    names = ("alpha", "beta", "low_target", "first_bias", "gap", "reach_in_gaps", "last_first", "t_gap", "height",
             "top", "clamp", "outside_slope", "gain", "ratio", "exp_low", "exp_high")
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(_FORWARD_NAMES[geometric])
            blocks = tirx.Var("blocks", "int64")
            x, out, derivative = block_args(T, blocks, ("x", "out", "derivative"))
            (alpha, beta, q0, b0, gap, reach, last_first, t_gap, height, top, clamp, outside, gain, ratio, exp_low,
             exp_high) = scalar_args(T, names)
            (width,) = scalar_args(T, ("width",), "int32")
            T.func_attr({"tirx.noalias": True})
            with T.parallel(0, blocks) as b:
                # rows: Σ σ and Σ σ(1 − σ) over the window; T·(z − b_k) (or its exp(−·)) for the window's k; first
                acc = T.alloc_buffer((4, LANES), F32, scope="local")
                with T.serial(0, ROWS) as j:
                    position = (v.splat(beta) * x[b, j, v.ramp] - v.splat(b0)) / v.splat(gap)  # b_i sits at i
                    first = tirx.floor(position - v.splat(reach)) + v.const(1.0)
                    T.buffer_store(acc, tirx.min(tirx.max(first, v.const(0.0)), v.splat(last_first)), [3, v.ramp])
                    scaled = (position - acc[3, v.ramp]) * v.splat(t_gap)
                    T.buffer_store(acc, v.exp(v.const(0.0) - scaled) if geometric else scaled, [2, v.ramp])
                    T.buffer_store(acc, v.const(0.0), [0, v.ramp])
                    T.buffer_store(acc, v.const(0.0), [1, v.ramp])
                    with T.serial(0, width):
                        if geometric:
                            e = tirx.min(tirx.max(acc[2, v.ramp], v.splat(exp_low)), v.splat(exp_high))
                            sig = v.const(1.0) / (v.const(1.0) + e)
                            following = acc[2, v.ramp] * v.splat(ratio)
                        else:
                            low, high = v.const(0.0) - v.splat(clamp), v.splat(clamp)
                            sig = v.sigmoid(tirx.min(tirx.max(acc[2, v.ramp], low), high))
                            following = acc[2, v.ramp] - v.splat(t_gap)
                        T.buffer_store(acc, acc[0, v.ramp] + sig, [0, v.ramp])
                        T.buffer_store(acc, acc[1, v.ramp] + sig * (v.const(1.0) - sig), [1, v.ramp])
                        # last: `sig` is an expression over row 2, evaluated where it is stored
                        T.buffer_store(acc, following, [2, v.ramp])  # the next threshold
                    passed = acc[3, v.ramp] * (v.const(2.0) * v.splat(top) - v.const(1.0))
                    rest = v.splat(last_first) * (v.const(1.0) - v.splat(top))
                    total = (acc[0, v.ramp] + passed + rest) * v.splat(height)
                    T.buffer_store(out, v.splat(alpha) * (total + v.splat(q0)), [b, j, v.ramp])
                    T.buffer_store(derivative, (acc[1, v.ramp] + v.splat(outside)) * v.splat(gain), [b, j, v.ramp])
    return ib.get()


for _geometric, _name in _FORWARD_NAMES.items():
    register_kernel(_name)(functools.partial(_build_forward, _geometric))


@register_kernel("qn_even_backward")
def _build_backward():
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    v = VectorOps()
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("qn_even_backward")
            blocks = tirx.Var("blocks", "int64")
            x, g, derivative, out, gx = block_args(T, blocks, ("x", "grad", "derivative", "out", "grad_x"))
            partial = T.arg("partial", T.buffer((blocks, QN_SUMS, LANES), F32))
            (alpha_beta,) = scalar_args(T, ("alpha_beta",))
            T.func_attr({"tirx.noalias": True})
            with T.parallel(0, blocks) as b:
                acc = T.alloc_buffer((QN_SUMS, LANES), F32, scope="local")
                for k in range(QN_SUMS):
                    T.buffer_store(acc, v.const(0.0), [k, v.ramp])
                with T.serial(0, ROWS) as j:
                    gd = g[b, j, v.ramp] * derivative[b, j, v.ramp]
                    T.buffer_store(gx, gd * v.splat(alpha_beta), [b, j, v.ramp])
                    T.buffer_store(acc, acc[0, v.ramp] + gd * x[b, j, v.ramp], [0, v.ramp])
                    T.buffer_store(acc, acc[1, v.ramp] + g[b, j, v.ramp] * out[b, j, v.ramp], [1, v.ramp])
                for k in range(QN_SUMS):
                    T.buffer_store(partial, acc[k, v.ramp], [b, k, v.ramp])
    return ib.get()
