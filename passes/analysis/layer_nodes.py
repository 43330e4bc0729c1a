"""Which nodes of a graph are the layers quantization works on: an analysis every other pass reads."""

from __future__ import annotations

from torch import fx, nn

from fxquant.layers import QUANTIZABLE_TYPES, FusedBn, QuantLayer

__all__ = ["quantizable_layers", "quant_layer_nodes"]


def _inner(module: nn.Module) -> nn.Module:
    return module.layer if isinstance(module, FusedBn) else module


def quantizable_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Conv2d/linear call nodes (fused with a batch norm or not) in graph order."""
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(_inner(modules[node.target]), QUANTIZABLE_TYPES):
            layer = _inner(modules[node.target])
            if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
                continue
            out.append(node)
    return out


def quant_layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of a prepared graph that call a :class:`QuantLayer`, in graph order."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), QuantLayer)]
