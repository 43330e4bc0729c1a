"""Converters of attention: ``nn.MultiheadAttention``, products of two activations, and Swin's window attention.

No integer kernel multiplies two activations, and the projections inside ``nn.MultiheadAttention`` and
Swin's ``shifted_window_attention`` are weights handed to a function, not ``nn.Linear`` calls that
``prepare`` could quantize. All of these stay float32, and each is reported in the manifest as a
``"float"`` layer with the reason. The ``nn.Linear`` layers around them (MLP blocks, patch merging, heads)
are quantized and lower to the integer dense kernels like any other linear layer.

Swin's helpers are wrapped with ``torch.fx.wrap`` (their code reads shapes), so they reach the lowering as
single calls; with static shapes they are written out here as Relax ops, the shift mask computed once by
PyTorch itself.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from torch import fx, nn
from tvm import relax

from fxquant.backends.tvm import relax_frontend
from fxquant.backends.tvm.context import Converter, LayerRecord, LoweringContext

__all__ = ["MODULE_CONVERTERS", "FUNCTION_CONVERTERS", "METHOD_CONVERTERS", "NAMED_CONVERTERS", "roll"]

_PRODUCT_REASON = "activation x activation product: no integer kernel (kept float32)"


def _record(ctx: LoweringContext, node: fx.Node, kind: str, reason: str, **facts: Any) -> None:
    ctx.layers.append(LayerRecord(node.name, kind, "float", reason, {"name": node.name, "kind": kind, **facts}))


def _bound(node: fx.Node, fn: Callable[..., Any], ctx: LoweringContext) -> dict[str, Any]:
    """The call's arguments by parameter name (defaults filled in), fx nodes replaced by their values."""
    bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return {name: ctx.value(value) for name, value in bound.arguments.items()}


def _const_array(value: Any) -> np.ndarray:
    if isinstance(value, tvm.ir.expr.Constant):
        return value.value.numpy()
    raise NotImplementedError(f"expected a constant tensor, got {type(value).__name__}")


# -- Relax building blocks ----------------------------------------------------------------------------------


def _emit(ctx: LoweringContext, expr: relax.Expr) -> relax.Expr:
    return ctx.bb.emit(expr)


def _linear(ctx: LoweringContext, x: relax.Expr, weight: Any, bias: Any) -> relax.Expr:
    w = weight if isinstance(weight, relax.Expr) else relax.const(np.asarray(weight, np.float32))
    b = None if bias is None else bias if isinstance(bias, relax.Expr) else relax.const(np.asarray(bias, np.float32))
    return _emit(ctx, relax.op.linear(x, w, b))


def _take_along(ctx: LoweringContext, x: relax.Expr, axis: int, index: int) -> relax.Expr:
    """``x.select(axis, index)``: one slice, the axis dropped."""
    shape = list(ctx.shape(x))
    part = _emit(ctx, relax.op.strided_slice(x, [axis], [index], [index + 1], [1]))
    return _emit(ctx, relax.op.reshape(part, shape[:axis] + shape[axis + 1 :]))


def roll(ctx: LoweringContext, x: relax.Expr, shifts: Sequence[int], dims: Sequence[int]) -> relax.Expr:
    """``torch.roll`` along each of ``dims``: two slices concatenated in swapped order."""
    for shift, dim in zip(shifts, dims, strict=True):
        size = ctx.shape(x)[dim]
        cut = (-int(shift)) % size
        if cut == 0:
            continue
        head = _emit(ctx, relax.op.strided_slice(x, [dim], [0], [cut], [1]))
        tail = _emit(ctx, relax.op.strided_slice(x, [dim], [cut], [size], [1]))
        x = _emit(ctx, relax.op.concat([tail, head], axis=dim))
    return x


def _attend(ctx: LoweringContext, q: relax.Expr, k: relax.Expr, v: relax.Expr, bias: relax.Expr | None = None,
            scores: relax.Expr | None = None) -> tuple[relax.Expr, relax.Expr]:
    """``softmax(q @ k^T + bias) @ v`` over the last two axes (``q`` already scaled); also the probabilities."""
    rank = len(ctx.shape(k))
    if scores is None:
        k_t = _emit(ctx, relax.op.permute_dims(k, [*range(rank - 2), rank - 1, rank - 2]))
        scores = _emit(ctx, relax.op.matmul(q, k_t))
    if bias is not None:
        scores = _emit(ctx, relax.op.add(scores, bias))
    probs = _emit(ctx, relax.op.nn.softmax(scores, axis=-1))
    return _emit(ctx, relax.op.matmul(probs, v)), probs


# -- nn.MultiheadAttention ---------------------------------------------------------------------------------


def _mha_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    assert isinstance(module, nn.MultiheadAttention)
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    args = bound.arguments
    if module.training and module.dropout > 0:
        return "MultiheadAttention with dropout in training mode"
    if module.bias_k is not None or module.add_zero_attn:
        return "MultiheadAttention with add_bias_kv or add_zero_attn"
    for mask in ("key_padding_mask", "attn_mask"):
        if args.get(mask) is not None:
            return f"MultiheadAttention with {mask}"
    if args.get("is_causal"):
        return "MultiheadAttention with is_causal=True"
    return None


def _mha(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    """Self- or cross-attention with PyTorch's projections, heads and scaling; returns ``(out, weights)``."""
    m = ctx.module(node)
    assert isinstance(m, nn.MultiheadAttention)
    args = _bound(node, m.forward, ctx)
    inputs = [args["query"], args["key"], args["value"]]
    if not m.batch_first:  # (T, B, C) -> (B, T, C)
        inputs = [_emit(ctx, relax.op.permute_dims(t, [1, 0, 2])) for t in inputs]
    e, heads = m.embed_dim, m.num_heads
    with torch.no_grad():
        if m._qkv_same_embed_dim:
            weights = list(m.in_proj_weight.detach().float().chunk(3))
        else:
            weights = [m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()]
        biases = list(m.in_proj_bias.detach().float().chunk(3)) if m.in_proj_bias is not None else [None] * 3
    projected = []
    for t, w, b in zip(inputs, weights, biases, strict=True):
        batch, tokens = ctx.shape(t)[:2]
        y = _linear(ctx, t, w.numpy(), None if b is None else b.numpy())
        y = _emit(ctx, relax.op.reshape(y, [batch, tokens, heads, e // heads]))
        projected.append(_emit(ctx, relax.op.permute_dims(y, [0, 2, 1, 3])))
    q, k, v = projected
    q = _emit(ctx, relax.op.multiply(q, relax.const(1.0 / math.sqrt(e // heads), "float32")))
    out, probs = _attend(ctx, q, k, v)
    batch, tokens = ctx.shape(inputs[0])[:2]
    out = _emit(ctx, relax.op.reshape(relax.op.permute_dims(out, [0, 2, 1, 3]), [batch, tokens, e]))
    out = _linear(ctx, out, m.out_proj.weight.detach().float().numpy(),
                  None if m.out_proj.bias is None else m.out_proj.bias.detach().float().numpy())
    if not m.batch_first:
        out = _emit(ctx, relax.op.permute_dims(out, [1, 0, 2]))
    _record(ctx, node, "MultiheadAttention", "projections inside nn.MultiheadAttention are not nn.Linear calls, "
            f"and {_PRODUCT_REASON}", heads=heads, embed_dim=e, tokens=tokens)
    if not args["need_weights"]:
        return _emit(ctx, relax.Tuple([out, relax.const(np.zeros((), np.float32))]))
    weights_out = probs if not args["average_attn_weights"] else _emit(ctx, relax.op.mean(probs, axis=[1]))
    return _emit(ctx, relax.Tuple([out, weights_out]))


# -- products of two activations --------------------------------------------------------------------------


def _product(kind: str) -> Converter:
    """TVM's converter for the op, plus a float record in the manifest."""

    def emit(ctx: LoweringContext, node: fx.Node) -> Any:
        module = ctx.modules.get(str(node.target)) if node.op == "call_module" else None
        converter = relax_frontend.tvm_converter(node, module)
        assert converter is not None
        out = converter.emit(ctx, node)
        if isinstance(out, relax.Expr):
            _record(ctx, node, kind, _PRODUCT_REASON, output_shape=list(ctx.shape(out)))
        return out

    return Converter(emit)


# -- Swin (torchvision.models.swin_transformer) ------------------------------------------------------------


def _swin_function(name: str) -> Callable[..., Any]:
    from torchvision.models import swin_transformer

    return getattr(swin_transformer, name)


def _patch_merging_pad(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    shape = ctx.shape(x)
    h, w = shape[-3], shape[-2]
    if h % 2 or w % 2:
        pad = [0, 0] * (len(shape) - 3) + [0, h % 2, 0, w % 2, 0, 0]
        x = _emit(ctx, relax.op.nn.pad(x, pad))
    shape = ctx.shape(x)
    axes = [len(shape) - 3, len(shape) - 2]
    parts = [
        _emit(ctx, relax.op.strided_slice(x, axes, [i, j], [shape[-3], shape[-2]], [2, 2]))
        for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))
    ]
    return _emit(ctx, relax.op.concat(parts, axis=-1))


def _relative_position_bias(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    args = _bound(node, _swin_function("_get_relative_position_bias"), ctx)
    table, index, window = args["relative_position_bias_table"], args["relative_position_index"], args["window_size"]
    tokens = int(window[0]) * int(window[1])
    flat = relax.const(_const_array(index).reshape(-1).astype(np.int64))
    bias = _emit(ctx, relax.op.take(table, flat, axis=0))
    bias = _emit(ctx, relax.op.reshape(bias, [tokens, tokens, -1]))
    return _emit(ctx, relax.op.expand_dims(relax.op.permute_dims(bias, [2, 0, 1]), 0))


def _shift_mask(pad_h: int, pad_w: int, window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """The additive mask of shifted windows, ``(windows, tokens, tokens)``, by torchvision's own code."""
    mask = torch.zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0).numpy().astype(np.float32)


def _normalize(ctx: LoweringContext, x: relax.Expr) -> relax.Expr:
    """``F.normalize(x, dim=-1)``: ``x / max(||x||, 1e-12)``."""
    norm = _emit(ctx, relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis=[-1], keepdims=True)))
    return _emit(ctx, relax.op.divide(x, relax.op.maximum(norm, relax.const(1e-12, "float32"))))


def _window_problem(node: fx.Node, _: nn.Module | None) -> str | None:
    bound = inspect.signature(_swin_function("shifted_window_attention")).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    args = bound.arguments
    if args["training"] and (args["attention_dropout"] > 0 or args["dropout"] > 0):
        return "shifted_window_attention with dropout in training mode"
    return None


def _shifted_window_attention(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    """torchvision's W-MSA/SW-MSA (v1 scaled dot product, v2 cosine attention) with static shapes."""
    args = _bound(node, _swin_function("shifted_window_attention"), ctx)
    x, window, heads = args["input"], [int(w) for w in args["window_size"]], int(args["num_heads"])
    b, h, w, c = ctx.shape(x)
    pad_r, pad_b = (window[1] - w % window[1]) % window[1], (window[0] - h % window[0]) % window[0]
    if pad_r or pad_b:
        x = _emit(ctx, relax.op.nn.pad(x, [0, 0, 0, pad_b, 0, pad_r, 0, 0]))
    pad_h, pad_w = h + pad_b, w + pad_r
    shift = [0 if window[0] >= pad_h else int(args["shift_size"][0]), 0 if window[1] >= pad_w else
             int(args["shift_size"][1])]
    if sum(shift) > 0:
        x = roll(ctx, x, (-shift[0], -shift[1]), (1, 2))
    windows, tokens = (pad_h // window[0]) * (pad_w // window[1]), window[0] * window[1]
    x = _emit(ctx, relax.op.reshape(x, [b, pad_h // window[0], window[0], pad_w // window[1], window[1], c]))
    x = _emit(ctx, relax.op.reshape(relax.op.permute_dims(x, [0, 1, 3, 2, 4, 5]), [b * windows, tokens, c]))
    qkv_bias, logit_scale = args["qkv_bias"], args["logit_scale"]
    if logit_scale is not None and qkv_bias is not None:  # v2: no key bias
        bias = _const_array(qkv_bias).copy()
        bias[c : 2 * c] = 0
        qkv_bias = bias
    qkv = _linear(ctx, x, args["qkv_weight"], qkv_bias)
    qkv = _emit(ctx, relax.op.reshape(qkv, [b * windows, tokens, 3, heads, c // heads]))
    qkv = _emit(ctx, relax.op.permute_dims(qkv, [2, 0, 3, 1, 4]))
    q, k, v = (_take_along(ctx, qkv, 0, i) for i in range(3))
    if logit_scale is not None:
        k_t = _emit(ctx, relax.op.permute_dims(_normalize(ctx, k), [0, 1, 3, 2]))
        scores = _emit(ctx, relax.op.matmul(_normalize(ctx, q), k_t))
        scale = np.exp(np.minimum(_const_array(logit_scale), math.log(100.0))).astype(np.float32)
        scores = _emit(ctx, relax.op.multiply(scores, relax.const(scale)))
    else:
        q = _emit(ctx, relax.op.multiply(q, relax.const((c // heads) ** -0.5, "float32")))
        scores = None
    bias = args["relative_position_bias"]
    if sum(shift) > 0:
        if scores is None:
            k_t = _emit(ctx, relax.op.permute_dims(k, [0, 1, 3, 2]))
            scores = _emit(ctx, relax.op.matmul(q, k_t))
        scores = _emit(ctx, relax.op.add(scores, bias))
        scores = _emit(ctx, relax.op.reshape(scores, [b, windows, heads, tokens, tokens]))
        mask = _shift_mask(pad_h, pad_w, window, shift)[None, :, None]
        scores = _emit(ctx, relax.op.add(scores, relax.const(mask)))
        scores = _emit(ctx, relax.op.reshape(scores, [b * windows, heads, tokens, tokens]))
        bias = None
    out, _ = _attend(ctx, q, k, v, bias, scores)
    out = _emit(ctx, relax.op.reshape(relax.op.permute_dims(out, [0, 2, 1, 3]), [b * windows, tokens, c]))
    out = _linear(ctx, out, args["proj_weight"], args["proj_bias"])
    out = _emit(ctx, relax.op.reshape(out, [b, pad_h // window[0], pad_w // window[1], window[0], window[1], c]))
    out = _emit(ctx, relax.op.reshape(relax.op.permute_dims(out, [0, 1, 3, 2, 4, 5]), [b, pad_h, pad_w, c]))
    if sum(shift) > 0:
        out = roll(ctx, out, shift, (1, 2))
    if pad_r or pad_b:
        out = _emit(ctx, relax.op.strided_slice(out, [1, 2], [0, 0], [h, w], [1, 1]))
    _record(ctx, node, "shifted_window_attention", "qkv/proj weights are arguments of torchvision's "
            f"shifted_window_attention, not nn.Linear calls, and {_PRODUCT_REASON}", heads=heads, window=window,
            shift=shift, windows=windows)
    return out


def _roll(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    x = ctx.value(node.args[0])
    shifts = node.args[1] if len(node.args) > 1 else node.kwargs["shifts"]
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if dims is None:
        raise NotImplementedError("torch.roll without dims (on the flattened tensor)")
    shifts, dims = ([shifts], [dims]) if isinstance(shifts, int) else (list(shifts), list(dims))
    rank = len(ctx.shape(x))
    return roll(ctx, x, shifts, [d + rank if d < 0 else d for d in dims])


_MATMUL = _product("matmul")

MODULE_CONVERTERS: dict[type, Converter] = {nn.MultiheadAttention: Converter(_mha, _mha_problem)}

FUNCTION_CONVERTERS: dict[Callable[..., Any], Converter] = {
    torch.matmul: _MATMUL,
    operator.matmul: _MATMUL,
    torch.bmm: _product("bmm"),
    torch.baddbmm: _product("baddbmm"),
    torch.einsum: _product("einsum"),
    F.scaled_dot_product_attention: _product("scaled_dot_product_attention"),
    torch.roll: Converter(_roll),
}

METHOD_CONVERTERS: dict[str, Converter] = {"matmul": _MATMUL, "bmm": _product("bmm"), "roll": Converter(_roll)}

#: torchvision's fx-wrapped helpers, by qualified name (matching them never imports torchvision)
NAMED_CONVERTERS: dict[str, Converter] = {
    "torchvision.models.swin_transformer.shifted_window_attention": Converter(
        _shifted_window_attention, _window_problem
    ),
    "torchvision.models.swin_transformer._get_relative_position_bias": Converter(_relative_position_bias),
    "torchvision.models.swin_transformer._patch_merging_pad": Converter(_patch_merging_pad),
}
