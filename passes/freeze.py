"""Freeze: hard-quantize a prepared graph into the integer graph every backend consumes.

Each ``input_quant -> QuantLayer`` pair becomes one :class:`~fxquant.integer.IntegerConv2d` or
:class:`~fxquant.integer.IntegerLinear` holding integer weights, the input grid and the folded bias;
batch norms still fused with unquantized layers are folded exactly; the result is in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.integer import IntegerConv2d, IntegerLayer, IntegerLinear
from fxquant.layers import FusedBn, QuantLayer
from fxquant.passes.insert_quant import quant_layer_nodes
from fxquant.passes.rewrite import replace_submodule

__all__ = ["freeze", "freeze_layer", "integer_layers"]


def freeze_layer(qlayer: QuantLayer, name: str = "") -> IntegerLayer:
    """The integer form of one prepared layer (running BN statistics folded in)."""
    with torch.no_grad():
        weight, bias = qlayer.folded_weight_bias()
        wq, aq = qlayer.weight_quant, qlayer.input_quant
        wq.track_weight(weight)
        w_grid, a_grid = wq.grid(), aq.grid()
        codes = wq.codes(weight)
        weight_int, weight_scale = wq.integer_weight(codes)
        common = dict(
            weight_int=weight_int,
            weight_codes=codes,
            weight_scale=weight_scale,
            bias=bias,
            weight_bits=wq.bits,
            weight_encoding=w_grid.encoding,
            act_bits=aq.bits,
            input_low=a_grid.low,
            input_step=a_grid.step,
            input_thresholds=a_grid.thresholds,
            name=name,
            input_levels=a_grid.levels if a_grid.encoding == "codebook" else None,
            input_levels_int=a_grid.levels_int if a_grid.encoding == "codebook" else None,
        )
        layer = qlayer.layer
        if isinstance(layer, nn.Conv2d):
            return IntegerConv2d(
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups, **common
            )
        return IntegerLinear(**common)


def integer_layers(gm: fx.GraphModule) -> dict[str, IntegerLayer]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, IntegerLayer)}


def freeze(prepared: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule in which every quantized layer computes with integers (``prepared`` is untouched).

    Example::

        frozen = freeze(qmodel)   # then frozen(x) is the integer-exact reference
    """
    gm = copy.deepcopy(prepared).eval()
    modules = dict(gm.named_modules())
    uninitialised = [
        n.target for n in quant_layer_nodes(gm)
        if not (bool(modules[n.target].weight_quant.initialized) and bool(modules[n.target].input_quant.initialized))
    ]
    if uninitialised:
        raise FxQuantError(
            "quantizers of these layers have not seen data yet; pass example_inputs to prepare() or run one "
            f"forward before converting: {', '.join(uninitialised)}"
        )
    for node in quant_layer_nodes(gm):
        qlayer = modules[node.target]
        quant_node = node.args[0]
        integer = freeze_layer(qlayer, node.target)
        replace_submodule(gm, node.target, integer)
        node.replace_input_with(quant_node, quant_node.args[0])
        gm.graph.erase_node(quant_node)
    for name, module in list(gm.named_modules()):
        if isinstance(module, FusedBn):
            with torch.no_grad():
                weight, bias = module.folded()
                layer = copy.deepcopy(module.layer)
                layer.weight = nn.Parameter(weight.clone())
                layer.bias = nn.Parameter(bias.clone())
            replace_submodule(gm, name, layer)
    gm.graph.lint()
    gm.recompile()
    gm.meta["fxquant.frozen"] = True
    return gm.eval()
