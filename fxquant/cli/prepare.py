"""``fxquant prepare``: model spec + config file -> prepared (calibrated) checkpoint.

    fxquant prepare --model fxquant.models:resnet_small --config quant.yaml -o prepared.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fxquant.api import prepare, quantized_layer_names
from fxquant.cli.common import (
    PipelineCommand,
    add_model_arguments,
    add_output_arguments,
    build_float_model,
    main_output,
    positive_int,
    shape,
    sibling,
)
from fxquant.config import QuantConfig
from fxquant.data.sources import DataSpec, data_location, open_data
from fxquant.errors import InputError
from fxquant.io.checkpoint import Checkpoint, save_checkpoint
from fxquant.io.config_file import load_config_file
from fxquant.io.run_report import RunReport
from fxquant.plan import BitwidthPlan

__all__ = ["COMMAND"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("quantization")
    group.add_argument("--config", type=Path, help="YAML/TOML/JSON file mirroring QuantConfig (default: its defaults)")
    group.add_argument("--plan", type=Path, help="BitwidthPlan JSON (from fxquant search); replaces the config's plan")
    group = parser.add_argument_group("calibration (initial quantizer ranges)")
    group.add_argument("--data", default="fashion-mnist", metavar="NAME|FOLDER",
                       help="calibrate on the first training batch of this data (default: fashion-mnist)")
    group.add_argument("--input-shape", type=shape, metavar="C,H,W",
                       help="calibrate on seeded random inputs of this shape instead of data")
    group.add_argument("--calibration-batch", type=positive_int, default=64, help="calibration batch size")
    group.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the calibration batch")
    add_output_arguments(parser, "prepared checkpoint to write")


def _config(args: argparse.Namespace, report: RunReport) -> QuantConfig:
    config = QuantConfig()
    if args.config is not None:
        config = load_config_file(args.config)
        report.add_input("config", args.config)
    if args.plan is not None:
        config = config.replace(plan=BitwidthPlan.load(args.plan))
        report.add_input("plan", args.plan)
    return config


def _calibration_batch(args: argparse.Namespace, channels: int | None, report: RunReport) -> torch.Tensor:
    if args.input_shape is not None:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randn((args.calibration_batch, *args.input_shape), generator=generator)
    spec = DataSpec(args.data, args.calibration_batch, args.calibration_batch, 1, args.seed, channels)
    train, _ = open_data(spec)
    location = data_location(spec)
    if location is not None:
        report.add_input("data", location, source=spec.source)
    return next(iter(train))[0]


def run(args: argparse.Namespace, report: RunReport) -> None:
    config = _config(args, report)
    spec, model = build_float_model(args, report, args.seed)
    x = _calibration_batch(args, spec.kwargs.get("in_channels"), report)
    with report.phase("prepare"):
        try:
            qmodel = prepare(model, (x,), config)
        except RuntimeError as exc:  # the calibration forward: the data does not fit the model
            raise InputError(f"calibration inputs of shape {tuple(x.shape)} do not fit {spec}: {exc}") from exc
    save_checkpoint(Checkpoint.from_prepared(qmodel, x.shape[1:], spec), args.output, force=args.force)
    report.add_output("checkpoint", args.output)
    bits = {
        name: [qmodel.get_submodule(name).weight_quant.bits, qmodel.get_submodule(name).input_quant.bits]
        for name in quantized_layer_names(qmodel)
    }
    report.settings.update(config=config.to_dict(), input_shape=list(x.shape[1:]), calibration_batch=len(x))
    report.metrics.update(quantized_layers=len(bits), bits=bits, parameters=sum(p.numel() for p in qmodel.parameters()))
    print(f"prepared {spec} with {len(bits)} quantized layers -> {args.output}")


COMMAND = PipelineCommand(
    name="prepare",
    add_arguments=add_arguments,
    run=run,
    outputs=lambda args: [main_output(args.output)],
    default_report=lambda args: sibling(args.output, ".report.json"),
    inputs=lambda args: [("--config", args.config), ("--plan", args.plan), ("--weights", args.weights)],
)
