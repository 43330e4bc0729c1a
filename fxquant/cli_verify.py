"""``fxquant verify``: a converted model against the integer reference, on data; exit 1 when they disagree.

    fxquant verify reference.ckpt --reference trained.ckpt --test-subset 1000   # a saved torch reference
    fxquant verify --backend tvm-llvm --reference trained.ckpt                  # compile here and compare
    fxquant verify build/resnet --reference trained.ckpt --integrity-only       # tvm-arm folder: files, hashes

The reference is ``fxquant.convert(<--reference checkpoint>, backend="torch")``. The candidate is a
reference checkpoint (``fxquant convert --backend torch``), a prepared checkpoint (its eval mode), the
``--reference`` model compiled with ``--backend`` in this process, or an artifact folder. An aarch64 folder
cannot run on this host: ``--integrity-only`` checks its files against its manifest instead; in every case
an artifact folder's manifest must describe the ``--reference`` model (input shape, integer layers, their
shapes, bits and quantizer grids), so a folder built from another model or checkpoint is refused.
"""

from __future__ import annotations

import importlib
from argparse import ArgumentParser, Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.api import convert
from fxquant.backends.registry import available_backends
from fxquant.checkpoint import Checkpoint, read_checkpoint
from fxquant.cli_common import (
    PipelineCommand,
    add_data_arguments,
    add_output_arguments,
    non_negative_float,
    sibling,
)
from fxquant.cli_convert import static_example
from fxquant.data_source import DataSpec, data_location, open_data
from fxquant.errors import BackendError, CheckpointError
from fxquant.input_guard import InputGuard
from fxquant.integer import IntegerLayer
from fxquant.report import RunReport
from fxquant.verification import compare

__all__ = ["COMMAND", "CHECKPOINT_CANDIDATES"]

Model = Callable[[torch.Tensor], torch.Tensor]

#: checkpoint kind -> the model it stands for
CHECKPOINT_CANDIDATES: dict[str, Callable[[Checkpoint], Model]] = {
    "reference": lambda c: c.build_reference(),
    "prepared": lambda c: InputGuard(c.build_prepared().eval(), c.input_shape),
}


class _StaticBatch:
    """Feeds a model compiled for ``batch`` samples with smaller last batches (zero-padded, then cut)."""

    def __init__(self, model: Model, batch: int):
        self.model, self.batch = model, batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == self.batch:
            return self.model(x)
        padded = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
        return self.model(padded)[:n]


#: per-layer manifest facts (:meth:`IntegerLayer.describe`) that fix the architecture, and those that fix the values
_STRUCTURE_FACTS = ("kind", "weight_shape", "weight_bits", "act_bits", "weight_encoding")
_VALUE_FACTS = ("input_low", "input_step", "weight_scale")


def check_manifest_matches(manifest: dict[str, Any], reference: nn.Module, input_shape: tuple[int, ...],
                           path: Path, reference_path: Path) -> None:
    """Fail unless the artifact's manifest describes ``reference``: one input of ``input_shape``, the same
    integer layers with the same shapes and bits (else: another model), the same input grids and weight
    scales (else: another checkpoint of that model)."""
    inputs = manifest.get("inputs")
    built_for = inputs[0].get("shape", [])[1:] if isinstance(inputs, list) and inputs else None
    if built_for != list(input_shape):
        raise CheckpointError(f"{path} was built for inputs of shape {built_for}, --reference {reference_path} "
                              f"is for {list(input_shape)}: the artifact was converted from another model")
    layers = {layer.get("name"): layer for layer in manifest.get("layers", []) if "weight_bits" in layer}
    expected = {m.name: {**m.describe(), "weight_scale": [float(v) for v in m.weight_scale.tolist()]}
                for m in reference.modules() if isinstance(m, IntegerLayer)}
    if set(layers) != set(expected):
        only_artifact, only_reference = sorted(set(layers) - set(expected)), sorted(set(expected) - set(layers))
        raise CheckpointError(
            f"{path} does not have the integer layers of --reference {reference_path} (only in the artifact: "
            f"{only_artifact[:3] or 'none'}, only in the reference: {only_reference[:3] or 'none'}): "
            "the artifact was converted from another model"
        )
    for keys, origin in ((_STRUCTURE_FACTS, "model"), (_VALUE_FACTS, "checkpoint")):
        for name, facts in expected.items():
            for key in keys:
                if layers[name].get(key) != facts[key]:
                    shown = "differ" if key == "weight_scale" else (
                        f"artifact {layers[name].get(key)!r}, reference {facts[key]!r}")
                    raise CheckpointError(f"{path}: layer {name} has another {key} than in --reference "
                                          f"{reference_path} ({shown}): the artifact was converted from another "
                                          f"{origin}")


def _folder(path: Path, report: RunReport, check: Callable[[dict[str, Any]], None]) -> Model | None:
    """An artifact folder: its files are checked against its manifest, the manifest against the reference
    (``check``); it runs where the backend can load it."""
    try:
        tvm_backend = importlib.import_module("fxquant.backends.tvm")
    except ImportError as exc:
        raise BackendError(f"{path}: cannot import the TVM backend to check these artifacts: {exc}") from exc
    manifest = tvm_backend.verify_artifact(path)
    check(manifest)
    report.metrics["artifact"] = {"backend": manifest.get("backend"), "files": manifest.get("files")}
    load = getattr(tvm_backend, "load_artifact", None)
    if load is not None:
        return load(path)
    return None


def add_arguments(parser: ArgumentParser) -> None:
    candidate = parser.add_mutually_exclusive_group(required=True)
    candidate.add_argument("artifact", type=Path, nargs="?",
                           help="reference checkpoint, prepared checkpoint or artifact folder")
    candidate.add_argument("--backend", choices=available_backends(),
                           help="compile the --reference model with this backend here and check it")
    parser.add_argument("--reference", type=Path, required=True, help="the prepared checkpoint it was converted from")
    parser.add_argument("--integrity-only", action="store_true",
                        help="artifact folders: check files and hashes only (aarch64 builds cannot run here)")
    add_data_arguments(parser, train=False, test=True, batch_default=64)
    group = parser.add_argument_group("tolerances")
    group.add_argument("--atol", type=non_negative_float, default=1e-4, help="largest allowed |output difference|")
    group.add_argument("--min-agreement", type=non_negative_float, default=1.0,
                       help="smallest allowed fraction of equal top-1 predictions (default 1.0: all)")
    add_output_arguments(parser, None)


def run(args: Namespace, report: RunReport) -> None:
    checkpoint = read_checkpoint(args.reference)
    report.add_input("reference", args.reference)
    prepared = checkpoint.build_prepared()
    frozen = convert(prepared, backend="torch")
    reference = InputGuard(frozen, checkpoint.input_shape)
    with report.phase("load"):
        if args.backend is not None:
            built = convert(prepared, backend=args.backend, example_inputs=static_example(checkpoint, args.batch_size))
            candidate = _StaticBatch(built, args.batch_size)
        elif args.artifact.is_dir():
            report.add_input("artifact", args.artifact)
            candidate = _folder(args.artifact, report, lambda manifest: check_manifest_matches(
                manifest, frozen, checkpoint.input_shape, args.artifact, args.reference))
            if candidate is None and not args.integrity_only:
                raise BackendError(f"{args.artifact}: files match the manifest, but this host cannot run the artifact "
                                   "(aarch64); pass --integrity-only to accept the integrity check alone")
        else:
            report.add_input("artifact", args.artifact)
            artifact = read_checkpoint(args.artifact)
            candidate = CHECKPOINT_CANDIDATES[artifact.kind](artifact)
    if candidate is None:
        print(f"{args.artifact}: files and hashes match its manifest (numerics not checked)")
        return
    data = DataSpec(args.data, args.batch_size, None, args.test_subset, args.seed, checkpoint.input_shape[0])
    _, test = open_data(data)
    if (location := data_location(data)) is not None:
        report.add_input("data", location, source=data.source)
    report.settings.update(data=data.to_dict(), atol=args.atol, min_agreement=args.min_agreement)
    with report.phase("compare"):
        agreement = compare(reference, candidate, test)
    report.metrics.update(agreement.to_dict())
    print(f"{agreement.samples} samples: max abs diff {agreement.max_abs_diff:.3g}, "
          f"top-1 agreement {agreement.top1_agreement:.2%}, accuracy {agreement.candidate_accuracy:.2f}% "
          f"(reference {agreement.reference_accuracy:.2f}%)")
    agreement.check(args.atol, min(args.min_agreement, 1.0))


def _default_report(args: Namespace) -> Path:
    if args.artifact is not None:
        return sibling(args.artifact, ".verify.report.json")
    return sibling(args.reference, f".verify-{args.backend}.report.json")


COMMAND = PipelineCommand(
    name="verify",
    add_arguments=add_arguments,
    run=run,
    outputs=lambda args: [],
    default_report=_default_report,
    inputs=lambda args: [("artifact", args.artifact), ("--reference", args.reference)],
)
