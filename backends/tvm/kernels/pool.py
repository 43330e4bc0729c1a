"""Max pooling over NCHW planes as two separable passes: a row pass, then a column pass in vector lanes.

``max`` over a ``kh x kw`` window is the max over ``kh`` rows of the max over ``kw`` columns:

    rows[n, c, y, xo]  = max_kx x[n, c, y, xo*sw + kx*dw - left]            (real rows only)
    out[n, c, yo, xo]  = max_ky rows[n, c, yo*sh + ky*dh - top, xo]         (rows outside the input skipped)

The column pass reads contiguous outputs of the row pass, so it runs in vector lanes; the row pass reads
strided columns and stays scalar, but it does ``kw`` loads per (row, output column) where the one-pass
form does ``kh * kw`` per output, each behind a bounds check. The result is exactly the maximum (order
does not change a max); windows never lie wholly in padding (PyTorch's output-size rule guarantees it).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, te, tirx

__all__ = ["PoolGeometry", "max_pool2d"]


@dataclass(frozen=True)
class PoolGeometry:
    """An NCHW max pool as PyTorch defines it (symmetric padding; ``ceil_mode`` output sizes)."""

    shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool = False

    def _out(self, size: int, axis: int) -> int:
        k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
        span = size + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if self.ceil_mode else span // s) + 1
        if self.ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input
            out -= 1
        return out

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.shape
        return (n, c, self._out(h, 0), self._out(w, 1))


def _max_of(values: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """An unrolled max: spatial blocks (no reduction axis) vectorize freely."""
    out = values[0]
    for value in values[1:]:
        out = tirx.max(out, value)
    return out


def _compute(geom: PoolGeometry, dtype: str) -> list[te.Tensor]:
    n_, c_, h_, w_ = geom.shape
    _, _, oh, ow = geom.output_shape
    (kh, kw), (sh, sw), (top, left), (dh, dw) = geom.kernel, geom.stride, geom.padding, geom.dilation
    lowest = tirx.min_value(dtype)
    x = te.placeholder(geom.shape, dtype, name="x")

    def tap(position: tirx.PrimExpr, size: int, load) -> tirx.PrimExpr:
        """``load(position)`` inside ``[0, size)``, else the dtype's lowest value (padding never wins a max)."""
        clamped = tirx.max(tirx.min(position, size - 1), 0)
        return tirx.if_then_else(tirx.all(position >= 0, position < size), load(clamped), lowest)

    def row_max(n, c, y, xo):
        return _max_of([tap(xo * sw + kx * dw - left, w_, lambda col: x[n, c, y, col]) for kx in range(kw)])

    rows = te.compute((n_, c_, h_, ow), row_max, name="pool_rows")

    def column_max(n, c, yo, xo):
        return _max_of([tap(yo * sh + ky * dh - top, h_, lambda row: rows[n, c, row, xo]) for ky in range(kh)])

    out = te.compute((n_, c_, oh, ow), column_max, name="pool_max")
    return [x, out]


def max_pool2d(geom: PoolGeometry, dtype: str = "float32") -> tirx.PrimFunc:
    """A scheduled PrimFunc ``(x, out)``: planes in parallel, the row pass per plane, the column pass
    vectorized along the output row."""
    sch = s_tir.Schedule(te.create_prim_func(_compute(geom, dtype)))
    out_b, rows_b = sch.get_sblock("pool_max"), sch.get_sblock("pool_rows")
    n, c, yo, xo = sch.get_loops(out_b)
    plane = sch.fuse(n, c)
    sch.parallel(plane)
    sch.compute_at(rows_b, plane)
    out_w = geom.output_shape[3]
    if out_w % 8 == 0 and out_w > 8:
        _, inner = sch.split(xo, [None, 8])
        sch.vectorize(inner)
    elif out_w <= 64:
        sch.vectorize(xo)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
