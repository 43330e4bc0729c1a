"""Insert fake-quantization: each quantizable conv/linear becomes a :class:`QuantLayer` and gets an
input-quantizer node in front of it.

Annotation (which layers, which settings) is separate from insertion: :func:`quantizable_layers` and
``QuantConfig.resolve`` decide, this pass only rewrites. The resolved settings are recorded in
``node.meta["fxquant.spec"]``.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import fx, nn

from fxquant.config import LayerQuantSpec, QuantConfig
from fxquant.errors import ConfigError
from fxquant.layers import QUANTIZABLE_TYPES, FusedBn, QuantLayer, layer_type_name
from fxquant.quantizers.registry import get_quantizer

__all__ = ["insert_quantizers", "quantizable_layers", "quant_layer_nodes", "INPUT_QUANT"]

INPUT_QUANT = "input_quant"


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


def _first_last(layers: list[fx.Node]) -> set[str]:
    """The first layer (fed by a graph input) and the last one (feeding the graph output), by name."""
    if not layers:
        return set()
    return {layers[0].target, layers[-1].target}


def insert_quantizers(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Wrap quantizable layers of ``gm`` in :class:`QuantLayer` and insert their input quantizers.

    Example::

        gm = insert_quantizers(fuse_bn_for_qat(trace(model)), QuantConfig(weight_bits=2, act_bits=2))
    """
    modules = dict(gm.named_modules())
    layers = quantizable_layers(gm)
    types = {n.target: layer_type_name(modules[n.target]) for n in layers}
    config.check_keys_match(types)
    if config.plan is not None:
        config.plan.check_layers(list(types))
    edge = _first_last(layers)
    for node in layers:
        name = node.target
        if config.is_excluded(name, types[name]):
            continue
        spec: LayerQuantSpec = config.resolve(name, types[name], name in edge)
        module = modules[name]
        layer = _inner(module)
        bn = module.bn if isinstance(module, FusedBn) else None
        scheme = get_quantizer(spec.quantizer)
        channels = layer.weight.shape[0] if spec.per_channel else None
        options = config.quantizer_options if spec.quantizer == config.quantizer else None
        try:
            weight_quant = scheme(spec.weight_bits, "weight", channels, options)
            input_quant = scheme(spec.act_bits, "activation", None, options)
        except ConfigError as error:
            raise ConfigError(f"layer {name!r}: {error}") from error
        qlayer = QuantLayer(layer, weight_quant=weight_quant, input_quant=input_quant, bn=bn)
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, qlayer)
        with gm.graph.inserting_before(node):
            quant_node = gm.graph.call_module(f"{name}.{INPUT_QUANT}", (node.args[0],))
        node.replace_input_with(node.args[0], quant_node)
        node.meta["fxquant.spec"] = asdict(spec)
        node.meta["fxquant.first_last"] = name in edge
        quant_node.meta["fxquant.input_of"] = name
    gm.graph.lint()
    gm.recompile()
    return gm
