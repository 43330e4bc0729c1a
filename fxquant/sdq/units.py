"""Search units: the layers that share one bit-width, their DBPs, and the expected cost the search bounds.

Layers that must share bits (:func:`~fxquant.passes.analysis.layer_graph.tie_groups`) form one *unit* per role
(weights, activations), with one shared DBP and one shared noise draw per step. A unit with a member whose bits
are fixed (first/last layer, a per-layer override, a non-SDQ quantizer, or activations that are not searched) is
fixed at those bits. Under a ``latency_ms`` budget a unit's *ladder* holds only the bit-widths that are cheaper on
the target than the next higher one (:func:`with_ladders`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import fx

from fxquant.errors import BudgetError, ConfigError
from fxquant.passes.analysis.cost_model import LayerCost, expected_plan_cost, plan_cost, useful_bits
from fxquant.passes.analysis.layer_graph import Ties
from fxquant.passes.analysis.layer_nodes import quant_layer_nodes
from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.sdq import StochasticBitwidthQuantizer
from fxquant.sdq.budget import Budget

__all__ = [
    "SDQ_META",
    "Unit",
    "search_units",
    "with_ladders",
    "attach_dbps",
    "unit_bits",
    "layer_bits",
    "expected_cost",
    "minimum_cost",
    "check_feasible",
    "lead_quantizer",
    "member_quantizer",
]


SDQ_META = "fxquant.sdq"


UnitRole = Literal["weight", "activation"]


@dataclass(frozen=True)
class Unit:
    """Layers whose weights (or inputs) share one bit-width; ``fixed_bits`` is set when it is not searched."""

    key: str
    role: UnitRole
    members: tuple[str, ...]
    fixed_bits: int | None = None
    #: the bit-widths the search may give it, ascending (``None``: every one from min_bits to max_bits)
    ladder: tuple[int, ...] | None = None

    @property
    def searched(self) -> bool:
        return self.fixed_bits is None

    def rungs(self, budget: Budget) -> tuple[int, ...]:
        if self.ladder is not None:
            return self.ladder
        return tuple(range(budget.min_bits, budget.max_bits + 1))

    def below(self, bits: int, budget: Budget) -> int | None:
        """The next bit-width down the ladder (None at the bottom)."""
        return max((b for b in self.rungs(budget) if b < bits), default=None)

    def above(self, bits: int, budget: Budget) -> int | None:
        return min((b for b in self.rungs(budget) if b > bits), default=None)


def member_quantizer(gm: fx.GraphModule, name: str, role: UnitRole) -> Quantizer:
    return gm.get_submodule(f"{name}.{'weight_quant' if role == 'weight' else 'input_quant'}")


def search_units(
    ties: Ties, fixed_weight: Mapping[str, int], fixed_act: Mapping[str, int]
) -> tuple[Unit, ...]:
    """One unit per tie group and role. A group with fixed members is fixed at their (common) bits; a group
    whose members are all fixed gives one unit per layer, since there is nothing to search."""
    units = []
    for role, groups, fixed in (("weight", ties.weight, fixed_weight), ("activation", ties.activation, fixed_act)):
        prefix = "w" if role == "weight" else "a"
        for group in groups:
            if all(n in fixed for n in group):  # nothing to search: the config decides each layer
                units.extend(Unit(f"{prefix}:{n}", role, (n,), fixed[n]) for n in group)
                continue
            pinned = {fixed[n] for n in group if n in fixed}
            if len(pinned) > 1:
                raise ConfigError(
                    f"layers {list(group)} must share {role} bits but are fixed at different ones: {sorted(pinned)}"
                )
            units.append(Unit(f"{prefix}:{group[0]}", role, tuple(group), pinned.pop() if pinned else None))
    return tuple(units)


def with_ladders(units: Sequence[Unit], costs: Mapping[str, LayerCost], budget: Budget) -> tuple[Unit, ...]:
    """Searched units with the bit-widths worth offering under a ``latency_ms`` budget (others unchanged).

    A unit's cost at ``b`` is the sum of its members' latencies with the other role at one of its candidate
    bit-widths (fixed ones at their bits); ``b`` is kept when :func:`useful_bits` keeps it for any of those
    (exactly the ladder of the unit's own cost when the other role is fixed). ``max_bits`` is always kept.
    """
    if budget.metric != "latency_ms":
        return tuple(units)
    fixed = {(u.role, m): u.fixed_bits for u in units if not u.searched for m in u.members}
    candidates = range(budget.min_bits, budget.max_bits + 1)
    out = []
    for unit in units:
        if not unit.searched:
            out.append(unit)
            continue
        other = "activation" if unit.role == "weight" else "weight"
        kept = {budget.max_bits}
        for o in candidates:
            unit_cost = {b: 0.0 for b in candidates}
            for m in unit.members:
                ob = fixed.get((other, m)) or o
                for b in candidates:
                    unit_cost[b] += costs[m].latency_at(*((b, ob) if unit.role == "weight" else (ob, b)))
            kept.update(useful_bits(unit_cost))
        out.append(replace(unit, ladder=tuple(sorted(kept))))
    return tuple(out)


def attach_dbps(gm: fx.GraphModule, units: Sequence[Unit], start_bits: int) -> None:
    """Set every quantizer to its unit's starting bits, share one DBP per searched unit, freeze fixed ones.

    Records ``{"weight": key, "activation": key}`` in ``node.meta["fxquant.sdq"]`` of each layer node.
    """
    for unit in units:
        quantizers = [member_quantizer(gm, name, unit.role) for name in unit.members]
        bits = unit.fixed_bits if unit.fixed_bits is not None else start_bits
        for q in quantizers:
            if q.bits != bits:
                if not isinstance(q, StochasticBitwidthQuantizer):
                    raise ConfigError(f"{unit.key}: a {type(q).__name__} at {q.bits} bits cannot be set to {bits}")
                q.set_bits(bits)
                q.reset_initialized()
            if isinstance(q, StochasticBitwidthQuantizer):
                q.active.fill_(unit.searched and bits > q.floor)
                if unit.searched and unit.ladder is not None:
                    q.set_ladder(unit.ladder)
        if unit.searched:
            if not all(isinstance(q, StochasticBitwidthQuantizer) for q in quantizers):
                raise ConfigError(f"{unit.key}: a searched unit needs 'sdq' quantizers")
            shared = quantizers[0].logit
            for q in quantizers[1:]:
                q.logit = shared
    by_layer: dict[str, dict[str, str]] = {}
    for unit in units:
        for name in unit.members:
            by_layer.setdefault(name, {})[unit.role] = unit.key
    for node in quant_layer_nodes(gm):
        node.meta[SDQ_META] = by_layer.get(str(node.target), {})


def lead_quantizer(gm: fx.GraphModule, unit: Unit) -> StochasticBitwidthQuantizer:
    return member_quantizer(gm, unit.members[0], unit.role)  # type: ignore[return-value]


def unit_bits(gm: fx.GraphModule, units: Sequence[Unit]) -> dict[str, int]:
    """The current bit-width of every unit."""
    return {u.key: (u.fixed_bits if u.fixed_bits is not None else lead_quantizer(gm, u).bits) for u in units}


def layer_bits(units: Sequence[Unit], bits: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-layer ``(weight bits, activation bits)`` mappings from per-unit values."""
    w: dict[str, Any] = {}
    a: dict[str, Any] = {}
    for unit in units:
        target = w if unit.role == "weight" else a
        for name in unit.members:
            target[name] = bits[unit.key]
    return w, a


def expected_cost(
    gm: fx.GraphModule, units: Sequence[Unit], costs: Mapping[str, LayerCost], metric: str
) -> torch.Tensor:
    """E[cost] under the current keep-probabilities (differentiable in the DBPs): each searched unit is at its
    bits with probability ``p`` and at the next bit-width down otherwise, independently of the others."""
    values: dict[str, Any] = {}
    for unit in units:
        if unit.searched:
            q = lead_quantizer(gm, unit)
            if q.stochastic:
                p = q.keep_probability()
                values[unit.key] = ((q.bits, p), (q.lower_bits, 1.0 - p))
            else:
                values[unit.key] = ((q.bits, 1.0),)
        else:
            values[unit.key] = ((unit.fixed_bits, 1.0),)
    w, a = layer_bits(units, values)
    cost = expected_plan_cost(costs, metric, w, a)
    return cost if isinstance(cost, torch.Tensor) else torch.tensor(float(cost))


def minimum_cost(units: Sequence[Unit], costs: Mapping[str, LayerCost], budget: Budget) -> float:
    """The cost with every searched unit at the bottom of its ladder (``Budget.min_bits`` unless the latency
    table dropped it) and fixed units at their bits."""
    bits = {u.key: (u.fixed_bits if u.fixed_bits is not None else u.rungs(budget)[0]) for u in units}
    w, a = layer_bits(units, bits)
    return float(plan_cost(costs, budget.metric, w, a))


def check_feasible(units: Sequence[Unit], costs: Mapping[str, LayerCost], budget: Budget) -> None:
    """Raise :class:`BudgetError` (naming the minimum achievable cost) when no plan can meet ``budget``."""
    lowest = minimum_cost(units, costs, budget)
    if not budget.met_by(lowest):
        fixed = sorted({f"{m}={u.fixed_bits}" for u in units if not u.searched for m in u.members})
        raise BudgetError(
            f"budget {budget.metric}={budget.bound:.6g} cannot be met: the minimum achievable {budget.metric} is "
            f"{lowest:.6g} (every searched layer at its lowest bit-width, min_bits={budget.min_bits}"
            + (f"; fixed: {', '.join(fixed)})" if fixed else ")")
        )
