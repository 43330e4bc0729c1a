"""Batch-norm folding: exact inference folding, and fusion into one node for QAT-time folding.

Both match ``conv2d/linear -> batchnorm`` where the batch norm is the layer's only user and tracks
running statistics. Anything else is left as it is, and the reason is recorded in
``gm.meta["fxquant.skipped_bn"]``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.layers import FusedBn, fold_bn_into
from fxquant.passes.rewrite import replace_submodule

__all__ = ["fold_bn", "fuse_bn_for_qat", "conv_bn_pairs"]

_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def conv_bn_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(layer node, bn node)`` pairs that can be folded, and the reasons for the ones that cannot."""
    modules = dict(gm.named_modules())
    pairs, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        layer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if layer is None or not any(isinstance(layer, lt) and isinstance(bn, bt) for lt, bt in _PAIRS):
            skipped.append(f"{node.target}: input is not a conv2d/linear")
        elif len(src.users) != 1:
            skipped.append(f"{node.target}: {src.target} has other users")
        elif not bn.track_running_stats or bn.running_mean is None:
            skipped.append(f"{node.target}: no running statistics")
        else:
            pairs.append((src, node))
    gm.meta["fxquant.skipped_bn"] = skipped
    return pairs


def _replace_pair(gm: fx.GraphModule, layer_node: fx.Node, bn_node: fx.Node, new_module: nn.Module) -> None:
    replace_submodule(gm, layer_node.target, new_module)
    bn_node.replace_all_uses_with(layer_node)
    gm.graph.erase_node(bn_node)
    gm.delete_submodule(bn_node.target)  # the fused module owns it now; no alias stays behind


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every foldable batch norm into its conv/linear (eval semantics: running statistics).

    Example::

        folded = fold_bn(trace(model.eval()))
    """
    modules = dict(gm.named_modules())
    for layer_node, bn_node in conv_bn_pairs(gm):
        layer, bn = modules[layer_node.target], modules[bn_node.target]
        with torch.no_grad():
            weight, bias = fold_bn_into(layer, bn)
            new = _copy_layer(layer, weight, bias)
        _replace_pair(gm, layer_node, bn_node, new)
    return _finish(gm)


def fuse_bn_for_qat(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each ``layer -> bn`` pair by one :class:`FusedBn` node; ``insert_quantizers`` then folds
    the running statistics into the quantized weight while the batch norm keeps training."""
    modules = dict(gm.named_modules())
    for layer_node, bn_node in conv_bn_pairs(gm):
        fused = FusedBn(modules[layer_node.target], modules[bn_node.target])
        _replace_pair(gm, layer_node, bn_node, fused)
    return _finish(gm)


def _copy_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    import copy

    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.detach().clone())
    new.bias = nn.Parameter(bias.detach().clone())
    return new


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
