"""Graph passes, one per module: each takes a ``torch.fx.GraphModule`` and returns one.

Analyses that read a prepared graph without rewriting it (which nodes are layers, the layer graph,
per-layer costs) live in :mod:`fxquant.passes.analysis`.
"""

from fxquant.passes.analysis.layer_nodes import quantizable_layers
from fxquant.passes.fold_bn import fold_bn, fuse_bn_for_qat
from fxquant.passes.freeze import freeze
from fxquant.passes.insert_quant import insert_quantizers
from fxquant.passes.trace import trace

__all__ = ["trace", "fold_bn", "fuse_bn_for_qat", "insert_quantizers", "quantizable_layers", "freeze"]
