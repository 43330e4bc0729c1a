"""Cost model of quantized layers: MACs from traced shapes, BitOPs, deployed bytes, average weight bits.

Per layer and per sample (the batch dimension of the traced shapes is divided out):

- ``MACs``: conv ``C_out·H_out·W_out · (C_in/groups)·k_h·k_w``; linear ``(output elements) · in_features``
  (:func:`fxquant.conv_geometry.macs_per_output`; the output sizes are the traced ones).
- ``BitOPs = MACs × w_bits × a_bits`` (``a_bits``: the bits of the layer's own input quantizer).
- ``size_bytes = params × w_bits / 8 + overhead``. Our choice for the overhead, which does not depend on the
  bit-widths: float32 weight scales (one per output channel, or one per tensor), a float32 bias per output
  channel when the deployed layer has one (its own bias or a folded batch norm), and the float32 step and
  offset of the input grid. Bit-packing is counted exactly (no padding to bytes per row).
- ``avg_weight_bits = Σ params·w_bits / Σ params`` over the quantized layers (parameter-weighted).
- ``latency_ms = Σ T_layer(w_bits, a_bits)``: the layer's row of a latency table on the budget's target
  (:mod:`fxquant.backends.tvm.latency_table`, attached with :func:`with_latency`), the kernel ``convert`` would
  choose at those bits.

Layers that are not quantized (excluded by the config) are outside every cost. The same formulas take
plain numbers or tensors, so :func:`plan_cost` also gives the *expected* cost under the search's
Differentiable Bitwidth Parameters when it is handed expected bit-widths (:func:`expected_bits`); that
expectation is exact because a layer's weight and activation choices are sampled independently. Latency is
not linear in the bits, so :func:`expected_plan_cost` takes each layer's distribution over bit-widths and sums
``P(w) · P(a) · T(w, a)`` over the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import torch
from torch import fx, nn

from fxquant.conv_geometry import macs_per_output, pair
from fxquant.errors import ConfigError
from fxquant.layers import FusedBn, QuantLayer
from fxquant.passes.analysis.layer_nodes import quant_layer_nodes, quantizable_layers

__all__ = [
    "LayerCost",
    "layer_costs",
    "avg_weight_bits",
    "bitops",
    "size_bytes",
    "plan_cost",
    "expected_bits",
    "expected_plan_cost",
    "latency_ms",
    "with_latency",
    "useful_bits",
    "COST_META",
]

COST_META = "fxquant.cost"
FLOAT_BYTES = 4

Number = TypeVar("Number", float, torch.Tensor)
#: a layer's bit-width distribution: (bits, probability) pairs
Distribution = Sequence[tuple[int, Any]]


@dataclass(frozen=True)
class LayerCost:
    """The bit-width-independent numbers of one layer."""

    name: str
    kind: str
    macs: int
    params: int
    overhead_bytes: int
    #: milliseconds per ``(weight bits, activation bits)`` on a latency budget's target (None: no table)
    latency: Mapping[tuple[int, int], float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.latency is None:
            del out["latency"]
        else:
            out["latency"] = {f"w{w}a{a}": ms for (w, a), ms in sorted(self.latency.items())}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerCost:
        latency = data.get("latency")
        if latency is not None:
            latency = {tuple(int(v) for v in key[1:].split("a")): float(ms) for key, ms in latency.items()}
        return cls(**{k: data[k] for k in ("name", "kind", "macs", "params", "overhead_bytes")}, latency=latency)

    def latency_at(self, w_bits: int, a_bits: int) -> float:
        if self.latency is None:
            raise ConfigError(f"layer {self.name!r} has no latency table (a latency_ms budget attaches one)")
        try:
            return self.latency[(int(w_bits), int(a_bits))]
        except KeyError:
            raise ConfigError(f"layer {self.name!r}: the latency table has no entry for w{w_bits}a{a_bits}") from None


def _parts(module: nn.Module) -> tuple[nn.Module, bool, bool]:
    """(conv/linear, deployed layer has a bias, per-channel weight scale) of a layer node's module."""
    if isinstance(module, QuantLayer):
        has_bias = module.layer.bias is not None or module.bn is not None
        return module.layer, has_bias, bool(module.weight_quant.channels)
    if isinstance(module, FusedBn):
        return module.layer, True, True
    return module, getattr(module, "bias", None) is not None, True


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        raise ConfigError(
            f"layer {node.target!r} has no traced shape; pass example_inputs to fxquant.prepare()/search() "
            "(the cost model needs node.meta['tensor_meta'])"
        )
    return tuple(int(s) for s in shape)


def _layer_cost(node: fx.Node, module: nn.Module) -> LayerCost:
    layer, has_bias, per_channel = _parts(module)
    out_shape = _shape(node)
    per_sample = math.prod(out_shape[1:]) if len(out_shape) > 1 else 1
    if isinstance(layer, nn.Conv2d):
        macs = per_sample * macs_per_output(layer.in_channels, layer.groups, pair(layer.kernel_size))
        out_channels = layer.out_channels
    else:
        macs = per_sample * macs_per_output(layer.in_features, 1, (1, 1))
        out_channels = layer.out_features
    params = layer.weight.numel()
    scales = out_channels if per_channel else 1
    overhead = FLOAT_BYTES * (scales + (out_channels if has_bias else 0) + 2)
    return LayerCost(str(node.target), type(layer).__name__, int(macs), int(params), int(overhead))


def layer_costs(gm: fx.GraphModule) -> dict[str, LayerCost]:
    """Costs of the quantized layers of a prepared graph (or of every conv/linear of a traced one), in graph
    order; each is also recorded in ``node.meta["fxquant.cost"]``.

    Example::

        costs = layer_costs(fxquant.prepare(model, (x,), config))
        bitops(costs, w_bits, a_bits)
    """
    modules = dict(gm.named_modules())
    nodes = quant_layer_nodes(gm) or quantizable_layers(gm)
    out = {}
    for node in nodes:
        cost = _layer_cost(node, modules[node.target])
        node.meta[COST_META] = cost
        out[cost.name] = cost
    return out


def _total_params(costs: Mapping[str, LayerCost]) -> int:
    total = sum(c.params for c in costs.values())
    if total == 0:
        raise ConfigError("the cost model has no quantized layer")
    return total


def avg_weight_bits(costs: Mapping[str, LayerCost], w_bits: Mapping[str, Number]) -> Number:
    return sum(c.params * w_bits[n] for n, c in costs.items()) / _total_params(costs)


def bitops(costs: Mapping[str, LayerCost], w_bits: Mapping[str, Number], a_bits: Mapping[str, Number]) -> Number:
    return sum(c.macs * w_bits[n] * a_bits[n] for n, c in costs.items())


def size_bytes(costs: Mapping[str, LayerCost], w_bits: Mapping[str, Number]) -> Number:
    return sum(c.params * w_bits[n] / 8.0 + c.overhead_bytes for n, c in costs.items())


def latency_ms(costs: Mapping[str, LayerCost], w_bits: Mapping[str, int], a_bits: Mapping[str, int]) -> float:
    return float(sum(c.latency_at(w_bits[n], a_bits[n]) for n, c in costs.items()))


_METRIC_COSTS = {
    "avg_weight_bits": lambda costs, w, a: avg_weight_bits(costs, w),
    "bitops": bitops,
    "size_bytes": lambda costs, w, a: size_bytes(costs, w),
    "latency_ms": latency_ms,
}


def plan_cost(
    costs: Mapping[str, LayerCost], metric: str, w_bits: Mapping[str, Number], a_bits: Mapping[str, Number]
) -> Number:
    """The cost named ``metric`` (a :data:`fxquant.sdq.budget.METRICS` name) of per-layer bit-widths."""
    if metric not in _METRIC_COSTS:
        raise ConfigError(f"unknown cost metric {metric!r}; allowed: {', '.join(_METRIC_COSTS)}")
    return _METRIC_COSTS[metric](costs, w_bits, a_bits)


def expected_plan_cost(
    costs: Mapping[str, LayerCost], metric: str, w_dist: Mapping[str, Distribution], a_dist: Mapping[str, Distribution]
) -> Any:
    """E[cost] when each layer's weight and activation bits are drawn independently from ``w_dist[layer]`` and
    ``a_dist[layer]`` (differentiable in the probabilities when they are tensors)."""
    if metric == "latency_ms":
        return sum(
            pw * pa * c.latency_at(wb, ab)
            for n, c in costs.items() for wb, pw in w_dist[n] for ab, pa in a_dist[n]
        )

    def mean(dist: Distribution) -> Any:
        return sum(b * p for b, p in dist)

    return plan_cost(costs, metric, {n: mean(d) for n, d in w_dist.items()}, {n: mean(d) for n, d in a_dist.items()})


def with_latency(
    costs: Mapping[str, LayerCost], table: Mapping[str, Mapping[tuple[int, int], float]]
) -> dict[str, LayerCost]:
    """``costs`` with each layer's latency row (``table[layer][(w_bits, a_bits)]``, milliseconds) attached."""
    missing = sorted(set(costs) - set(table))
    if missing:
        raise ConfigError(f"the latency table has no row for layer(s) {missing}")
    return {n: replace(c, latency=dict(table[n])) for n, c in costs.items()}


def useful_bits(cost_by_bits: Mapping[int, float]) -> tuple[int, ...]:
    """The bit-widths worth offering, ascending: from the highest down, a bit-width is kept only if it costs
    less than the next higher kept one (on a core whose int8 dot product serves 3-8 bits alike, 3-7 go)."""
    kept: list[int] = []
    for bits in sorted(cost_by_bits, reverse=True):
        if not kept or cost_by_bits[bits] < cost_by_bits[kept[-1]]:
            kept.append(bits)
    return tuple(reversed(kept))


def expected_bits(bits: int, keep_probability: torch.Tensor) -> torch.Tensor:
    """E[bit-width] of a layer that uses ``bits`` with probability ``p`` and ``bits − 1`` otherwise."""
    return (bits - 1) + keep_probability
