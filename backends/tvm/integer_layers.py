"""Converters of the frozen integer layers: quantize to codes, accumulate in int32, rescale in float32.

Everything here reads the layer's :class:`~fxquant.integer.FrozenLayer` description (``module.frozen``), never
the torch module. Per layer: ``codes = quantize(x)`` (uniform rounding, thresholds, and a lookup for codebook
inputs), ``acc = kernel(codes, packed_weight)`` through ``call_tir`` (the bit-serial kernel or the direct
integer kernel, see :mod:`fxquant.backends.tvm.selection`), then ``acc * out_scale + const`` where ``const``
(bias plus the input-offset term) is computed once here with the reference's own float32 code
(:func:`fxquant.integer.rescale`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from tvm import relax

from fxquant.backends.tvm import integer_ops
from fxquant.backends.tvm.context import Converter, LayerRecord, LoweringContext
from fxquant.backends.tvm.cost import KernelMismatch, KernelPlan
from fxquant.backends.tvm.direct import DIRECT_VERSION, direct_conv2d, direct_dense, direct_tiling
from fxquant.backends.tvm.float_layers import rows_of, unrows
from fxquant.backends.tvm.kernels.dot import KERNEL_VERSION as DOT_VERSION
from fxquant.backends.tvm.kernels.dot import DotIsa, dot_conv2d, dot_dense, dot_isa_choices, dot_tiling
from fxquant.backends.tvm.selection import (
    KernelChoice,
    bitserial_problem,
    choose_kernel,
    dot_problem,
    forced_kernel,
    value_ranges,
    weight_storage_dtype,
)
from fxquant.conv_geometry import PADDING_MODES, ConvGeometry, DenseGeometry, conv_geometry
from fxquant.errors import BackendError
from fxquant.integer import (
    FrozenConv2d,
    FrozenLayer,
    FrozenLinear,
    IntegerConv2d,
    IntegerLayer,
    IntegerLinear,
    accumulator_bound,
    describe,
    input_channels,
    offset_accumulator,
    rescale,
)

__all__ = [
    "MODULE_CONVERTERS", "LAYER_KINDS", "integer_layer_problem", "padded_thresholds", "layer_geometry",
    "choose_layer_kernel", "CONSTANT_INPUT",
]

INT32_MAX = 2**31 - 1


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name) or "layer"


def integer_layer_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    """Why an integer layer cannot be lowered (static facts of its description only), or None."""
    assert isinstance(module, IntegerLayer)
    layer = module.frozen
    thresholds = layer.input_thresholds
    if thresholds is not None and thresholds.dim() > 1:
        return "per-channel activation thresholds are not supported"
    if accumulator_bound(layer) > INT32_MAX:
        return f"accumulator bound {accumulator_bound(layer)} overflows int32"
    if isinstance(layer, FrozenConv2d) and isinstance(layer.padding, str) and layer.padding not in PADDING_MODES:
        return f"padding={layer.padding!r}"
    return None


def padded_thresholds(layer: FrozenLayer) -> np.ndarray:
    """The thresholds as a sorted float32 vector (sorted is what ``bucketize`` assumes too)."""
    return np.sort(layer.input_thresholds.detach().cpu().numpy().astype(np.float32).reshape(-1))


def _quantize(ctx: LoweringContext, layer: FrozenLayer, x: relax.Expr) -> relax.Expr:
    """Float input -> the integers the kernel multiplies (codes, or codebook values)."""
    hint = f"quantize_{_safe(layer.name)}"
    if layer.input_thresholds is not None:
        codes = ctx.bb.emit_te(integer_ops.threshold_codes, x, relax.const(padded_thresholds(layer)),
                               primfunc_name_hint=hint)
    else:
        low, step = float(layer.input_low), float(layer.input_step)
        codes = ctx.bb.emit_te(integer_ops.uniform_codes, x, low, step, layer.act_bits, primfunc_name_hint=hint)
    table = layer.input_levels_int
    if table is not None:
        values = relax.const(table.detach().cpu().numpy().astype(np.int32).reshape(-1))
        hint = f"levels_{_safe(layer.name)}"
        codes = ctx.bb.emit_te(integer_ops.lookup_values, codes, values, primfunc_name_hint=hint)
    return codes


def _rescale_constants(layer: FrozenLayer, input_shape: tuple[int, ...], acc_rank: int) -> tuple[np.ndarray, ...]:
    """``out_scale`` and ``const`` shaped to broadcast against the accumulator, from the reference's code."""
    out_ch = layer.weight_int.shape[0]
    shape = (1, out_ch) + (1,) * (acc_rank - 2)
    with torch.no_grad():
        offset = offset_accumulator(layer, (1, *input_shape[1:]))
        zeros = torch.zeros(offset.shape if offset is not None else shape, dtype=torch.int64)
        const = rescale(layer, zeros, offset).reshape(offset.shape if offset is not None else shape)
    scale = layer.out_scale.detach().reshape(shape)
    return scale.numpy().astype(np.float32), const.numpy().astype(np.float32)


def _direct_plan(ctx: LoweringContext, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry) -> KernelPlan:
    weight_dtype = weight_storage_dtype(layer)
    tiling = direct_tiling(geom)
    key = ("direct", geom, weight_dtype, tiling)
    build = direct_conv2d if isinstance(geom, ConvGeometry) else direct_dense

    def plan() -> tuple[Any, np.ndarray]:
        kernel = ctx.cached(key, lambda: build(geom, "int32", weight_dtype, "int32", tiling))
        return kernel.func, kernel.pack(layer.weight_int.detach().cpu().numpy())

    once = ctx.once(("plan",) + key + (layer.name,), plan)
    return KernelPlan("direct", tiling.layout, DIRECT_VERSION, once, tiling.as_dict())


def _dot_isas(ctx: LoweringContext, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry,
              ranges: tuple[tuple[int, int], tuple[int, int]]) -> list[DotIsa]:
    """The dot instruction choices worth costing: the fastest that holds the layer's values and, where that
    is the halved VNNI kernel (whose extra passes can outweigh its gain on small layers), the next one."""
    kernel_w = geom.kernel[1] if isinstance(geom, ConvGeometry) else 1
    channels = geom.in_channels if isinstance(geom, ConvGeometry) else geom.in_features
    odd = bool(torch.all(layer.weight_int.remainder(2) == 1))  # bipolar codes: 8-bit weights go in halved
    choices = dot_isa_choices(ctx.target, *ranges, kernel_w, channels, odd_weights=odd)
    return choices[:2] if choices and choices[0].halved else choices[:1]


def _dot_plan(ctx: LoweringContext, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry, isa: DotIsa,
              ranges: tuple[tuple[int, int], tuple[int, int]]) -> KernelPlan:
    tiling = dot_tiling(geom, isa, *ranges)
    key = ("dot", geom, isa.name, tiling)
    build = dot_conv2d if isinstance(geom, ConvGeometry) else dot_dense

    def plan() -> tuple[Any, np.ndarray]:
        kernel = ctx.cached(key, lambda: build(geom, isa, tiling))
        return kernel.func, kernel.pack(layer.weight_int.detach().cpu().numpy().astype(np.int64))

    once = ctx.once(("plan",) + key + (layer.name,), plan)
    return KernelPlan("dot", isa.name, DOT_VERSION, once, tiling.as_dict())


def _cheapest_dot_plan(ctx: LoweringContext, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry,
                       costed: bool) -> KernelPlan:
    """One dot plan per instruction choice worth costing (:func:`_dot_isas`); the cheapest by the cost model
    (the first without ``costed``: another family was forced, nothing is built or timed). A choice whose
    accumulator differs from the reference is left out here; if every one does, the first goes on to
    :func:`choose_kernel`, which drops the family with its warning."""
    ranges = value_ranges(layer)  # a pass over the weights: once per layer
    options = [_dot_plan(ctx, layer, geom, isa, ranges) for isa in _dot_isas(ctx, layer, geom, ranges)]
    if len(options) == 1 or not costed:
        return options[0]
    costs = {}
    for plan in options:
        try:
            costs[plan.detail] = ctx.cost.cost_us(plan, layer, geom)
        except KernelMismatch:
            continue
    return min((p for p in options if p.detail in costs), key=lambda p: costs[p.detail], default=options[0])


def _signature(layer: FrozenLayer) -> tuple[Any, ...]:
    """What a kernel builder reads from a layer besides its weights: kind, weight shape, bits, encoding, geometry."""
    geometry = (layer.stride, layer.padding, layer.dilation, layer.groups) if isinstance(layer, FrozenConv2d) else ()
    return (type(layer).__name__, tuple(layer.weight_int.shape), layer.weight_bits, layer.act_bits,
            layer.weight_encoding, *geometry)


def _bitserial_plan(ctx: LoweringContext, layer: FrozenLayer, shape: tuple[int, ...]) -> KernelPlan:
    module = ctx.bitserial
    assert module is not None
    isa = module.select_isa(ctx.target).name if hasattr(module, "select_isa") else "bitserial"
    # the module's tiling rule, where it has one (an older kernel module chooses inside its builders)
    tiling = module.layer_tiling(layer, tuple(shape), ctx.target) if hasattr(module, "layer_tiling") else None
    extra = {} if tiling is None else {"tiling": tiling}

    def kernel() -> Any:
        build = module.conv2d_primfunc if isinstance(layer, FrozenConv2d) else module.dense_primfunc
        return build(layer, tuple(shape), ctx.target, **extra)

    def plan() -> tuple[Any, np.ndarray]:
        # the weights are an argument of the PrimFunc: layers of one signature share its (slow) build
        func = ctx.cached(("bitserial", _signature(layer), tuple(shape), tiling), kernel)
        return func, np.ascontiguousarray(module.pack_weights(layer))

    version = getattr(module, "KERNEL_VERSION", "bitserial")
    once = ctx.once(("plan", "bitserial", layer.name, shape), plan)
    return KernelPlan("bitserial", isa, version, once, None if tiling is None else tiling.as_dict())


#: why a layer whose input is a build-time constant (Swin v2's position-bias MLP) gets the portable kernel only:
#: TVM's FoldConstant runs it while building, compiled for a generic ``llvm`` CPU whatever the target, and LLVM
#: aborts the process on target instructions it cannot select there (vpdpbusd, vpmaddwd, vpshufb, sdot)
CONSTANT_INPUT = ("input is a build-time constant: TVM's FoldConstant computes the layer while building, for a "
                  "generic llvm CPU where target instructions abort LLVM (the portable direct kernel is folded)")


def _candidates(
    ctx: LoweringContext, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry, shape: tuple[int, ...], forced: str,
    constant_input: bool = False,
) -> tuple[dict[str, KernelPlan], dict[str, str]]:
    """Every exact kernel for this layer (cheapest-first order does not matter) and why the others are out;
    ``forced`` is the family the ``kernel=`` option asks for (``"auto"``: none); a ``constant_input`` layer
    takes the portable kernel only (:data:`CONSTANT_INPUT`)."""
    plans: dict[str, KernelPlan] = {}
    declined: dict[str, str] = {}
    why = CONSTANT_INPUT if constant_input else bitserial_problem(
        layer, enabled=ctx.options.bitserial, max_bits=ctx.options.bitserial_max_bits, module=ctx.bitserial)
    if why is None:
        plans["bitserial"] = _bitserial_plan(ctx, layer, shape)
    else:
        declined["bitserial"] = why
    why = CONSTANT_INPUT if constant_input else dot_problem(layer)
    if why is None:
        plans["dot"] = _cheapest_dot_plan(ctx, layer, geom, costed=forced in ("auto", "dot"))
    else:
        declined["dot"] = why
    plans["direct"] = _direct_plan(ctx, layer, geom)
    return plans, declined


def layer_geometry(layer: FrozenLayer, shape: tuple[int, ...]) -> ConvGeometry | DenseGeometry:
    """The kernel geometry of ``layer`` on an input of static ``shape``."""
    channels = input_channels(layer)
    if isinstance(layer, FrozenConv2d):
        if len(shape) < 2 or shape[1] != channels:
            raise BackendError(f"layer {layer.name}: expects {channels} input channels, got shape {shape}")
        return conv_geometry(
            shape, tuple(layer.weight_int.shape), layer.stride, layer.padding, layer.dilation, layer.groups, layer.name
        )
    if len(shape) != 2 or shape[1] != channels:
        raise BackendError(f"layer {layer.name}: expects a (N, {channels}) input, got shape {shape}")
    return DenseGeometry(shape[0], shape[1], int(layer.weight_int.shape[0]))


def choose_layer_kernel(
    ctx: LoweringContext, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry, shape: tuple[int, ...], name: str,
    constant_input: bool = False,
) -> KernelChoice:
    """The kernel ``convert`` gives this layer under ``ctx``'s options and cost model (also what the latency
    table of a bit-width search prices, so that both agree); ``constant_input``: see :data:`CONSTANT_INPUT`."""
    forced = forced_kernel(ctx.options.kernel, name)
    plans, declined = _candidates(ctx, layer, geom, shape, forced, constant_input)
    prior = ctx.prior.cost_us if ctx.prior is not None else None
    return choose_kernel(name, plans, declined, forced, lambda plan: ctx.cost.cost_us(plan, layer, geom),
                         ctx.cost.name, None if prior is None else lambda plan: prior(plan, layer, geom))


def _emit_integer_layer(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    module = ctx.module(node)
    assert isinstance(module, IntegerLayer)
    layer = module.frozen
    x, lead = ctx.value(node.args[0]), None
    if isinstance(layer, FrozenLinear):  # (..., C) tokens -> (rows, C): the dense kernels see a 2-D input
        x, lead = rows_of(ctx, x)
    shape = ctx.shape(x)
    geom = layer_geometry(layer, shape)
    values = _quantize(ctx, layer, x)
    name = layer.name or node.name
    constant = ctx.is_constant(x)
    choice = choose_layer_kernel(ctx, layer, geom, shape, name, constant)
    plan = choice.plan
    assert plan is not None
    func, packed = plan.build()
    gv = ctx.add_kernel(func, f"{plan.kind}_{_safe(name)}")
    out_info = relax.TensorType(geom.output_shape, "int32")
    acc = ctx.bb.emit(relax.call_tir(gv, [values, relax.const(packed)], out_info))
    if ctx.options.debug_accumulators:
        ctx.accumulators.append((name, unrows(ctx, acc, lead)))  # the reference's shape
    scale, const = _rescale_constants(layer, shape, len(geom.output_shape))
    hint = f"rescale_{_safe(layer.name)}"
    out = ctx.bb.emit_te(integer_ops.rescale, acc, relax.const(scale), relax.const(const), primfunc_name_hint=hint)
    facts = {
        **describe(layer),
        "layout": plan.detail,
        "tiling": dict(plan.tiling or {}),
        "macs": geom.macs,
        "input_shape": list(shape),
        "output_shape": list(geom.output_shape),
        "weight_scale": [float(v) for v in layer.weight_scale.tolist()],
        "kernel_costs_us": choice.costs_us,
        "cost_model": ctx.cost.name,
    }
    if choice.kind in choice.costs_us:
        facts["estimate_us"] = choice.costs_us[choice.kind]
    if lead is not None:
        facts["leading_shape"] = list(lead)
    if constant:
        facts["constant_input"] = True
    ctx.layers.append(LayerRecord(name, facts["kind"], choice.kind, choice.reason, facts))
    return unrows(ctx, out, lead)


_INTEGER = Converter(_emit_integer_layer, integer_layer_problem)

MODULE_CONVERTERS: dict[type, Converter] = {IntegerConv2d: _INTEGER, IntegerLinear: _INTEGER}
#: the frozen-layer kinds these converters lower (part of the TVM backends' declared capabilities)
LAYER_KINDS: tuple[type[FrozenLayer], ...] = tuple(module.KIND for module in MODULE_CONVERTERS)
