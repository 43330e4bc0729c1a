"""The public SDQ mixed-precision search (:func:`search`) and its per-layer report (:func:`search_report`).

:func:`search` prepares a copy of the model with ``"sdq"`` quantizers around the config's quantizer (the
base, DSQ by default), builds the layer graph, the ties and the cost model (for a ``latency_ms`` budget: the
target's latency table, :func:`latency_table`, and per unit the ladder of bit-widths worth offering), checks
that the budget can be met at all (before any training), runs the search pass
(:mod:`fxquant.passes.sdq_search`) and returns a :class:`~fxquant.plan.BitwidthPlan` that satisfies the budget.
The plan names every quantized layer, including the first and last ones at ``QuantConfig.first_last_bits``
(counted in the cost), so that ``QuantConfig(plan=plan)`` reproduces it exactly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import fx, nn

from fxquant.budget import Budget
from fxquant.config import QuantConfig
from fxquant.errors import BudgetError, ConfigError
from fxquant.layers import QuantLayer, layer_type_name
from fxquant.passes.cost_model import LayerCost, layer_costs, plan_cost, with_latency
from fxquant.passes.insert_quant import quant_layer_nodes
from fxquant.passes.layer_graph import layer_graph, tie_groups
from fxquant.passes.sdq_search import (
    SearchOptions,
    SearchResult,
    attach_dbps,
    check_feasible,
    layer_bits,
    round_to_budget,
    run_search,
    search_units,
    sensitivity_scales,
    unit_bits,
    with_ladders,
)
from fxquant.placement import Placement
from fxquant.plan import BitwidthPlan
from fxquant.quantizers.sdq import StochasticBitwidthQuantizer
from fxquant.weight_link import WeightLink

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
        override = config._override_for(name, layer_type_name(qlayer))  # the resolution QuantConfig applies
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
    ``options`` is a :class:`~fxquant.passes.sdq_search.SearchOptions` (steps, interval, rates, penalty,
    ties, seed); ``loss_fn(logits, y, x)`` replaces cross-entropy, e.g. distillation from the float model:
    ``lambda z, y, x: fxquant.losses.kd_loss(z, teacher(x))``. With ``checkpoint_path`` the search saves
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
    from fxquant.api import prepare_owned

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


# -- report -----------------------------------------------------------------------------------------------


def _layer_table(plan: BitwidthPlan, costs: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    info = costs if costs is not None else plan.metadata.get("layers", {})
    rows = []
    for name, (wb, ab) in plan.bits.items():
        c = info.get(name)
        c = c.to_dict() if hasattr(c, "to_dict") else c
        macs = c["macs"] if c else None
        params = c["params"] if c else None
        rows.append({
            "layer": name,
            "weight_bits": wb,
            "act_bits": ab,
            "params": params,
            "macs": macs,
            "bitops": macs * wb * ab if macs is not None else None,
            "size_bytes": params * wb / 8 + c["overhead_bytes"] if c else None,
        })
    return rows


def search_report(
    plan: BitwidthPlan,
    png_path: str | os.PathLike | None = None,
    costs: Mapping[str, Any] | None = None,
    file: TextIO | None = None,
    title: str | None = None,
    quiet: bool = False,
) -> str:
    """Print (to ``file``, default stdout, unless ``quiet``) and return a per-layer table of bits, MACs and
    BitOPs; with ``png_path``, also draw the bits and BitOPs per layer as a bar chart (matplotlib, Agg).

    Layer sizes come from the plan's metadata (a searched plan carries them) or from ``costs``
    (``fxquant.passes.cost_model.layer_costs`` of a prepared model).

    Example::

        fxquant.search_report(plan, "plan.png")
    """
    rows = _layer_table(plan, costs)
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    header = f"{'layer':<{width}}  {'W':>2} {'A':>2} {'params':>9} {'MACs':>12} {'MBitOPs':>10} {'bytes':>10}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if v is not None else "?"

    for r in rows:
        mbitops = r["bitops"] / 1e6 if r["bitops"] is not None else None
        lines.append(
            f"{r['layer']:<{width}}  {r['weight_bits']:>2} {r['act_bits']:>2} {fmt(r['params'], '>9')} "
            f"{fmt(r['macs'], '>12')} {fmt(mbitops, '>10.2f')} {fmt(r['size_bytes'], '>10.1f')}"
        )
    known = [r for r in rows if r["params"] is not None]
    if known and len(known) == len(rows):
        params = sum(r["params"] for r in rows)
        avg = sum(r["params"] * r["weight_bits"] for r in rows) / params
        total_bitops = sum(r["bitops"] for r in rows) / 1e6
        total_bytes = sum(r["size_bytes"] for r in rows)
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<{width}}  {'':>2} {'':>2} {params:>9} {sum(r['macs'] for r in rows):>12} "
            f"{total_bitops:>10.2f} {total_bytes:>10.1f}"
        )
        lines.append(f"average weight bits (parameter-weighted): {avg:.4f}")
    meta = plan.metadata
    if "metric" in meta and "target" in meta:
        achieved = meta.get("achieved", float("nan"))
        lines.append(f"budget: {meta['metric']} <= {meta['target']:.6g}; achieved {achieved:.6g}")
    text = "\n".join(lines)
    if not quiet:
        print(text, file=file if file is not None else sys.stdout)
    if png_path is not None:
        _bar_chart(rows, Path(png_path), title)
    return text


def _bar_chart(rows: list[dict[str, Any]], path: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in rows]
    xs = range(len(rows))
    fig, (ax_bits, ax_ops) = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(rows) + 2), 6.5), sharex=True)
    ax_bits.bar([x - 0.2 for x in xs], [r["weight_bits"] for r in rows], width=0.4, label="weight bits")
    ax_bits.bar([x + 0.2 for x in xs], [r["act_bits"] for r in rows], width=0.4, label="activation bits")
    ax_bits.set_ylabel("bits")
    ax_bits.set_ylim(0, 10.5)
    ax_bits.set_yticks(range(0, 9))
    ax_bits.legend(loc="upper center", ncol=2, fontsize=8)
    ax_ops.bar(list(xs), [(r["bitops"] or 0) / 1e6 for r in rows], color="tab:green")
    ax_ops.set_ylabel("MBitOPs / sample")
    ax_ops.set_xticks(list(xs))
    ax_ops.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    if title:
        ax_bits.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
