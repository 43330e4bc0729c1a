"""Freeze: hard-quantize a prepared graph into the integer graph every backend consumes.

Each ``input_quant -> QuantLayer`` pair is described as one :class:`~fxquant.integer.FrozenLayer` (integer
weights, the input grid, the folded bias, scales and geometry: the data every backend reads) and replaced by
the :class:`~fxquant.integer.IntegerLayer` module built from it, so the graph stays runnable; batch norms
still fused with unquantized layers are folded exactly; the result is in eval mode. Backends get a layer's
description back as ``module.frozen`` (:func:`frozen_layers` lists them all).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.integer import FrozenLayer, IntegerLayer, integer_module
from fxquant.layers import FusedBn, QuantLayer
from fxquant.passes.analysis.layer_nodes import quant_layer_nodes
from fxquant.passes.rewrite import replace_submodule

__all__ = ["freeze", "freeze_layer", "integer_layers", "frozen_layers"]


def freeze_layer(qlayer: QuantLayer, name: str = "") -> IntegerLayer:
    """The integer module of one prepared layer (running BN statistics folded in), built from its description."""
    return integer_module(qlayer.freeze(name))


def integer_layers(gm: fx.GraphModule) -> dict[str, IntegerLayer]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, IntegerLayer)}


def frozen_layers(gm: fx.GraphModule) -> dict[str, FrozenLayer]:
    """The description of every integer layer of a frozen graph, by module name."""
    return {n: m.frozen for n, m in integer_layers(gm).items()}


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
