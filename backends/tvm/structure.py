"""Converters of ops that move, reduce or pass data through: shapes, views, concatenation, pooling, identities.

Shapes are static, so ``x.size()`` and the arithmetic on it become Python values at translation time and
``view``/``reshape`` receive concrete sizes.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tvm import relax

from fxquant.backends.tvm.context import Converter, LoweringContext
from fxquant.backends.tvm.kernels.pool import PoolGeometry, max_pool2d
from fxquant.conv_geometry import pair
from fxquant.errors import BackendError

__all__ = ["MODULE_CONVERTERS", "FUNCTION_CONVERTERS", "METHOD_CONVERTERS", "NAMED_CONVERTERS"]


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Positional-or-keyword argument of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _axis(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# -- pass-through ------------------------------------------------------------------------------------------


def _identity(ctx: LoweringContext, node: fx.Node) -> Any:
    return ctx.value(node.args[0])


def _dropout_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    training = module.training if module is not None else _arg(node, 2, "training", True)
    return "dropout in training mode" if training else None


def _stochastic_depth_problem(node: fx.Node, _: nn.Module | None) -> str | None:
    p, training = _arg(node, 1, "p", 0.0), _arg(node, 3, "training", True)
    return f"stochastic_depth(p={p}) in training mode" if training and p > 0 else None


def _stochastic_depth_module_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    p = getattr(module, "p", 0.0)
    return f"StochasticDepth(p={p}) in training mode" if module is not None and module.training and p > 0 else None


# -- shapes -----------------------------------------------------------------------------------------------


def _size(ctx: LoweringContext, node: fx.Node) -> Any:
    shape = ctx.shape(ctx.value(node.args[0]))
    dim = _arg(node, 1, "dim", None)
    return shape if dim is None else shape[_axis(dim, len(shape))]


def _dim(ctx: LoweringContext, node: fx.Node) -> int:
    return len(ctx.shape(ctx.value(node.args[0])))


def _assert(ctx: LoweringContext, node: fx.Node) -> None:
    """``torch._assert`` on shapes (ViT checks its input size): decided now, nothing is emitted."""
    condition, message = ctx.value(node.args[0]), ctx.value(_arg(node, 1, "message", ""))
    if isinstance(condition, relax.Expr):
        raise NotImplementedError("torch._assert on a tensor value")
    if not condition:
        raise BackendError(f"{node.name}: torch._assert fails for these input shapes: {message}")


def _getattr(ctx: LoweringContext, node: fx.Node) -> Any:
    value, attr = ctx.value(node.args[0]), node.args[1]
    if isinstance(value, relax.Expr) and attr == "shape":
        return ctx.shape(value)
    if isinstance(value, relax.Expr):
        raise NotImplementedError(f"tensor attribute {attr!r}")
    return getattr(value, attr)


def _index_tensor(ctx: LoweringContext, x: relax.Expr, index: Any) -> relax.Expr:
    """``x[index]`` for ints, slices, ``None``, ``...`` and at most one index tensor (gathered with ``take``)."""
    items = list(index) if isinstance(index, tuple) else [index]
    shape = ctx.shape(x)
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
    if sum(1 for item in items if isinstance(item, relax.Expr)) > 1:
        raise NotImplementedError("indexing with more than one index tensor")
    if consumed > len(shape):
        raise NotImplementedError(f"{consumed} indices for a rank-{len(shape)} tensor")
    axes, begin, end, strides, out_shape, trailing, take = [], [], [], [], [], [], None
    axis = 0
    for item in items:
        if item is Ellipsis:
            for _ in range(len(shape) - consumed):
                out_shape.append(shape[axis])
                axis += 1
        elif item is None:
            out_shape.append(1)
        elif isinstance(item, int):
            i = item + shape[axis] if item < 0 else item
            axes.append(axis), begin.append(i), end.append(i + 1), strides.append(1)
            axis += 1
        elif isinstance(item, slice):
            start, stop, step = item.indices(shape[axis])
            if step <= 0:
                raise NotImplementedError("a slice with a non-positive step")
            axes.append(axis), begin.append(start), end.append(max(stop, start)), strides.append(step)
            out_shape.append(len(range(start, stop, step)))
            axis += 1
        elif isinstance(item, relax.Expr):
            take = (axis, item, len(out_shape))
            out_shape.append(None)
            axis += 1
        else:
            raise NotImplementedError(f"index of type {type(item).__name__}")
    trailing.extend(shape[axis:])
    if axes:
        x = ctx.bb.emit(relax.op.strided_slice(x, axes, begin, end, strides))
    if take is not None:
        at, indices, position = take
        x = ctx.bb.emit(relax.op.take(x, indices, axis=at))
        index_shape = ctx.shape(indices)
        out_shape[position : position + 1] = list(index_shape)
    return ctx.bb.emit(relax.op.reshape(x, [*out_shape, *trailing]))


def _getitem(ctx: LoweringContext, node: fx.Node) -> Any:
    value, index = ctx.value(node.args[0]), ctx.value(node.args[1])
    if isinstance(value, relax.Expr) and isinstance(value.ty, relax.TupleType):
        return ctx.bb.emit(relax.TupleGetItem(value, int(index)))
    if isinstance(value, relax.Expr):
        return _index_tensor(ctx, value, index)
    return value[index]


def _getitem_problem(node: fx.Node, _: nn.Module | None) -> str | None:
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, slice) and item.step is not None and not isinstance(item.step, fx.Node) and item.step <= 0:
            return f"slice with step {item.step}"
        if isinstance(item, list | torch.Tensor):
            return "indexing with a list or a boolean mask"
    return None


def _resolve_shape(total: int, shape: Sequence[int]) -> list[int]:
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = total // known
    return shape


def _reshape_to(ctx: LoweringContext, x: relax.Expr, shape: Sequence[int]) -> relax.Expr:
    total = 1
    for s in ctx.shape(x):
        total *= s
    return ctx.bb.emit(relax.op.reshape(x, _resolve_shape(total, shape)))


def _view(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    args = [ctx.value(a) for a in node.args[1:]] or [ctx.value(node.kwargs["shape"])]
    shape = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
    return _reshape_to(ctx, ctx.value(node.args[0]), shape)


def _flatten_between(ctx: LoweringContext, x: relax.Expr, start: int, end: int) -> relax.Expr:
    shape = ctx.shape(x)
    start, end = _axis(start, len(shape)), _axis(end, len(shape))
    middle = 1
    for s in shape[start : end + 1]:
        middle *= s
    return _reshape_to(ctx, x, [*shape[:start], middle, *shape[end + 1 :]])


def _flatten_function(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    return _flatten_between(ctx, ctx.value(node.args[0]), start, end)


def _flatten_module(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    module = ctx.module(node)
    return _flatten_between(ctx, ctx.value(node.args[0]), module.start_dim, module.end_dim)


def _swap(first: str, second: str) -> Converter:
    """Two axes exchanged: ``transpose``/``swapdims`` (keywords ``dim0``, ``dim1``) and ``swapaxes`` (``axis0``,
    ``axis1``: MaxViT's partitions), the two aliases TVM's importer has no entry for."""

    def emit(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
        x = ctx.value(node.args[0])
        rank = len(ctx.shape(x))
        a, b = _axis(_arg(node, 1, first, 0), rank), _axis(_arg(node, 2, second, 1), rank)
        axes = list(range(rank))
        axes[a], axes[b] = axes[b], axes[a]
        return ctx.bb.emit(relax.op.permute_dims(x, axes))

    return Converter(emit)


def _permute(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    dims = node.args[1:] if len(node.args) > 2 or not isinstance(_arg(node, 1, "dims", ()), tuple | list) else None
    dims = list(dims) if dims is not None else list(_arg(node, 1, "dims", ()))
    rank = len(ctx.shape(x))
    return ctx.bb.emit(relax.op.permute_dims(x, [_axis(int(d), rank) for d in dims]))


def _cat(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    tensors = ctx.value(node.args[0])
    dim = _arg(node, 1, "dim", 0)
    return ctx.bb.emit(relax.op.concat(list(tensors), axis=_axis(dim, len(ctx.shape(tensors[0])))))


def _split_at(ctx: LoweringContext, x: relax.Expr, sizes: Sequence[int], dim: int) -> relax.Expr:
    indices, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        indices.append(acc)
    return ctx.bb.emit(relax.op.split(x, indices, axis=dim))


def _chunk(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    shape = ctx.shape(x)
    chunks, dim = int(_arg(node, 1, "chunks", 1)), _axis(_arg(node, 2, "dim", 0), len(shape))
    step = -(-shape[dim] // chunks)
    sizes = [min(step, shape[dim] - i) for i in range(0, shape[dim], step)]
    return _split_at(ctx, x, sizes, dim)


def _split(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    shape = ctx.shape(x)
    size, dim = ctx.value(_arg(node, 1, "split_size_or_sections", 1)), _axis(_arg(node, 2, "dim", 0), len(shape))
    if isinstance(size, int):
        sizes = [min(size, shape[dim] - i) for i in range(0, shape[dim], size)]
    else:
        sizes = [int(s) for s in size]
    return _split_at(ctx, x, sizes, dim)


# -- reductions and pooling -------------------------------------------------------------------------------


def _mean(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    rank = len(ctx.shape(x))
    dim = _arg(node, 1, "dim", None)
    axes = list(range(rank)) if dim is None else [_axis(int(d), rank) for d in ([dim] if isinstance(dim, int) else dim)]
    return ctx.bb.emit(relax.op.mean(x, axes, keepdims=bool(_arg(node, 2, "keepdim", False))))


def _mean_problem(node: fx.Node, _: nn.Module | None) -> str | None:
    return "mean(dtype=...)" if node.kwargs.get("dtype") is not None else None


def _pool_args(node: fx.Node, module: nn.Module | None) -> dict[str, Any]:
    """Pooling arguments of a module or of an F.*_pool2d call, by torch's names."""
    if module is not None:
        return {k: getattr(module, k) for k in vars(module) if not k.startswith("_")}
    names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    out = {name: _arg(node, i, name, None) for i, name in enumerate(names)}
    out.update(node.kwargs)
    return out


def _max_pool(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    module = ctx.modules.get(str(node.target)) if node.op == "call_module" else None
    args = _pool_args(node, module)
    kernel = pair(args["kernel_size"])
    stride = pair(args.get("stride") or kernel)
    x = ctx.value(node.args[0])
    shape, dtype = ctx.shape(x), x.ty.dtype
    padding, dilation = pair(args.get("padding") or 0), pair(args.get("dilation") or 1)
    ceil_mode = bool(args.get("ceil_mode") or False)
    if len(shape) == 4:  # NCHW: the separable kernel (rows, then columns in vector lanes)
        geom = PoolGeometry(tuple(shape), kernel, stride, padding, dilation, ceil_mode)
        gv = ctx.add_kernel(max_pool2d(geom, dtype), "max_pool2d", key=("max_pool2d", geom, dtype))
        return ctx.bb.emit(relax.call_tir(gv, [x], relax.TensorType(geom.output_shape, dtype)))
    return ctx.bb.emit(relax.op.nn.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode))


def _max_pool_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    return "return_indices=True" if _pool_args(node, module).get("return_indices") else None


def _avg_pool(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    module = ctx.modules.get(str(node.target)) if node.op == "call_module" else None
    args = _pool_args(node, module)
    kernel = pair(args["kernel_size"])
    stride = pair(args.get("stride") or kernel)
    include_pad = args.get("count_include_pad")
    return ctx.bb.emit(
        relax.op.nn.avg_pool2d(
            ctx.value(node.args[0]),
            kernel,
            stride,
            pair(args.get("padding") or 0),
            ceil_mode=bool(args.get("ceil_mode") or False),
            count_include_pad=True if include_pad is None else bool(include_pad),
        )
    )


def _avg_pool_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    override = _pool_args(node, module).get("divisor_override")
    return f"divisor_override={override}" if override is not None else None


def _adaptive_avg_pool(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    size = ctx.module(node).output_size if node.op == "call_module" else _arg(node, 1, "output_size", 1)
    shape = ctx.shape(x)
    out = pair(size) if not isinstance(size, tuple | list) or None not in size else tuple(
        shape[-2 + i] if s is None else int(s) for i, s in enumerate(size)
    )
    return ctx.bb.emit(relax.op.nn.adaptive_avg_pool2d(x, out))


_IDENTITY = Converter(_identity)
_FLATTEN = Converter(_flatten_function)
_TRANSPOSE = _swap("dim0", "dim1")
_SWAPAXES = _swap("axis0", "axis1")
_PERMUTE = Converter(_permute)
_VIEW = Converter(_view)
_CHUNK = Converter(_chunk)
_SPLIT = Converter(_split)
_MEAN = Converter(_mean, _mean_problem)
_MAX_POOL = Converter(_max_pool, _max_pool_problem)
_AVG_POOL = Converter(_avg_pool, _avg_pool_problem)
_ADAPTIVE = Converter(_adaptive_avg_pool)


MODULE_CONVERTERS: dict[type, Converter] = {
    nn.Identity: _IDENTITY,
    nn.Dropout: Converter(_identity, _dropout_problem),
    nn.Dropout2d: Converter(_identity, _dropout_problem),
    nn.Flatten: Converter(_flatten_module),
    nn.MaxPool2d: _MAX_POOL,
    nn.AvgPool2d: _AVG_POOL,
    nn.AdaptiveAvgPool2d: _ADAPTIVE,
}

FUNCTION_CONVERTERS: dict[Callable[..., Any], Converter] = {
    torch.flatten: _FLATTEN,
    torch.reshape: _VIEW,
    torch.transpose: _TRANSPOSE,
    torch.swapdims: _TRANSPOSE,
    torch.swapaxes: _SWAPAXES,
    torch.permute: _PERMUTE,
    torch.cat: Converter(_cat),
    torch.concat: Converter(_cat),
    torch.chunk: _CHUNK,
    torch.split: _SPLIT,
    torch.mean: _MEAN,
    operator.getitem: Converter(_getitem, _getitem_problem),
    builtins.getattr: Converter(_getattr),
    torch._assert: Converter(_assert),
    F.dropout: Converter(_identity, _dropout_problem),
    F.max_pool2d: _MAX_POOL,
    F.avg_pool2d: _AVG_POOL,
    F.adaptive_avg_pool2d: _ADAPTIVE,
}

METHOD_CONVERTERS: dict[str, Converter] = {
    "size": Converter(_size),
    "dim": Converter(_dim),
    "view": _VIEW,
    "reshape": _VIEW,
    "flatten": Converter(lambda ctx, node: _flatten_between(
        ctx, ctx.value(node.args[0]), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    )),
    "contiguous": _IDENTITY,
    "transpose": _TRANSPOSE,
    "swapdims": _TRANSPOSE,
    "swapaxes": _SWAPAXES,
    "permute": _PERMUTE,
    "chunk": _CHUNK,
    "split": _SPLIT,
    "mean": _MEAN,
}

#: third-party targets by qualified name, so that matching them never imports their (slow) package
NAMED_CONVERTERS: dict[str, Converter] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": Converter(_identity, _stochastic_depth_module_problem),
    "torchvision.ops.stochastic_depth.stochastic_depth": Converter(_identity, _stochastic_depth_problem),
}
