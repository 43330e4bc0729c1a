"""``fxquant convert``: prepared checkpoint -> hard-quantized model for a backend.

    fxquant convert trained.ckpt --backend torch -o reference.ckpt          # integer reference, a checkpoint
    fxquant convert trained.ckpt --backend tvm-arm -o build/resnet          # aarch64 artifact folder
    fxquant convert trained.ckpt --backend tvm-llvm -o build/host.json      # compile for this CPU: its manifest
    fxquant convert trained.ckpt --backend tvm-arm --cpu cortex-a76 --kernel "layer4.*=dot" -o build/a76

The ``torch`` reference is stored as a ``kind="reference"`` checkpoint (no TorchScript): loading it rebuilds
the model from its spec, freezes it and checks the result against the stored integer state, and the
returned module checks its input shape (:func:`fxquant.load_reference`). ``tvm-arm`` writes the backend's
artifact folder (``model.so``, ``manifest.json``, ``run_model.py``). ``tvm-llvm`` builds an in-process
module that cannot be saved: the command compiles it (proving the model lowers) and writes its manifest
(kernel per layer); ``fxquant verify --backend tvm-llvm`` compiles and checks its numerics.
TVM models are compiled for a static batch size (``--batch-size``, default 1).
"""

from __future__ import annotations

import json
from argparse import ArgumentParser, ArgumentTypeError, Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx

from fxquant.api import convert
from fxquant.backends.registry import available_backends
from fxquant.batching import check_batch_sizes
from fxquant.cli.common import (
    Output,
    PipelineCommand,
    add_output_arguments,
    add_trust_arguments,
    main_output,
    model_trust,
    positive_int,
    sibling,
)
from fxquant.errors import CheckpointError, ConfigError
from fxquant.integer import IntegerLayer
from fxquant.io.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from fxquant.io.output_files import write_text_atomic
from fxquant.io.run_report import RunReport, jsonable

__all__ = ["COMMAND", "WRITERS", "static_example", "parse_kernel", "tvm_options"]


def static_example(checkpoint: Checkpoint, batch_size: int) -> tuple[torch.Tensor]:
    """The input a static-shape backend is compiled for."""
    return (torch.zeros(batch_size, *checkpoint.input_shape),)


def batch_sizes_arg(text: str) -> tuple[int, ...]:
    """``--batch-size 8`` (one static size) or ``--batch-size 1,8`` (one compiled function per size)."""
    try:
        sizes = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ArgumentTypeError(f"expected a positive integer or a list such as 1,8, got {text!r}") from None
    try:
        return check_batch_sizes(sizes, "--batch-size")
    except ConfigError as exc:
        raise ArgumentTypeError(str(exc)) from None


def _reference(args: Namespace, checkpoint: Checkpoint, model: fx.GraphModule, report: RunReport) -> None:
    frozen = convert(model, backend="torch")
    save_checkpoint(checkpoint.to_reference(frozen), args.output, force=args.force)
    report.add_output("reference", args.output)
    report.metrics["layers"] = [m.describe() for m in frozen.modules() if isinstance(m, IntegerLayer)]


def parse_kernel(text: str) -> str | dict[str, str]:
    """``--kernel dot`` (every layer) or ``--kernel "layer4.*=dot,conv1=direct"`` (by layer name or glob)."""
    if "=" not in text:
        return text
    table: dict[str, str] = {}
    for item in text.split(","):
        key, sep, kind = item.partition("=")
        if not sep or not key.strip() or not kind.strip():
            raise ConfigError(f"--kernel {text!r}: expected FAMILY or LAYER=FAMILY[,LAYER=FAMILY...], got {item!r}")
        table[key.strip()] = kind.strip()
    return table


def tvm_options(args: Namespace) -> dict[str, Any]:
    """The TVM backend options the user gave (validated by the backend itself)."""
    given = {"kernel": args.kernel, "cost_model": args.cost_model, "num_threads": args.num_threads, "cpu": args.cpu,
             "batch_sizes": args.batch_size if len(args.batch_size) > 1 else None}
    options = {k: v for k, v in given.items() if v is not None}
    if options and not args.backend.startswith("tvm"):
        flags = ", ".join("--" + k.replace("_", "-").replace("batch-sizes", "batch-size") for k in options)
        raise ConfigError(f"{flags}: only for the TVM backends, not --backend {args.backend}")
    if "kernel" in options:
        options["kernel"] = parse_kernel(options["kernel"])
    return options


def _host_manifest(args: Namespace, checkpoint: Checkpoint, model: fx.GraphModule, report: RunReport) -> None:
    module = convert(model, backend=args.backend, example_inputs=static_example(checkpoint, args.batch_size[0]),
                     **tvm_options(args))
    write_text_atomic(args.output, json.dumps(jsonable(module.manifest), indent=2, sort_keys=True) + "\n")
    report.add_output("manifest", args.output)
    report.metrics["kernel_counts"] = module.manifest.get("kernel_counts")


def _artifact_folder(args: Namespace, checkpoint: Checkpoint, model: fx.GraphModule, report: RunReport) -> None:
    artifact = convert(model, backend=args.backend, output_dir=args.output, force=args.force,
                       example_inputs=static_example(checkpoint, args.batch_size[0]), **tvm_options(args))
    report.add_output("artifacts", args.output)
    report.metrics["kernel_counts"] = getattr(artifact, "manifest", {}).get("kernel_counts")


#: backend -> how its result is written; any other backend writes an artifact folder (``output_dir``)
WRITERS: dict[str, Callable[[Namespace, Checkpoint, fx.GraphModule, RunReport], None]] = {
    "torch": _reference,
    "tvm-llvm": _host_manifest,
}


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="prepared checkpoint (from fxquant prepare or fxquant train)")
    parser.add_argument("--backend", default="torch", choices=available_backends(),
                        help="torch: reference checkpoint; tvm-arm: artifact folder; tvm-llvm: build manifest")
    parser.add_argument("--batch-size", type=batch_sizes_arg, default=(1,),
                        help="TVM: static batch size, or sizes such as 1,8 (one function each; other batches run "
                             "in pieces of those)")
    parser.add_argument("--kernel", default=None,
                        help="TVM: kernel family for every layer (auto, bitserial, dot, direct) or LAYER=FAMILY,...")
    parser.add_argument("--cost-model", default=None, choices=("measure", "model"),
                        help="TVM: how auto ranks kernels (tvm-llvm default measure; tvm-arm always model)")
    parser.add_argument("--num-threads", type=positive_int, default=None, help="tvm-llvm: thread pool size")
    parser.add_argument("--cpu", default=None, help="tvm-arm: the core to generate code for (e.g. cortex-a76)")
    add_trust_arguments(parser)
    add_output_arguments(parser, "reference checkpoint (torch), artifact folder (tvm-arm) or manifest (tvm-llvm)")


def run(args: Namespace, report: RunReport) -> None:
    tvm_options(args)  # a bad option fails before the checkpoint is read
    checkpoint = read_checkpoint(args.checkpoint)
    report.add_input("checkpoint", args.checkpoint)
    if checkpoint.kind != "prepared":
        raise CheckpointError(f"{args.checkpoint} is a {checkpoint.kind} checkpoint; convert the prepared one")
    model = checkpoint.build_prepared(trust=model_trust(args))
    report.settings.update(backend=args.backend, input_shape=list(checkpoint.input_shape),
                           config=checkpoint.config.to_dict())
    with report.phase("convert"):
        WRITERS.get(args.backend, _artifact_folder)(args, checkpoint, model, report)
    print(f"converted {args.checkpoint} for backend {args.backend} -> {args.output}")


def _artifact_owner(folder: Path) -> str | None:
    """Why ``folder`` is not an artifact folder fxquant wrote (None when it is): ``--force`` replaces only those."""
    from fxquant.backends.tvm.artifact import artifact_owner

    return artifact_owner(folder)


def _outputs(args: Namespace) -> list[Output]:
    if args.backend in WRITERS:
        return [main_output(args.output)]
    return [main_output(args.output, folder=True, owned=_artifact_owner)]


COMMAND = PipelineCommand(
    name="convert",
    add_arguments=add_arguments,
    run=run,
    outputs=_outputs,
    default_report=lambda args: sibling(args.output, ".report.json"),
    inputs=lambda args: [("checkpoint", args.checkpoint)],
)
