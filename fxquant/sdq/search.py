"""The public SDQ mixed-precision search (:func:`search`) and its per-layer report (:func:`search_report`).

:func:`search` prepares a copy of the model with ``"sdq"`` quantizers around the config's quantizer (the
base, DSQ by default), builds the layer graph, the ties and the cost model (for a ``latency_ms`` budget: the
target's latency table, :func:`latency_table`, and per unit the ladder of bit-widths worth offering), checks
that the budget can be met at all (before any training), runs the search pass
(:mod:`fxquant.sdq.loop`) and returns a :class:`~fxquant.plan.BitwidthPlan` that satisfies the budget.
The plan names every quantized layer, including the first and last ones at ``QuantConfig.first_last_bits``
(counted in the cost), so that ``QuantConfig(plan=plan)`` reproduces it exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxquant.api import prepare_owned
from fxquant.config import QuantConfig
from fxquant.errors import BudgetError, ConfigError
from fxquant.layers import QuantLayer, layer_type_name
from fxquant.passes.analysis.cost_model import LayerCost, layer_costs, plan_cost, with_latency
from fxquant.passes.analysis.layer_graph import layer_graph, tie_groups
from fxquant.passes.analysis.layer_nodes import quant_layer_nodes
from fxquant.placement import Placement
from fxquant.plan import BitwidthPlan, search_report
from fxquant.quantizers.sdq import StochasticBitwidthQuantizer
from fxquant.sdq.budget import Budget
from fxquant.sdq.loop import SearchResult, run_search
from fxquant.sdq.options import SearchOptions
from fxquant.sdq.rounding import round_to_budget, sensitivity_scales
from fxquant.sdq.units import attach_dbps, check_feasible, layer_bits, search_units, unit_bits, with_ladders
from fxquant.training.weight_link import WeightLink

__all__ = ["search", "search_report", "fixed_bits", "latency_table", "SearchOptions"]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdq_config(config: QuantConfig, budget: Budget, options: SearchOptions) -> QuantConfig:
    if config.quantizer == "sdq":
        base = config.quantizer_options.get("base", StochasticBitwidthQuantizer.OPTIONS["base"])
        base_options = dict(config.quantizer_options.get("base_options", {}))
    else:
        base, base_options = config.quantizer, dict(config.quantizer_options)
    act_bits = budget.max_bits if budget.search_act_bits else (budget.act_bits or config.act_bits)
    return config.replace(
        quantizer="sdq",
        quantizer_options={
            "base": base,
            "base_options": base_options,
            "min_bits": budget.min_bits,
            "temperature": options.temperature,
            "init_logit": options.init_logit,
        },
        weight_bits=budget.max_bits,
        act_bits=act_bits,
        plan=None,
    )


def fixed_bits(gm: fx.GraphModule, config: QuantConfig, budget: Budget) -> tuple[dict[str, int], dict[str, int]]:
    """Layers of a prepared graph whose weight / activation bits the search must not change, with their bits.

    Fixed: the first and last layers when ``first_last_bits`` is set, bits given by a per-layer override,
    layers whose quantizer is not ``"sdq"`` (an override chose another scheme), and every layer's
    activations unless ``Budget.search_act_bits``.
    """
    modules = dict(gm.named_modules())
    weight: dict[str, int] = {}
    act: dict[str, int] = {}
    for node in quant_layer_nodes(gm):
        name = str(node.target)
        qlayer: QuantLayer = modules[name]
        edge = bool(node.meta.get("fxquant.first_last")) and config.first_last_bits is not None
        override = config.override_for(name, layer_type_name(qlayer))  # the resolution QuantConfig applies
        if edge or not isinstance(qlayer.weight_quant, StochasticBitwidthQuantizer) or (
            override is not None and override.weight_bits is not None
        ):
            weight[name] = qlayer.weight_quant.bits
        if edge or not budget.search_act_bits or not isinstance(qlayer.input_quant, StochasticBitwidthQuantizer) or (
            override is not None and override.act_bits is not None
        ):
            act[name] = qlayer.input_quant.bits
    return weight, act


def latency_table(
    gm: fx.GraphModule,
    budget: Budget,
    fixed_w: Mapping[str, int],
    fixed_a: Mapping[str, int],
    progress: bool = True,
) -> Any:
    """The :class:`~fxquant.backends.tvm.latency_table.LatencyTable` of a latency budget's target: every
    layer at every pair of its candidate weight and activation bits (fixed ones at their bits)."""
    from fxquant.backends.tvm.latency_table import build_latency_table

    span = range(budget.min_bits, budget.max_bits + 1)
    pairs = {}
    for node in quant_layer_nodes(gm):
        name = str(node.target)
        ws = [fixed_w[name]] if name in fixed_w else span
        acts = [fixed_a[name]] if name in fixed_a else span
        pairs[name] = [(w, a) for w in ws for a in acts]
    return build_latency_table(gm, pairs, budget.target, budget.cost_model, budget.threads, budget.batch, progress)


def _latency_metadata(table: Any, costs: Mapping[str, LayerCost], units: Sequence[Any], w: Mapping[str, int],
                      a: Mapping[str, int], estimate: float) -> dict[str, Any]:
    """What a latency plan records: the target and cost-model version, the estimate, the kernels, the ladders."""
    return {
        **table.describe(),
        "estimate_ms": estimate,
        "layer_ms": {n: costs[n].latency_at(w[n], a[n]) for n in costs},
        "kernels": {n: table.kernels[n][(w[n], a[n])] for n in costs},
        "ladders": {u.key: list(u.ladder) for u in units if u.ladder is not None},
    }


def search(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    budget: Budget,
    config: QuantConfig | None = None,
    options: SearchOptions | None = None,
    loss_fn: LossFn | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    update_weights: bool = False,
    placement: Placement | None = None,
) -> BitwidthPlan:
    """Search per-layer bit-widths that meet ``budget``; ``model`` is not modified unless ``update_weights``.

    ``config`` gives the base quantizer and the fixed layers (``first_last_bits``, overrides, excludes);
    ``options`` is a :class:`~fxquant.sdq.options.SearchOptions` (steps, interval, rates, penalty,
    ties, seed); ``loss_fn(logits, y, x)`` replaces cross-entropy, e.g. distillation from the float model:
    ``lambda z, y, x: fxquant.training.losses.kd_loss(z, teacher(x))``. With ``checkpoint_path`` the search saves
    its state there and resumes from it (same arguments, same seed: the same plan as an uninterrupted run).

    The search trains the weights along with the bit-width parameters. With ``update_weights=True`` that
    training (weights, biases, batch-norm parameters and statistics, in float) is written into ``model``
    once the search has succeeded, so that the training at the plan's bits continues from it instead of
    starting again (the search's steps are then not lost to the weights). Needs ``fold_bn`` ``"qat"`` or
    ``"none"``. ``placement`` (:class:`~fxquant.placement.Placement`) runs the search on its device and,
    under torchrun, data-parallel; the plan is the same on every rank.

    Example::

        plan = fxquant.search(model, (x,), train_loader, fxquant.Budget(avg_weight_bits=3.0))
        qmodel = fxquant.prepare(model, (x,), fxquant.QuantConfig(quantizer="dsq", plan=plan))
    """
    config = config if config is not None else QuantConfig()
    options = options if options is not None else SearchOptions()
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a fxquant.Budget, got {type(budget).__name__}")
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a fxquant.QuantConfig, got {type(config).__name__}")
    if not isinstance(options, SearchOptions):
        raise ConfigError(f"options must be a SearchOptions, got {type(options).__name__}")
    if config.plan is not None:
        raise ConfigError("config.plan must be None: the search produces the plan")
    if example_inputs is None:
        raise ConfigError("search() needs example_inputs: the cost model is computed from traced shapes")

    if not isinstance(update_weights, bool):
        raise ConfigError(f"update_weights must be True or False, got {update_weights!r}")
    link = WeightLink(model)
    gm = prepare_owned(link.working, example_inputs, _sdq_config(config, budget, options))
    if update_weights:
        link.check_shared(gm)
    costs = layer_costs(gm)
    graph = layer_graph(gm)
    ties = tie_groups(gm, options.ties)
    fixed_w, fixed_a = fixed_bits(gm, config, budget)
    units = search_units(ties, fixed_w, fixed_a)
    table = None
    if budget.metric == "latency_ms":
        table = latency_table(gm, budget, fixed_w, fixed_a, progress)
        costs = with_latency(costs, table.latency_ms)
        units = with_ladders(units, costs, budget)
    check_feasible(units, costs, budget)
    attach_dbps(gm, units, budget.max_bits)

    if any(u.searched for u in units):
        result = run_search(
            gm, train_loader, units, costs, budget, options, loss_fn, checkpoint_path, progress, on_step, placement
        )
    else:  # every layer is fixed by the config: nothing to train
        result = SearchResult(unit_bits(gm, units), {}, {}, 0, 0)
    bits = round_to_budget(units, result.bits, result.sensitivity, costs, budget, fill=options.fill)
    w, a = layer_bits(units, bits)
    achieved = float(plan_cost(costs, budget.metric, w, a))
    if not budget.met_by(achieved):
        raise BudgetError(f"internal: the rounded plan has {budget.metric}={achieved:.6g} > {budget.bound:.6g}")

    summary = {m: float(plan_cost(costs, m, w, a)) for m in ("avg_weight_bits", "bitops", "size_bytes")}
    if table is not None:
        summary["latency_ms"] = achieved
    metadata = {
        "method": "sdq",
        "budget": budget.to_dict(),
        "metric": budget.metric,
        "target": budget.bound,
        "achieved": achieved,
        "costs": summary,
        "layers": {
            name: {**c.to_dict(), "first": bool(graph.nodes[name]["first"]), "last": bool(graph.nodes[name]["last"])}
            for name, c in costs.items()
        },
        "ties": {"weight": [list(g) for g in ties.weight if len(g) > 1],
                 "activation": [list(g) for g in ties.activation if len(g) > 1]},
        "searched": {role: sorted(n for u in units if u.searched and u.role == role for n in u.members)
                     for role in ("weight", "activation")},
        "search_bits": {k: int(v) for k, v in result.bits.items()},
        "sensitivity": {k: {str(b): float(p) for b, p in sorted(v.items())} for k, v in result.sensitivity.items()},
        "keep_probability": {k: {str(b): float(p) for b, p in sorted(v.items())}
                             for k, v in result.keep_probability.items()},
        "sensitivity_scale": sensitivity_scales(result.sensitivity, [u.key for u in units if u.searched]),
        "options": options.to_dict(),
        "steps": result.steps,
        "interval": result.interval,
        "base_quantizer": _sdq_config(config, budget, options).quantizer_options["base"],
    }
    if table is not None:
        metadata["latency"] = _latency_metadata(table, costs, units, w, a, achieved)
    plan = BitwidthPlan({name: (int(w[name]), int(a[name])) for name in costs}, metadata)
    if update_weights:
        link.write_back()
    return plan
