"""``fxquant verify``: a converted model against the integer reference, on data; exit 1 when they disagree.

    fxquant verify reference.ckpt --reference trained.ckpt --test-subset 1000   # a saved torch reference
    fxquant verify --backend tvm-llvm --reference trained.ckpt                  # compile here and compare
    fxquant verify build/resnet --reference trained.ckpt                        # tvm-arm folder, under qemu
    fxquant verify --backend tvm-arm --reference trained.ckpt                   # build to a temp folder, emulate
    fxquant verify build/resnet --reference trained.ckpt --integrity-only       # files and hashes only

The reference is ``fxquant.convert(<--reference checkpoint>, backend="torch")``. The candidate is a
reference checkpoint (``fxquant convert --backend torch``), a prepared checkpoint (its eval mode), the
``--reference`` model compiled with ``--backend`` in this process, or an artifact folder. An aarch64 folder
runs under ``qemu-aarch64`` when the emulation cache of ``.ci/setup-arm`` is there (all batches in one
emulated process, with the native runner ``fxquant_run`` when it can be built); elsewhere
``--integrity-only`` checks its files against its manifest instead. In every case an artifact folder's
manifest must describe the ``--reference`` model (input shape, integer layers, their shapes, bits and
quantizer grids), so a folder built from another model or checkpoint is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from argparse import ArgumentParser, Namespace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.api import convert
from fxquant.backends.registry import available_backends
from fxquant.batching import join_batches, run_in_batches, split_batches
from fxquant.cli.common import (
    PipelineCommand,
    add_data_arguments,
    add_output_arguments,
    add_trust_arguments,
    model_trust,
    non_negative_float,
    sibling,
)
from fxquant.cli.convert import static_example
from fxquant.data.sources import DataSpec, data_location, open_data
from fxquant.errors import BackendError, CheckpointError
from fxquant.input_guard import InputGuard
from fxquant.integer import IntegerLayer
from fxquant.io.checkpoint import Checkpoint, read_checkpoint
from fxquant.io.model_spec import ModelTrust
from fxquant.io.run_report import RunReport
from fxquant.tools.verification import VerificationError, compare

__all__ = ["COMMAND", "CHECKPOINT_CANDIDATES", "RUNNER_CHOICES"]

Model = Callable[[torch.Tensor], torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
RUNNER_CHOICES = ("auto", "native", "python")

#: checkpoint kind -> the model it stands for (built only from specs the caller trusts)
CHECKPOINT_CANDIDATES: dict[str, Callable[[Checkpoint, ModelTrust], Model]] = {
    "reference": lambda c, trust: c.build_reference(trust),
    "prepared": lambda c, trust: InputGuard(c.build_prepared(trust=trust).eval(), c.input_shape),
}


class _StaticBatch:
    """Feeds a model compiled for ``batch`` samples with batches of any size (cut, zero-padded, joined)."""

    def __init__(self, model: Model, batch: int):
        self.model, self.batch = model, batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run_in_batches(lambda chunk: [self.model(chunk[0])], [x], [self.batch])[0]


class _Emulated:
    """An aarch64 artifact run under qemu on every test batch in one emulated process; outputs replay in order.
    Test batches are cut into the artifact's compiled batch sizes."""

    def __init__(self, path: Path, manifest: dict[str, Any], batches: Batches, runner: str):
        from fxquant.backends.tvm.emulate import run_batches_under_qemu

        sizes = manifest.get("batch_sizes") or [manifest["inputs"][0]["shape"][0]]
        pieces = [split_batches([x], sizes) for x, _ in batches]
        results = iter(run_batches_under_qemu(path, [[c[0].numpy()] for ps in pieces for c, _ in ps], runner))
        self._outputs: Iterator[torch.Tensor] = iter([
            join_batches([[torch.from_numpy(next(results)[0])] for _ in ps], [real for _, real in ps])[0]
            for ps in pieces
        ])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = next(self._outputs, None)
        if out is None or out.shape[0] != x.shape[0]:
            raise VerificationError("the emulated outputs do not line up with the test batches")
        return out


def _tvm_backend() -> Any:
    try:
        return importlib.import_module("fxquant.backends.tvm")
    except ImportError as exc:
        raise BackendError(f"cannot import the TVM backend to check these artifacts: {exc}") from exc


def _require_emulation(context: str) -> None:
    from fxquant.backends.tvm.emulate import emulation_missing

    missing = emulation_missing()
    if missing:
        raise BackendError(
            f"{context} this host cannot run the aarch64 artifact: emulation needs {'; '.join(missing)} "
            "(bash .ci/setup-arm); pass --integrity-only to accept the integrity check alone"
        )


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


ManifestCheck = Callable[[dict[str, Any], Path], None]


def _folder(path: Path, args: Namespace, batches: Batches, report: RunReport, check: ManifestCheck) -> Model | None:
    """An artifact folder: files checked against its manifest, the manifest against the reference (``check``),
    then run under qemu (or only checked)."""
    manifest = _tvm_backend().verify_artifact(path)
    check(manifest, path)
    report.metrics["artifact"] = {"backend": manifest.get("backend"), "files": manifest.get("files")}
    if args.integrity_only:
        return None
    _require_emulation(f"{path}: files match the manifest, but")
    from fxquant.backends.tvm.emulate import QEMU, default_runner

    runner = default_runner() if args.runner == "auto" else args.runner
    print(f"{path}: running the aarch64 artifact under {QEMU} ({runner} runner) on {len(batches)} batch(es)")
    report.metrics["emulation"] = {"emulator": QEMU, "runner": runner}
    return _Emulated(path, manifest, batches, runner)


def add_arguments(parser: ArgumentParser) -> None:
    candidate = parser.add_mutually_exclusive_group(required=True)
    candidate.add_argument("artifact", type=Path, nargs="?",
                           help="reference checkpoint, prepared checkpoint or artifact folder")
    candidate.add_argument("--backend", choices=available_backends(),
                           help="compile the --reference model with this backend here (tvm-arm: in a temporary "
                                "folder, run under qemu) and check it")
    parser.add_argument("--reference", type=Path, required=True, help="the prepared checkpoint it was converted from")
    parser.add_argument("--integrity-only", action="store_true",
                        help="artifact folders: check files and hashes only (hosts without aarch64 emulation)")
    parser.add_argument("--runner", choices=RUNNER_CHOICES, default="auto",
                        help="aarch64 under qemu: the native fxquant_run (seconds) or run_model.py (a minute to "
                             "start); auto: native when it can be built here")
    add_data_arguments(parser, train=False, test=True, batch_default=64)
    group = parser.add_argument_group("tolerances")
    group.add_argument("--atol", type=non_negative_float, default=1e-4, help="largest allowed |output difference|")
    group.add_argument("--min-agreement", type=non_negative_float, default=1.0,
                       help="smallest allowed fraction of equal top-1 predictions (default 1.0: all)")
    add_trust_arguments(parser)
    add_output_arguments(parser, None)


def _candidate(args: Namespace, checkpoint: Checkpoint, prepared: torch.fx.GraphModule, batches: Batches,
               report: RunReport, scratch: contextlib.ExitStack, check: ManifestCheck) -> Model | None:
    if args.backend == "tvm-arm":  # an artifact folder like `fxquant convert` writes, thrown away afterwards
        if not args.integrity_only:  # fail before a build that could not run
            _require_emulation("--backend tvm-arm:")
        folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="fxquant-verify-"))) / "artifact"
        convert(prepared, backend="tvm-arm", output_dir=folder,
                example_inputs=static_example(checkpoint, args.batch_size))
        return _folder(folder, args, batches, report, check)
    if args.backend is not None:
        built = convert(prepared, backend=args.backend, example_inputs=static_example(checkpoint, args.batch_size))
        return _StaticBatch(built, args.batch_size)
    report.add_input("artifact", args.artifact)
    if args.artifact.is_dir():
        return _folder(args.artifact, args, batches, report, check)
    artifact = read_checkpoint(args.artifact)
    return CHECKPOINT_CANDIDATES[artifact.kind](artifact, model_trust(args))


def run(args: Namespace, report: RunReport) -> None:
    checkpoint = read_checkpoint(args.reference)
    report.add_input("reference", args.reference)
    prepared = checkpoint.build_prepared(trust=model_trust(args))
    frozen = convert(prepared, backend="torch")
    reference = InputGuard(frozen, checkpoint.input_shape)

    def check(manifest: dict[str, Any], path: Path) -> None:
        check_manifest_matches(manifest, frozen, checkpoint.input_shape, path, args.reference)

    data = DataSpec(args.data, args.batch_size, None, args.test_subset, args.seed, checkpoint.input_shape[0])
    report.settings.update(data=data.to_dict(), atol=args.atol, min_agreement=args.min_agreement)
    with contextlib.ExitStack() as scratch:
        batches: Batches = []
        folder = args.backend == "tvm-arm" or (args.artifact is not None and args.artifact.is_dir())
        if not (args.integrity_only and folder):
            _, test = open_data(data)
            if (location := data_location(data)) is not None:
                report.add_input("data", location, source=data.source)
            batches = list(test)  # the same batches, in the same order, for both models
        with report.phase("load"):
            candidate = _candidate(args, checkpoint, prepared, batches, report, scratch, check)
        if candidate is None:
            print(f"{args.artifact or args.backend}: files and hashes match its manifest (numerics not checked)")
            return
        with report.phase("compare"):
            agreement = compare(reference, candidate, batches)
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
