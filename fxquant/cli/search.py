"""``fxquant search``: per-layer bitwidths under a budget (the SDQ search) -> BitwidthPlan JSON.

    fxquant search --model fxquant.models:resnet_small --budget avg_bits=3 -o plan.json --weights-out searched.pt
    fxquant prepare --model fxquant.models:resnet_small --weights searched.pt --plan plan.json -o prepared.ckpt

``--budget KEY=VALUE`` pairs become ``fxquant.Budget.from_dict({KEY: VALUE, ...})`` (values parsed as JSON
when they can be), e.g. ``--budget avg_weight_bits=3 --budget min_bits=2``. A latency budget names its target
and cost model with ``--target`` and ``--cost-model`` (the same as ``--budget target=...``)::

    fxquant search --model fxquant.models:resnet_small --budget latency_ms=0.5 --target cortex-a72 -o plan.json
 A budget no plan can meet fails
before any training, naming the lowest achievable cost. ``--config`` gives the base quantizer and the fixed
layers (first/last bits, overrides). The search itself is :func:`fxquant.search`; where this installation
lacks it, the command exits 1 and says so. ``--weights-out`` saves the float weights the search trained (a
state dict, like ``--weights``), so that the training at the plan's bits continues from them.
``--device``/``--amp`` as for ``fxquant train``; ``torchrun --nproc-per-node N -m fxquant search ...`` searches
data-parallel (``--batch-size`` is the global batch) and rank 0 writes the plan and the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import fxquant
from fxquant.cli.common import (
    Output,
    PipelineCommand,
    add_data_arguments,
    add_model_arguments,
    add_output_arguments,
    add_placement_arguments,
    build_float_model,
    main_output,
    placement_from_args,
    positive_int,
    progress_enabled,
    sibling,
)
from fxquant.config import QuantConfig
from fxquant.data.sources import DataSpec, data_location, open_data
from fxquant.io.config_file import load_config_file
from fxquant.io.output_files import torch_save_atomic, write_text_atomic
from fxquant.io.run_report import RunReport
from fxquant.placement import process_group

__all__ = ["COMMAND"]


def budget_item(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. avg_weight_bits=3), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--config", type=Path, help="YAML/TOML/JSON QuantConfig: base quantizer and fixed layers")
    add_data_arguments(parser, train=True, test=False, batch_default=64)
    parser.add_argument("--budget", type=budget_item, action="append", required=True, metavar="KEY=VALUE",
                        help="a field of fxquant.Budget, e.g. avg_weight_bits=3 (repeat for several)")
    parser.add_argument("--target", metavar="NAME",
                        help="latency_ms budgets: 'host' (default) or a named aarch64 core, e.g. cortex-a76")
    parser.add_argument("--cost-model", choices=("measure", "model"),
                        help="latency_ms budgets on the host: time the kernels (measure, default) or model them")
    parser.add_argument("--steps", type=positive_int, help="search steps (default: one pass over the data)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")
    parser.add_argument("--weights-out", type=Path, metavar="PATH",
                        help="also write the float weights the search trained (torch state dict, for --weights)")
    add_placement_arguments(parser)
    add_output_arguments(parser, "BitwidthPlan JSON to write")


def run(args: argparse.Namespace, report: RunReport) -> None:
    seed = 0 if args.seed is None else args.seed
    fields = dict(args.budget)
    for key, value in (("target", args.target), ("cost_model", args.cost_model)):
        if value is not None:
            fields[key] = value
    budget = fxquant.Budget.from_dict(fields)
    config = QuantConfig()
    if args.config is not None:
        config = load_config_file(args.config)
        report.add_input("config", args.config)
    spec, model = build_float_model(args, report, seed)
    data = DataSpec(args.data or "fashion-mnist", args.batch_size, args.train_subset, 1, seed,
                    spec.kwargs.get("in_channels"))
    train, _ = open_data(data)
    if (location := data_location(data)) is not None:
        report.add_input("data", location, source=data.source)
    example = next(iter(train))[0]
    options = fxquant.SearchOptions(steps=args.steps, seed=seed)
    report.settings.update(budget=budget.to_dict(), config=config.to_dict(), options=options.to_dict())
    with report.phase("search"), process_group(placement_from_args(args)) as placement:
        plan = fxquant.search(model, (example,), train, budget=budget, config=config, options=options,
                              progress=progress_enabled(args) and placement.writes_files,
                              update_weights=args.weights_out is not None, placement=placement)
    report.settings.update(placement={"device": str(placement.device), "amp": placement.amp,
                                      "processes": placement.world_size})
    if not placement.writes_files:
        return
    write_text_atomic(args.output, json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
    report.add_output("plan", args.output)
    if args.weights_out is not None:
        torch_save_atomic(args.weights_out, {k: v.cpu() for k, v in model.state_dict().items()})
        report.add_output("weights", args.weights_out)
    report.settings.update(data=data.to_dict())
    report.metrics.update(bits={k: list(v) for k, v in plan.bits.items()},
                          achieved=plan.metadata.get("achieved"), metric=plan.metadata.get("metric"))
    if "latency" in plan.metadata:
        report.metrics.update(latency={k: v for k, v in plan.metadata["latency"].items() if k != "ladders"})
    print(f"plan for {len(plan.bits)} layers -> {args.output}")


COMMAND = PipelineCommand(
    name="search",
    add_arguments=add_arguments,
    run=run,
    outputs=lambda args: [main_output(args.output)]
    + ([Output(args.weights_out, "--weights-out")] if args.weights_out is not None else []),
    default_report=lambda args: sibling(args.output, ".report.json"),
    inputs=lambda args: [("--config", args.config), ("--weights", args.weights)],
)
