"""The SDQ search as a pass over a prepared GraphModule whose quantizers are ``"sdq"`` quantizers.

The paper (Huang et al., ICML 2022) states that Differentiable Bitwidth Parameters (DBPs) drive a stochastic
choice between adjacent bit-widths and that a search phase yields the mixed-precision plan; its schedule,
cost term and rounding were not available. This pass is our design (docs/design.md, section "SDQ search"):

1. **Units.** Layers that must share bits (:func:`~fxquant.passes.layer_graph.tie_groups`) form one *unit*
   per role (weights, activations), with one shared DBP and one shared noise draw per step. A unit with a
   member whose bits are fixed (first/last layer, a per-layer override, a non-SDQ quantizer, or activations
   that are not searched) is fixed at those bits.
2. **Search.** Every searched unit starts at ``Budget.max_bits``. Each step samples every unit's choice,
   and minimises ``task loss + λ·max(0, E[cost]/budget − 1)`` where ``E[cost]`` is the exact expected cost
   under the keep-probabilities (:mod:`~fxquant.passes.cost_model`); model weights and quantizer
   parameters train with SGD (momentum), DBPs with plain SGD at their own rate. At the end of every
   interval, a unit whose keep-probability is below ``threshold`` steps down one bit (down to
   ``Budget.min_bits``) and its DBP restarts. Under a ``latency_ms`` budget a unit's *ladder* holds only the
   bit-widths that are cheaper on the target than the next higher one (:func:`with_ladders`), and "one bit
   down" means the next rung: on a core where 3-7 bits run the same int8 kernel as 8, a unit goes 8 -> 2.
3. **Sensitivity.** While a unit sits at ``k`` bits, its DBPs record the task-loss gradient reaching their
   relaxed samples, ``∂L/∂z ≈ L(k) − L(k − 1)`` (see :mod:`fxquant.quantizers.sdq`); its mean, summed over
   the unit's members and negated, is the measured loss ``m(k)`` of the step from ``k`` to ``k − 1``.
   Single measurements are noisy (a few steps each, often of either sign), so the rounding uses the
   noise-power model ``s(k) = A·4^(−k)`` (quantization-noise power grows 4× per bit removed; a step from
   ``k`` down to ``l`` costs ``A·(4^(−l) − 4^(−k))/3``, which is ``A·4^(−k)`` for ``l = k − 1``), with ``A``
   fitted to all of the unit's measurements by least squares and floored at 1% of the median positive
   ``A`` of all units (a unit with no measurable loss is the cheapest, but not free).
4. **Rounding** (:func:`round_to_budget`): deterministic and budget-exact. While the plan is over budget,
   lower the unit with the smallest ``s(k)`` per unit of cost saved; then, optionally, raise the unit with
   the largest ``s(k + 1)`` per unit of cost added while the budget still holds.

The loop checkpoints (model, DBPs, bits, optimizer, RNG states, step) so that a resumed search continues
from the saved step and reproduces the uninterrupted run bit for bit (same seed, same loader order).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from fxquant.budget import Budget
from fxquant.errors import BudgetError, CheckpointError, ConfigError, NumericsError
from fxquant.output_files import torch_save_atomic
from fxquant.passes.cost_model import LayerCost, expected_plan_cost, plan_cost, useful_bits
from fxquant.passes.insert_quant import quant_layer_nodes
from fxquant.passes.layer_graph import TiePolicy, Ties
from fxquant.placement import Placement, broadcast_buffers
from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.sdq import StochasticBitwidthQuantizer

__all__ = [
    "SearchOptions",
    "Unit",
    "SearchResult",
    "search_units",
    "with_ladders",
    "attach_dbps",
    "unit_bits",
    "layer_bits",
    "expected_cost",
    "minimum_cost",
    "check_feasible",
    "round_to_budget",
    "sensitivity_scales",
    "run_search",
    "SDQ_META",
    "CHECKPOINT_FORMAT",
]

SDQ_META = "fxquant.sdq"
#: a unit's sensitivity scale is at least this fraction of the median positive scale
SENSITIVITY_FLOOR_RATIO = 0.01
CHECKPOINT_FORMAT = "fxquant.sdq_checkpoint/1"
UnitRole = Literal["weight", "activation"]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SearchOptions:
    """Settings of the search loop; the defaults suit a ResNet on Fashion-MNIST/CIFAR from a trained start.

    ``steps=None`` runs one pass over the loader; ``interval=None`` gives ``2·(max_bits − min_bits)``
    intervals, room for every unit to reach the floor. ``checkpoint_every=None`` saves at interval ends.
    ``lr``/``momentum``: SGD of the model and quantizer parameters; ``dbp_lr``: plain SGD of the DBP logits;
    ``penalty``: λ of the budget term; ``temperature``, ``init_logit``: the DBPs' Gumbel-sigmoid and their
    (re)start value; ``threshold``: the keep-probability below which a unit steps down; ``fill``: let the
    rounding spend budget left over; ``ties``: the :class:`TiePolicy`.
    """

    steps: int | None = None
    interval: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    dbp_lr: float = 10.0
    penalty: float = 2.0
    temperature: float = 1.0
    threshold: float = 0.5
    init_logit: float = 2.0
    fill: bool = True
    ties: TiePolicy = field(default_factory=TiePolicy)
    seed: int = 0
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "interval", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"SearchOptions.{name}={value!r} is invalid: expected a positive integer or None")
        for name in ("lr", "dbp_lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"SearchOptions.{name}={value!r} is invalid: expected a number > 0")
        if not isinstance(self.penalty, (int, float)) or not self.penalty >= 0:
            raise ConfigError(f"SearchOptions.penalty={self.penalty!r} is invalid: expected a number >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"SearchOptions.momentum={self.momentum!r} is invalid: expected 0 <= momentum < 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"SearchOptions.threshold={self.threshold!r} is invalid: expected 0 < threshold < 1")
        if not math.isfinite(self.init_logit):
            raise ConfigError(f"SearchOptions.init_logit={self.init_logit!r} is invalid: expected a finite number")
        if not isinstance(self.ties, TiePolicy):
            raise ConfigError(f"SearchOptions.ties must be a TiePolicy, got {type(self.ties).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ties"] = asdict(self.ties)
        return out


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


@dataclass(frozen=True)
class SearchResult:
    """Final bits of every unit and, per searched unit and explored bit-width ``k``, the sensitivity of the
    step from ``k`` to ``k − 1`` and the keep-probability the DBP had there."""

    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    keep_probability: dict[str, dict[int, float]]
    steps: int
    interval: int


# -- units and DBPs ---------------------------------------------------------------------------------------


def _quantizer(gm: fx.GraphModule, name: str, role: UnitRole) -> Quantizer:
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
        quantizers = [_quantizer(gm, name, unit.role) for name in unit.members]
        bits = unit.fixed_bits if unit.fixed_bits is not None else start_bits
        for q in quantizers:
            if q.bits != bits:
                if not isinstance(q, StochasticBitwidthQuantizer):
                    raise ConfigError(f"{unit.key}: a {type(q).__name__} at {q.bits} bits cannot be set to {bits}")
                q.set_bits(bits)
                q.initialized.fill_(False)
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


def _lead(gm: fx.GraphModule, unit: Unit) -> StochasticBitwidthQuantizer:
    return _quantizer(gm, unit.members[0], unit.role)  # type: ignore[return-value]


def unit_bits(gm: fx.GraphModule, units: Sequence[Unit]) -> dict[str, int]:
    """The current bit-width of every unit."""
    return {u.key: (u.fixed_bits if u.fixed_bits is not None else _lead(gm, u).bits) for u in units}


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
            q = _lead(gm, unit)
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


# -- rounding ---------------------------------------------------------------------------------------------


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


# -- the loop ---------------------------------------------------------------------------------------------


class _Batches:
    """Endless batches from a loader, with what is needed to replay the current epoch on resume."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.iterator: Any = None
        self.epoch_rng: torch.Tensor | None = None
        self.loader_rng: torch.Tensor | None = None
        self.consumed = 0

    def _generator(self) -> torch.Generator | None:
        gen = getattr(self.loader, "generator", None)
        return gen if isinstance(gen, torch.Generator) else None

    def _start_epoch(self) -> None:
        self.epoch_rng = torch.get_rng_state()
        gen = self._generator()
        self.loader_rng = gen.get_state() if gen is not None else None
        self.iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> Any:
        if self.iterator is None:
            self._start_epoch()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self._start_epoch()
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ConfigError("train_loader yields no batches") from None
        self.consumed += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch_rng": self.epoch_rng, "loader_rng": self.loader_rng, "consumed": self.consumed}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replay the saved epoch up to the saved batch (the caller restores the RNG afterwards)."""
        if state["epoch_rng"] is None:
            return
        torch.set_rng_state(state["epoch_rng"])
        gen = self._generator()
        if gen is not None and state["loader_rng"] is not None:
            gen.set_state(state["loader_rng"])
        self.epoch_rng, self.loader_rng = state["epoch_rng"], state["loader_rng"]
        self.iterator = iter(self.loader)
        for _ in range(state["consumed"]):
            next(self.iterator)
        self.consumed = state["consumed"]


def _optimizer(gm: fx.GraphModule, options: SearchOptions) -> torch.optim.Optimizer:
    dbps, others = [], []
    for name, param in gm.named_parameters():
        (dbps if name.endswith(".logit") else others).append(param)
    return torch.optim.SGD(
        [
            {"params": others, "lr": options.lr, "momentum": options.momentum},
            {"params": dbps, "lr": options.dbp_lr, "momentum": 0.0},
        ]
    )


def _draw_noise(gm: fx.GraphModule, units: Sequence[Unit]) -> None:
    """One U(0, 1) draw per searched unit, shared by its members (tied layers sample the same choice)."""
    for unit in units:
        if unit.searched:
            u = torch.rand(())
            for name in unit.members:
                _quantizer(gm, name, unit.role).noise = u


def _unit_sensitivity(gm: fx.GraphModule, unit: Unit) -> float:
    """The unit's measured loss of stepping down from its current bits (sum over members; 0 if unmeasured)."""
    values = [_quantizer(gm, name, unit.role).sensitivity() for name in unit.members]
    return float(sum(v for v in values if v is not None))


def _step_down(gm: fx.GraphModule, units: Sequence[Unit], threshold: float) -> dict[str, tuple[float, float]]:
    """Units whose keep-probability fell below ``threshold`` lose one bit; returns their
    ``(keep-probability, sensitivity)`` at the bits they left."""
    lowered = {}
    for unit in units:
        if not unit.searched:
            continue
        lead = _lead(gm, unit)
        if not lead.stochastic:
            continue
        p = float(lead.keep_probability().detach())
        if p < threshold:
            lowered[unit.key] = (p, _unit_sensitivity(gm, unit))
            for name in unit.members:
                _quantizer(gm, name, unit.role).step_down()
    return lowered


def _fingerprint(units: Sequence[Unit], budget: Budget, options: SearchOptions, steps: int, interval: int) -> dict:
    return {
        "units": [[u.key, u.role, list(u.members), u.fixed_bits] + ([list(u.ladder)] if u.ladder else [])
                  for u in units],
        "budget": budget.to_dict(),
        "options": {k: v for k, v in options.to_dict().items() if k != "checkpoint_every"},
        "steps": steps,
        "interval": interval,
    }


def _load_checkpoint(path: Path, fingerprint: dict) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"cannot read search checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an SDQ search checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if payload["fingerprint"] != fingerprint:
        theirs, ours = payload["fingerprint"], fingerprint
        differ = sorted(k for k in ours if theirs.get(k) != ours.get(k))
        raise CheckpointError(
            f"{path} belongs to another search (different {', '.join(differ)}); delete it or pass another path"
        )
    return payload


def _restore_bits(gm: fx.GraphModule, units: Sequence[Unit], bits: Mapping[str, int]) -> None:
    for unit in units:
        if unit.searched:
            for name in unit.members:
                _quantizer(gm, name, unit.role).set_bits(int(bits[unit.key]))


def run_search(
    gm: fx.GraphModule,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    units: Sequence[Unit],
    costs: Mapping[str, LayerCost],
    budget: Budget,
    options: SearchOptions | None = None,
    loss_fn: LossFn | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    placement: Placement | None = None,
) -> SearchResult:
    """Train ``gm`` (prepared with ``"sdq"`` quantizers, :func:`attach_dbps` applied) with the budget
    penalty and step bit-widths down; returns the units' final bits and sensitivities.

    ``on_step(step, info)`` runs after each step (and after its checkpoint), with the loss, the expected
    cost ratio and the number of units stepped down. With ``checkpoint_path`` an existing checkpoint of
    the same search is resumed; a checkpoint of another search raises :class:`CheckpointError`.
    ``placement`` puts the search on a device and, under torchrun, splits each batch over the ranks (see
    :mod:`fxquant.placement`): every rank draws the same noise and steps down the same units; rank 0 saves.
    """
    placement = placement if placement is not None else Placement(next(gm.parameters()).device)
    options = options if options is not None else SearchOptions()
    steps = options.steps
    if steps is None:
        if not hasattr(loader, "__len__"):
            raise ConfigError("SearchOptions.steps is required when train_loader has no len()")
        steps = len(loader)  # type: ignore[arg-type]
    searched = [u for u in units if u.searched]
    interval = options.interval or max(1, steps // max(1, 2 * (budget.max_bits - budget.min_bits)))
    every = options.checkpoint_every or interval
    fingerprint = _fingerprint(units, budget, options, steps, interval)
    path = Path(checkpoint_path) if checkpoint_path is not None else None

    gm.to(placement.device).train()
    # a unit stepped down to its floor stops using its logits: DDP must allow unused parameters
    trained = placement.wrap(gm, find_unused_parameters=True)
    optimizer = _optimizer(gm, options)
    batches = _Batches(loader)
    history: dict[str, dict[int, float]] = {u.key: {} for u in searched}  # sensitivity per bits left
    keep: dict[str, dict[int, float]] = {u.key: {} for u in searched}  # keep-probability per bits left
    start = 0
    if path is not None and path.exists():
        payload = _load_checkpoint(path, fingerprint)
        _restore_bits(gm, units, payload["unit_bits"])
        gm.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        history = {k: {int(b): float(p) for b, p in v.items()} for k, v in payload["history"].items()}
        keep = {k: {int(b): float(p) for b, p in v.items()} for k, v in payload["keep"].items()}
        start = int(payload["step"])
        batches.restore(payload["batches"])
        torch.set_rng_state(payload["rng"])
    else:
        torch.manual_seed(options.seed)

    def save(done: int) -> None:
        if path is None or not placement.writes_files:
            return
        torch_save_atomic(path, {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "step": done,
            "unit_bits": unit_bits(gm, units),
            "history": {k: dict(v) for k, v in history.items()},
            "keep": {k: dict(v) for k, v in keep.items()},
            "model": gm.state_dict(),
            "optimizer": optimizer.state_dict(),
            "batches": batches.state(),
            "rng": torch.get_rng_state(),
        })

    target = budget.bound
    bar = tqdm(total=steps, initial=start, desc="SDQ search", disable=not progress, leave=False, dynamic_ncols=True)
    for step in range(start, steps):
        x, y, share = placement.shard(*batches.next())
        _draw_noise(gm, units)
        with placement.autocast():
            logits = trained(x).float()
        task = loss_fn(logits, y, x) if loss_fn is not None else F.cross_entropy(logits, y)
        ratio = expected_cost(gm, units, costs, budget.metric) / target
        loss = task * share + options.penalty * torch.relu(ratio - 1.0)  # DDP averages: the global mean task loss
        if not math.isfinite(float(loss.detach())):
            raise NumericsError(f"SDQ search loss became {float(loss.detach())} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if placement.distributed:
            broadcast_buffers(gm)
        lowered: dict[str, tuple[float, float]] = {}
        if (step + 1) % interval == 0:
            bits_left = unit_bits(gm, units)
            lowered = _step_down(gm, units, options.threshold)
            for key, (p, sens) in lowered.items():
                keep[key][bits_left[key]] = p
                history[key][bits_left[key]] = sens
        if (step + 1) % every == 0 or step + 1 == steps:
            save(step + 1)
        info = {"loss": float(task.detach()), "cost_ratio": float(ratio.detach()), "lowered": float(len(lowered))}
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss']:.3f}", cost=f"{info['cost_ratio']:.2f}")
        if on_step is not None:
            on_step(step, info)
    bar.close()
    for unit in units:
        for name in unit.members:
            q = _quantizer(gm, name, unit.role)
            if isinstance(q, StochasticBitwidthQuantizer):
                q.noise = None

    final = unit_bits(gm, units)
    sensitivity = {k: dict(v) for k, v in history.items()}
    keep_final = {k: dict(v) for k, v in keep.items()}
    for unit in searched:
        lead = _lead(gm, unit)
        if lead.stochastic:
            sensitivity[unit.key][final[unit.key]] = _unit_sensitivity(gm, unit)
            keep_final[unit.key][final[unit.key]] = float(lead.keep_probability().detach())
    return SearchResult(final, sensitivity, keep_final, steps, interval)

