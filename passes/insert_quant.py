"""Insert fake-quantization: each quantizable conv/linear becomes a :class:`QuantLayer` and gets an
input-quantizer node in front of it.

Annotation (which layers, which settings) is separate from insertion: :func:`quantizable_layers` (from
:mod:`.analysis.layer_nodes`), :func:`~fxquant.passes.analysis.layer_graph.first_last_layers` and
``QuantConfig.resolve`` decide, this pass only rewrites. The resolved settings are recorded in
``node.meta["fxquant.spec"]``.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import fx

from fxquant.config import LayerQuantSpec, QuantConfig
from fxquant.errors import ConfigError
from fxquant.layers import FusedBn, QuantLayer, layer_type_name
from fxquant.passes.analysis.layer_graph import first_last_layers
from fxquant.passes.analysis.layer_nodes import quantizable_layers
from fxquant.passes.rewrite import replace_submodule
from fxquant.quantizers.registry import get_quantizer

__all__ = ["insert_quantizers", "INPUT_QUANT"]

INPUT_QUANT = "input_quant"


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
    edge = first_last_layers(gm)
    for node in layers:
        name = node.target
        if config.is_excluded(name, types[name]):
            continue
        spec: LayerQuantSpec = config.resolve(name, types[name], name in edge)
        module = modules[name]
        layer = module.layer if isinstance(module, FusedBn) else module
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
        replace_submodule(gm, name, qlayer)
        with gm.graph.inserting_before(node):
            quant_node = gm.graph.call_module(f"{name}.{INPUT_QUANT}", (node.args[0],))
        node.replace_input_with(node.args[0], quant_node)
        node.meta["fxquant.spec"] = asdict(spec)
        node.meta["fxquant.first_last"] = name in edge
        quant_node.meta["fxquant.input_of"] = name
    gm.graph.lint()
    gm.recompile()
    return gm
