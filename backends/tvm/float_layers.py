"""Converters of layers left in float32 (excluded from quantization): conv2d, linear and eval batch norm.

Linear layers take ``(..., C)`` inputs (transformer tokens): the leading axes are folded into rows.

Conv and linear use the same direct kernels as the integer fallback, instantiated for float32, and are
reported as ``"float"`` in the manifest. Their sums run in another order than PyTorch's, so they agree
with the reference to float32 rounding rather than bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from tvm import relax

from fxquant.backends.tvm.context import Converter, LayerRecord, LoweringContext
from fxquant.backends.tvm.direct import DirectKernel, direct_conv2d, direct_dense
from fxquant.conv_geometry import DenseGeometry, conv_geometry

__all__ = ["MODULE_CONVERTERS", "rows_of", "unrows"]


def _record(ctx: LoweringContext, node: fx.Node, module: nn.Module, kernel: DirectKernel, macs: int) -> None:
    facts = {"name": str(node.target), "kind": type(module).__name__, "layout": kernel.layout, "macs": macs,
             "tiling": kernel.tiling.as_dict()}
    reason = "not quantized (kept float32)"
    ctx.layers.append(LayerRecord(str(node.target), type(module).__name__, "float", reason, facts))


def _with_bias(ctx: LoweringContext, out: relax.Expr, bias: torch.Tensor | None, rank: int) -> relax.Expr:
    if bias is None:
        return out
    shape = (1, -1) + (1,) * (rank - 2)
    return ctx.bb.emit(relax.op.add(out, relax.const(bias.detach().float().reshape(shape).numpy())))


def _direct_float(
    ctx: LoweringContext, node: fx.Node, module: nn.Module, x: relax.Expr, geom: Any,
    make: Callable[..., DirectKernel], name: str, rank: int,
) -> relax.Expr:
    """One float32 direct kernel per geometry (shared between layers), weights packed once, bias added after."""
    key = ("direct-float", geom)
    kernel: DirectKernel = ctx.cached(key, lambda: make(geom, "float32", "float32", "float32"))
    gv = ctx.add_kernel(kernel.func, name, key)
    weight = kernel.pack(module.weight.detach().float().numpy())
    out = ctx.bb.emit(relax.call_tir(gv, [x, relax.const(weight)], relax.TensorType(geom.output_shape, "float32")))
    _record(ctx, node, module, kernel, geom.macs)
    return _with_bias(ctx, out, module.bias, rank)


def _conv(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    module = ctx.module(node)
    assert isinstance(module, nn.Conv2d)
    x = ctx.value(node.args[0])
    geom = conv_geometry(
        ctx.shape(x), tuple(module.weight.shape), module.stride, module.padding, module.dilation, module.groups,
        str(node.target),
    )
    return _direct_float(ctx, node, module, x, geom, direct_conv2d, "direct_float_conv2d", rank=4)


def _linear(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    module = ctx.module(node)
    assert isinstance(module, nn.Linear)
    x, lead = rows_of(ctx, ctx.value(node.args[0]))
    shape = ctx.shape(x)
    geom = DenseGeometry(shape[0], shape[1], module.out_features)
    out = _direct_float(ctx, node, module, x, geom, direct_dense, "direct_float_dense", rank=2)
    return unrows(ctx, out, lead)


def rows_of(ctx: LoweringContext, x: relax.Expr) -> tuple[relax.Expr, tuple[int, ...] | None]:
    """A ``(..., C)`` input of a linear layer as ``(rows, C)`` (tokens of a transformer become rows), and the
    leading shape to restore, or None when the input is 2-D already."""
    shape = ctx.shape(x)
    if len(shape) == 2:
        return x, None
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return ctx.bb.emit(relax.op.reshape(x, [rows, shape[-1]])), tuple(shape[:-1])


def unrows(ctx: LoweringContext, out: relax.Expr, lead: tuple[int, ...] | None) -> relax.Expr:
    """The inverse of :func:`rows_of` on the layer's ``(rows, out_features)`` result."""
    if lead is None:
        return out
    return ctx.bb.emit(relax.op.reshape(out, [*lead, ctx.shape(out)[-1]]))


def _batch_norm(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    """Eval batch norm as ``x * a + b`` with PyTorch's folded ``a = w / sqrt(var + eps)``, ``b = bias - mean * a``."""
    module = ctx.module(node)
    assert isinstance(module, nn.BatchNorm2d) and module.running_var is not None and module.running_mean is not None
    with torch.no_grad():
        weight = module.weight if module.weight is not None else torch.ones_like(module.running_var)
        bias = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        alpha = weight / torch.sqrt(module.running_var + module.eps)
        beta = bias - module.running_mean * alpha
    x = ctx.value(node.args[0])
    scaled = ctx.bb.emit(relax.op.multiply(x, relax.const(alpha.float().reshape(1, -1, 1, 1).numpy())))
    return ctx.bb.emit(relax.op.add(scaled, relax.const(beta.float().reshape(1, -1, 1, 1).numpy().astype(np.float32))))


def _batch_norm_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    assert isinstance(module, nn.BatchNorm2d)
    if module.training:
        return "BatchNorm2d in training mode"
    if module.running_mean is None or module.running_var is None:
        return "BatchNorm2d without running statistics"
    return None


def _conv_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    assert isinstance(module, nn.Conv2d)
    return f"padding_mode={module.padding_mode!r}" if module.padding_mode != "zeros" else None


MODULE_CONVERTERS: dict[type, Converter] = {
    nn.Conv2d: Converter(_conv, _conv_problem),
    nn.Linear: Converter(_linear),
    nn.BatchNorm2d: Converter(_batch_norm, _batch_norm_problem),
}
