"""The layer graph: which quantized layer feeds which, and which layers must share a bit-width.

:func:`layer_graph` builds a ``networkx.DiGraph`` whose nodes are the quantized layers (conv/linear) of a
prepared graph (or every conv/linear of a traced one) and whose edge ``u → v`` says that ``u``'s output
reaches ``v``'s input through non-parametric ops only (activations, pooling, reshapes, adds, concats,
input quantizers). Nodes carry ``type``, ``first``, ``last`` (see :func:`first_last_layers`) and, when
:func:`~fxquant.passes.analysis.cost_model.layer_costs` ran first, ``cost`` (a ``LayerCost``).

**First and last layers** (the ones ``QuantConfig.first_last_bits`` keeps at 8 bits, and the search fixes):
a layer is *first* when everything it reads comes from the graph inputs with no conv/linear on the way, and
*last* when its output reaches the graph output with no conv/linear after it. On a chain this is the first
and the last layer in graph order; a residual stream does not make a transformer's inner layers first or
last, and every head of a multi-output model is last.

:func:`tie_groups` finds the layers that must share a bit-width. The rules are ours (the paper does not
say how it handles them):

- **activation ties** (on by default): layers whose input quantizers read the *same* tensor (the same FX
  node, e.g. a residual block's first conv and its projection shortcut) share activation bits, so the
  deployed graph quantizes that tensor once.
- **merge ties** (off by default; ``TiePolicy(merge_weights=True)``): the nearest layers feeding each
  input of an ``add`` or ``cat`` (reached backwards through single-input non-parametric ops, stopping at
  other merges) share weight bits, for kernels that want equal precision on both sides of a merge.

Groups are written to ``node.meta["fxquant.ties"]`` of each layer node as ``{"weight": names, "activation":
names}``; layers that are tied to nothing form groups of one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn

from fxquant.layers import QUANTIZABLE_TYPES, FusedBn, QuantLayer
from fxquant.passes.analysis.cost_model import COST_META
from fxquant.passes.analysis.layer_nodes import quant_layer_nodes, quantizable_layers
from fxquant.quantizers.base import Quantizer

__all__ = [
    "TiePolicy", "Ties", "layer_graph", "tie_groups", "first_last_layers", "TIES_META", "MERGE_TARGETS",
]

TIES_META = "fxquant.ties"

#: call targets that merge several tensors into one
MERGE_TARGETS = (operator.add, operator.iadd, torch.add, torch.cat, torch.concat, torch.stack, "add", "add_", "cat")


@dataclass(frozen=True)
class TiePolicy:
    """Which ties :func:`tie_groups` applies (see the module docstring for the rules)."""

    shared_input_acts: bool = True
    merge_weights: bool = False


@dataclass(frozen=True)
class Ties:
    """Groups of layer names (each sorted, in graph order of their first member) that share bits."""

    weight: tuple[tuple[str, ...], ...]
    activation: tuple[tuple[str, ...], ...]

    def group_of(self, role: str, name: str) -> tuple[str, ...]:
        groups = self.weight if role == "weight" else self.activation
        return next(g for g in groups if name in g)


def _layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return quant_layer_nodes(gm) or quantizable_layers(gm)


def _is_parametric_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A conv/linear call, quantized or not: the traversal never passes through one."""
    if node.op != "call_module":
        return False
    module = modules.get(node.target)
    return isinstance(module, (QuantLayer, FusedBn, *QUANTIZABLE_TYPES))


def _is_merge(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.target not in MERGE_TARGETS:
        return False
    return len(_tensor_inputs(node)) >= 2


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n not in found else None)
    return found


def _input_tensor(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The tensor a layer quantizes: the argument of its input quantizer, or its own argument."""
    arg = node.args[0]
    if isinstance(arg, fx.Node) and arg.op == "call_module" and isinstance(modules.get(arg.target), Quantizer):
        return arg.args[0]
    return arg


def layer_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The quantized layers of ``gm`` and how they feed each other (see the module docstring).

    Example::

        g = layer_graph(qmodel)
        list(g.successors("layer1.0.conv1"))   # ['layer1.0.conv2']
    """
    modules = dict(gm.named_modules())
    layers = _layer_nodes(gm)
    names = {n: str(n.target) for n in layers}
    graph = nx.DiGraph()
    for node in layers:
        module = modules[node.target]
        inner = getattr(module, "layer", module)
        graph.add_node(names[node], type=type(inner).__name__, first=False, last=False)
        if COST_META in node.meta:  # recorded by cost_model.layer_costs
            graph.nodes[names[node]]["cost"] = node.meta[COST_META]
    for node in layers:
        seen: set[fx.Node] = set()
        frontier = list(node.users)
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            if user in names:
                graph.add_edge(names[node], names[user])
            elif user.op != "output" and not _is_parametric_layer(user, modules):
                frontier.extend(user.users)
        graph.nodes[names[node]]["first"] = _is_first(node, modules)
        graph.nodes[names[node]]["last"] = _is_last(node, modules)
    return graph


def _ends_without_layers(
    start: list[fx.Node], step: Callable[[fx.Node], list[fx.Node]], end_op: str, modules: dict[str, nn.Module]
) -> bool:
    """Whether walking from ``start`` along ``step`` (inputs or users) through non-parametric ops reaches a
    node of ``end_op`` (placeholder or output) and never a conv/linear."""
    seen: set[fx.Node] = set()
    frontier, reached = list(start), False
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == end_op:
            reached = True
        elif _is_parametric_layer(n, modules):
            return False
        else:
            frontier.extend(step(n))
    return reached


def _is_first(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return _ends_without_layers(_tensor_inputs(node), _tensor_inputs, "placeholder", modules)


def _is_last(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return _ends_without_layers(list(node.users), lambda n: list(n.users), "output", modules)


def first_last_layers(gm: fx.GraphModule) -> set[str]:
    """Names of the first and last layers (see the module docstring) of a traced or prepared graph.

    Example::

        first_last_layers(trace(resnet18()))   # {'conv1', 'fc'}
    """
    modules = dict(gm.named_modules())
    return {str(n.target) for n in _layer_nodes(gm) if _is_first(n, modules) or _is_last(n, modules)}


def _producers(start: fx.Node, layer_set: set[fx.Node], modules: dict[str, nn.Module]) -> list[fx.Node]:
    """Nearest quantized layers behind ``start`` through single-input non-parametric ops."""
    out: list[fx.Node] = []
    node: fx.Node | None = start
    while node is not None:
        if node in layer_set:
            out.append(node)
            return out
        if node.op in ("placeholder", "get_attr") or _is_merge(node) or _is_parametric_layer(node, modules):
            return out
        inputs = _tensor_inputs(node)
        node = inputs[0] if len(inputs) == 1 else None
    return out


class _UnionFind:
    def __init__(self, items: Iterable[str]):
        self.parent = {i: i for i in items}

    def find(self, i: str) -> str:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, items: list[str]) -> None:
        for other in items[1:]:
            a, b = self.find(items[0]), self.find(other)
            if a != b:
                self.parent[b] = a

    def groups(self, order: list[str]) -> tuple[tuple[str, ...], ...]:
        by_root: dict[str, list[str]] = {}
        for name in order:
            by_root.setdefault(self.find(name), []).append(name)
        return tuple(tuple(g) for g in by_root.values())


def tie_groups(gm: fx.GraphModule, policy: TiePolicy | None = None) -> Ties:
    """Groups of layers that must share weight bits and activation bits under ``policy``.

    Example::

        ties = tie_groups(qmodel)               # default: shared input tensors share activation bits
        ties.group_of("activation", "layer2.0.conv1")   # ('layer2.0.conv1', 'layer2.0.shortcut.0')
    """
    policy = policy if policy is not None else TiePolicy()
    modules = dict(gm.named_modules())
    layers = _layer_nodes(gm)
    order = [str(n.target) for n in layers]
    weights, acts = _UnionFind(order), _UnionFind(order)
    if policy.shared_input_acts:
        by_source: dict[fx.Node, list[str]] = {}
        for node in layers:
            by_source.setdefault(_input_tensor(node, modules), []).append(str(node.target))
        for group in by_source.values():
            acts.union(group)
    if policy.merge_weights:
        layer_set = set(layers)
        for node in gm.graph.nodes:
            if not _is_merge(node):
                continue
            members = [str(p.target) for arg in _tensor_inputs(node) for p in _producers(arg, layer_set, modules)]
            if members:
                weights.union(members)
    ties = Ties(weights.groups(order), acts.groups(order))
    for node in layers:
        name = str(node.target)
        node.meta[TIES_META] = {role: ties.group_of(role, name) for role in ("weight", "activation")}
    return ties
