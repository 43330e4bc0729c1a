"""Rounding a searched plan onto the budget: deterministic and budget-exact (see :mod:`fxquant.sdq`, step 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from fxquant.errors import BudgetError
from fxquant.passes.analysis.cost_model import LayerCost, plan_cost
from fxquant.sdq.budget import Budget
from fxquant.sdq.units import (
    Unit,
    layer_bits,
)

__all__ = ["SENSITIVITY_FLOOR_RATIO", "step_noise", "sensitivity_scales", "round_to_budget"]


#: a unit's sensitivity scale is at least this fraction of the median positive scale
SENSITIVITY_FLOOR_RATIO = 0.01


def step_noise(high: int, low: int) -> float:
    """``(4^(−low) − 4^(−high))/3``: the noise-power model's loss of a step from ``high`` to ``low`` bits per
    unit of ``A`` (``4^(−high)`` for one bit)."""
    return (4.0 ** (-low) - 4.0 ** (-high)) / 3.0


def sensitivity_scales(
    sensitivity: Mapping[str, Mapping[int, float]],
    keys: Iterable[str],
    lower: Callable[[str, int], int] | None = None,
) -> dict[str, float]:
    """``A`` of ``s(k) = A·4^(−k)`` per unit: the least-squares fit to its measurements, floored at 1% of the
    median positive fit (or 1 for every unit when nothing positive was measured). ``lower(key, k)`` is the
    bit-width the measurement at ``k`` stepped to (default ``k − 1``)."""
    fitted: dict[str, float | None] = {}
    for key in keys:
        points = sensitivity.get(key, {})
        basis = {k: step_noise(k, lower(key, k) if lower is not None else k - 1) for k in points}
        den = sum(f * f for f in basis.values())
        fitted[key] = sum(m * basis[k] for k, m in points.items()) / den if den else None
    positive = sorted(a for a in fitted.values() if a is not None and a > 0)
    if not positive:
        return {key: 1.0 for key in fitted}
    floor = SENSITIVITY_FLOOR_RATIO * positive[len(positive) // 2]
    return {key: max(a if a is not None else 0.0, floor) for key, a in fitted.items()}


def round_to_budget(
    units: Sequence[Unit],
    bits: Mapping[str, int],
    sensitivity: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, LayerCost],
    budget: Budget,
    fill: bool = True,
) -> dict[str, int]:
    """Deterministic per-unit bits that meet ``budget``: greedy lowering, then optional greedy filling.

    ``sensitivity[unit][k]`` is the measured loss of the step from ``k`` to ``k − 1`` (see
    :func:`sensitivity_scales`). Equal scores prefer the larger cost change, then the smaller unit key, so the
    result depends only on the inputs.
    """
    out = dict(bits)
    searched = [u for u in units if u.searched]
    by_key = {u.key: u for u in searched}

    def below(key: str, k: int) -> int:
        low = by_key[key].below(k, budget)
        return low if low is not None else k - 1

    scale = sensitivity_scales(sensitivity, [u.key for u in searched], below)

    def step_loss(key: str, k: int) -> float:
        """Modelled loss of the step from ``k`` down the unit's ladder."""
        return scale[key] * step_noise(k, below(key, k))

    def cost_of(state: Mapping[str, int]) -> float:
        w, a = layer_bits(units, state)
        return float(plan_cost(costs, budget.metric, w, a))

    current = cost_of(out)
    while not budget.met_by(current):
        best: tuple[float, float, str] | None = None
        for u in searched:
            low = u.below(out[u.key], budget)
            if low is None:
                continue
            trial = cost_of({**out, u.key: low})
            saved = current - trial
            if saved <= 0:
                continue
            score = step_loss(u.key, out[u.key]) / saved
            if best is None or (score, -saved, u.key) < best:
                best = (score, -saved, u.key)
        if best is None:
            raise BudgetError(f"cannot lower any layer further; {budget.metric}={current:.6g} > {budget.bound:.6g}")
        out[best[2]] = by_key[best[2]].below(out[best[2]], budget)
        current = cost_of(out)
    while fill:
        pick: tuple[float, str] | None = None
        for u in searched:
            high = u.above(out[u.key], budget)
            if high is None:
                continue
            trial = cost_of({**out, u.key: high})
            if not budget.met_by(trial):
                continue
            added = trial - current
            gain = step_loss(u.key, high)
            score = math.inf if added <= 0 else gain / added
            if pick is None or score > pick[0] or (score == pick[0] and u.key < pick[1]):
                pick = (score, u.key)
        if pick is None:
            break
        out[pick[1]] = by_key[pick[1]].above(out[pick[1]], budget)
        current = cost_of(out)
    return out
