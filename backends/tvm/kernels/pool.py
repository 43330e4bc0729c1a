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

from fxquant.conv_geometry import output_size

__all__ = ["PoolGeometry", "PoolTiling", "max_pool2d", "pool_tiling"]


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
        p = self.padding[axis]
        return output_size(size, self.kernel[axis], self.stride[axis], p, p, self.dilation[axis], self.ceil_mode)

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


@dataclass(frozen=True)
class PoolTiling:
    """Vector lanes of the column pass along the output row (0: scalar); chosen by :func:`pool_tiling`."""

    lanes: int


#: column-pass lanes of a long output row (one AVX2 register of float32), and the longest row vectorized whole
_LANES, _WHOLE_ROW = 8, 64


def pool_tiling(geom: PoolGeometry) -> PoolTiling:
    """Lanes of 8 where they divide a longer row, else the whole row up to 64 outputs, else scalar."""
    out_w = geom.output_shape[3]
    if out_w % _LANES == 0 and out_w > _LANES:
        return PoolTiling(_LANES)
    return PoolTiling(out_w if out_w <= _WHOLE_ROW else 0)


def max_pool2d(geom: PoolGeometry, dtype: str = "float32", tiling: PoolTiling | None = None) -> tirx.PrimFunc:
    """A scheduled PrimFunc ``(x, out)``: planes in parallel, the row pass per plane, the column pass
    vectorized along the output row."""
    tiling = tiling or pool_tiling(geom)
    sch = s_tir.Schedule(te.create_prim_func(_compute(geom, dtype)))
    out_b, rows_b = sch.get_sblock("pool_max"), sch.get_sblock("pool_rows")
    n, c, yo, xo = sch.get_loops(out_b)
    plane = sch.fuse(n, c)
    sch.parallel(plane)
    sch.compute_at(rows_b, plane)
    if tiling.lanes == geom.output_shape[3]:
        sch.vectorize(xo)
    elif tiling.lanes:
        _, inner = sch.split(xo, [None, tiling.lanes])
        sch.vectorize(inner)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
