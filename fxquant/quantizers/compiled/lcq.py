"""LCQ's training passes as TVM kernels for per-tensor (activation) quantizers with a compander.

Forward: ``Q(x)`` with the arithmetic of ``fxquant.quantizers.lcq._lcq_levels``/``_lcq_value`` (products
fenced so that LLVM cannot contract them into a following add: the values are bit-identical), writing the
per-element code ``kx·(s + 1) + j`` that the backward reuses. Backward: ``grad_x``, the sums for ``α`` and
the per-code sums of ``w`` and ``w·(v − d_kx)`` for the compander (``_LCQFunction.backward``), the latter as
per-chunk histograms (a scatter-add cannot be vectorized; each parallel chunk owns its histogram).
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

__all__ = ["kernel_name", "lcq_forward", "lcq_backward", "code_dtype"]

_CODE_DTYPES = {torch.uint8: "uint8", torch.int32: "int32"}
CHUNKS_PER_THREAD = 4  # backward histograms: more chunks balance threads, fewer cost less to zero and sum


def code_dtype(combos: int) -> torch.dtype:
    """The kernels' per-element code type for ``combos = K·(s + 1)`` codes."""
    return torch.uint8 if combos <= 256 else torch.int32


def kernel_name(stage: str, symmetric: bool, code: torch.dtype) -> str | None:
    """The ``"forward"`` or ``"backward"`` kernel for this mode and code type; None for a type no kernel takes."""
    if code not in _CODE_DTYPES:
        return None
    return f"lcq_{stage}_{'symmetric' if symmetric else 'unsigned'}_{_CODE_DTYPES[code]}"


def lcq_forward(
    x: torch.Tensor, out: torch.Tensor, code: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
    u_table: torch.Tensor, alpha: float, s: int, symmetric: bool,
) -> int:
    """``out = Q(x)`` and ``code`` over the leading whole blocks of ``x``; returns the elements covered."""
    blocks = x.numel() // KERNEL_BLOCK
    tables = (tvm_tensor(t.detach().contiguous()) for t in (gamma, beta, u_table))
    blocked = (as_blocks(t, blocks) for t in (x, out, code))
    call_kernel(kernel_name("forward", symmetric, code.dtype), *blocked, *tables, alpha, float(gamma.numel()), float(s))
    return blocks * KERNEL_BLOCK


def lcq_backward(
    x: torch.Tensor, grad: torch.Tensor, code: torch.Tensor, grad_x: torch.Tensor, u_by_code: torch.Tensor,
    d_by_code: torch.Tensor, alpha: float, symmetric: bool,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The backward over the leading whole blocks: ``(elements covered, [Σ sgn·g·u, Σ grad_x·x], by_code)``.

    ``by_code`` is ``(2, codes)``: per code, Σ w and Σ w·(v − d_kx) with ``w = sgn(x)·g·α·1{inside}``.
    """
    blocks = x.numel() // KERNEL_BLOCK
    chunks = max(1, min(blocks, CHUNKS_PER_THREAD * torch.get_num_threads()))
    combos = u_by_code.numel()
    partial = torch.empty((blocks, 2, LANES), dtype=torch.float32)
    histograms = torch.empty((chunks, 2, combos), dtype=torch.float32)
    blocked = (as_blocks(t, blocks) for t in (x, grad, grad_x, code))
    call_kernel(kernel_name("backward", symmetric, code.dtype), *blocked, tvm_tensor(partial),
                tvm_tensor(histograms), tvm_tensor(u_by_code.contiguous()), tvm_tensor(d_by_code.contiguous()),
                alpha, chunks)
    return blocks * KERNEL_BLOCK, partial.sum((0, 2)), histograms.sum(0)


def _magnitude(v: VectorOps, x, symmetric: bool):
    from tvm import tirx

    return tirx.abs(x) if symmetric else tirx.max(x, v.const(0.0))


def _sign(v: VectorOps, x):
    """``torch.sign``: −1, 0 or 1."""
    from tvm import tirx

    return tirx.Select(x > v.const(0.0), v.const(1.0), tirx.Select(x < v.const(0.0), v.const(-1.0), v.const(0.0)))


def _build_forward(symmetric: bool, code: torch.dtype):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    v = VectorOps()
    i32 = f"int32x{LANES}"
    blocks, segments, levels = (tirx.Var(n, "int64") for n in ("blocks", "segments", "levels"))
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(kernel_name("forward", symmetric, code))
            code_type = _CODE_DTYPES[code]
            x, out = block_args(T, blocks, ("x", "out"))
            (code,) = block_args(T, blocks, ("code",), code_type)
            gamma = T.arg("gamma", T.buffer((segments,), F32))
            beta = T.arg("beta", T.buffer((segments,), F32))
            u_table = T.arg("u_table", T.buffer((levels,), F32))
            alpha, k_count, s = scalar_args(T, ("alpha", "k_count", "s"))
            T.func_attr({"tirx.noalias": True})
            with T.parallel(0, blocks) as b:
                # rows: v = min(|x|/α, 1), then v − d_kx; the segment kx; the rounded level j (floats)
                work = T.alloc_buffer((3, LANES), F32, scope="local")
                with T.serial(0, ROWS) as j:
                    xv = x[b, j, v.ramp]
                    T.buffer_store(work, tirx.min(_magnitude(v, xv, symmetric) / v.splat(alpha), v.const(1.0)),
                                   [0, v.ramp])
                    seg = tirx.min(tirx.max(tirx.floor(work[0, v.ramp] * v.splat(k_count)), v.const(0.0)),
                                   v.splat(k_count) - v.const(1.0))
                    T.buffer_store(work, seg, [1, v.ramp])
                    T.buffer_store(work, work[0, v.ramp] - work[1, v.ramp] / v.splat(k_count), [0, v.ramp])
                    index = tirx.Cast(i32, work[1, v.ramp])
                    companded = v.fence(work[0, v.ramp] * gamma[index]) + beta[index]  # g(v)
                    rounded = tirx.floor(v.fence(companded * v.splat(s)) + v.const(0.5))
                    T.buffer_store(work, tirx.min(tirx.max(rounded, v.const(0.0)), v.splat(s)), [2, v.ramp])
                    level = tirx.Cast(i32, work[2, v.ramp])
                    joint = tirx.Cast(i32, work[1, v.ramp] * (v.splat(s) + v.const(1.0)) + work[2, v.ramp])
                    T.buffer_store(code, tirx.Cast(f"{code_type}x{LANES}", joint), [b, j, v.ramp])
                    value = u_table[level] * v.splat(alpha)
                    T.buffer_store(out, value * _sign(v, xv) if symmetric else value, [b, j, v.ramp])
    return ib.get()


def _build_backward(symmetric: bool, code: torch.dtype):
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    v = VectorOps()
    i32 = f"int32x{LANES}"
    blocks, combos = tirx.Var("blocks", "int64"), tirx.Var("combos", "int64")
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(kernel_name("backward", symmetric, code))
            x, g, gx = block_args(T, blocks, ("x", "grad", "grad_x"))
            (code,) = block_args(T, blocks, ("code",), _CODE_DTYPES[code])
            partial = T.arg("partial", T.buffer((blocks, 2, LANES), F32))
            chunks = tirx.Var("chunks", "int64")
            hist = T.arg("histograms", T.buffer((chunks, 2, combos), F32))
            u_by_code = T.arg("u_by_code", T.buffer((combos,), F32))
            d_by_code = T.arg("d_by_code", T.buffer((combos,), F32))
            (alpha,) = scalar_args(T, ("alpha",))
            T.arg("chunks", chunks)
            T.func_attr({"tirx.noalias": True})
            per_chunk = (blocks + chunks - 1) // chunks
            with T.parallel(0, chunks) as c:
                with T.serial(0, combos) as k:
                    T.buffer_store(hist, tirx.const(0.0, F32), [c, 0, k])
                    T.buffer_store(hist, tirx.const(0.0, F32), [c, 1, k])
                # rows: Σ sgn·g·u, Σ grad_x·x; then w and w·(v − d_kx) of the current vector
                acc = T.alloc_buffer((4, LANES), F32, scope="local")
                with T.serial(c * per_chunk, tirx.min((c + 1) * per_chunk, blocks)) as b:
                    T.buffer_store(acc, v.const(0.0), [0, v.ramp])
                    T.buffer_store(acc, v.const(0.0), [1, v.ramp])
                    with T.serial(0, ROWS) as j:
                        xv, gv = x[b, j, v.ramp], g[b, j, v.ramp]
                        index = tirx.Cast(i32, code[b, j, v.ramp])
                        mag = _magnitude(v, xv, symmetric)
                        if symmetric:
                            inside = tirx.Select(mag < v.splat(alpha), v.const(1.0), v.const(0.0))
                        else:
                            inside = tirx.Select(tirx.all(xv >= v.const(0.0), xv < v.splat(alpha)), v.const(1.0),
                                                 v.const(0.0))
                        signed = gv * _sign(v, xv) if symmetric else gv
                        T.buffer_store(gx, gv * inside, [b, j, v.ramp])
                        T.buffer_store(acc, acc[0, v.ramp] + signed * u_by_code[index], [0, v.ramp])
                        T.buffer_store(acc, acc[1, v.ramp] + gx[b, j, v.ramp] * xv, [1, v.ramp])
                        w = signed * inside * v.splat(alpha)
                        vd = tirx.min(mag / v.splat(alpha), v.const(1.0)) - d_by_code[index]
                        T.buffer_store(acc, w, [2, v.ramp])
                        T.buffer_store(acc, w * vd, [3, v.ramp])
                        for lane in range(LANES):
                            k = tirx.Cast("int32", code[b, j, lane])
                            T.buffer_store(hist, hist[c, 0, k] + acc[2, lane], [c, 0, k])
                            T.buffer_store(hist, hist[c, 1, k] + acc[3, lane], [c, 1, k])
                    T.buffer_store(partial, acc[0, v.ramp], [b, 0, v.ramp])
                    T.buffer_store(partial, acc[1, v.ramp], [b, 1, v.ramp])
    return ib.get()


for _symmetric in (True, False):
    for _code in _CODE_DTYPES:
        register_kernel(kernel_name("forward", _symmetric, _code))(functools.partial(_build_forward, _symmetric, _code))
        register_kernel(kernel_name("backward", _symmetric, _code))(
            functools.partial(_build_backward, _symmetric, _code)
        )

