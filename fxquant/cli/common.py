"""What the pipeline subcommands share: argument groups, argument types, and the wrapper that gives every run
its JSON report, its output checks and its exit status (0 ok, 1 fxquant error, 2 usage via argparse).

Before any work the wrapper takes a lock per output (a second run on the same output fails at once),
recovers interrupted folder replacements, removes temporaries of killed runs and checks every output
(:func:`fxquant.io.output_files.check_outputs`): collisions with each other or with an input, folders where
files go, unwritable folders, existing outputs without ``--force``. The report is published with the
outputs under the same lock, and a failed run never replaces the report of a successful one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.errors import CheckpointError, FxQuantError
from fxquant.io.checkpoint import describe_mismatch
from fxquant.io.model_spec import TRUSTED_MODELS_ENV, ModelSpec, ModelTrust
from fxquant.io.output_files import Output, check_outputs, clean_stale_temps, output_lock, recover_folder
from fxquant.io.run_report import REPORT_FORMAT, RunReport
from fxquant.placement import AMP_DTYPES, DEVICE_CHOICES, Placement, init_distributed, resolve_device

__all__ = [
    "PipelineCommand",
    "Output",
    "main_output",
    "positive_int",
    "non_negative_float",
    "json_object",
    "shape",
    "add_model_arguments",
    "add_output_arguments",
    "add_data_arguments",
    "add_trust_arguments",
    "model_trust",
    "model_spec_from_args",
    "build_float_model",
    "progress_enabled",
    "sibling",
]

Handler = Callable[[argparse.Namespace], int]


# -- argument types (argparse turns their errors into usage errors, exit status 2) --------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 10}}', got {text!r}")
    return value


def shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``: one sample's shape, without the batch dimension."""
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated dimensions like 1,28,28, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions like 1,28,28, got {text!r}")
    return dims


# -- argument groups ----------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                       help="model builder, e.g. fxquant.models:resnet_small, mypkg.nets:build, torchvision:resnet18")
    group.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                       help='keyword arguments of the builder, e.g. \'{"num_classes": 10}\'')
    group.add_argument("--num-classes", type=positive_int, help="shorthand for model kwarg num_classes")
    group.add_argument("--in-channels", type=positive_int, help="shorthand for model kwarg in_channels")
    group.add_argument("--weights", type=Path, help="float state dict to start from (torch.save(model.state_dict()))")


def add_output_arguments(parser: argparse.ArgumentParser, output_help: str | None) -> None:
    """``-o/--output`` (unless ``output_help`` is None), ``--force`` and ``--report``."""
    group = parser.add_argument_group("outputs")
    if output_help is not None:
        group.add_argument("-o", "--output", type=Path, required=True, help=output_help)
    group.add_argument("--force", action="store_true", help="overwrite existing outputs")
    group.add_argument("--report", type=Path, help="JSON report of the run (default: next to the main output)")


def add_data_arguments(parser: argparse.ArgumentParser, train: bool, test: bool, batch_default: int | None) -> None:
    """Data options; with ``train``, ``--data`` and ``--seed`` default to None so a command can tell them given."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None if train else "fashion-mnist", metavar="NAME|FOLDER",
                       help="fashion-mnist (bundled) or an ImageFolder directory (default: fashion-mnist)")
    group.add_argument("--batch-size", type=positive_int, default=batch_default,
                       help="samples per batch" + (f" (default {batch_default})" if batch_default else ""))
    if train:
        group.add_argument("--train-subset", type=positive_int, help="train on a seeded random subset of N images")
    if test:
        group.add_argument("--test-subset", type=positive_int, help="evaluate on a seeded random subset of N images")
    group.add_argument("--seed", type=int, default=None if train else 0, help="seed of weights, subsets and shuffling")


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    """Whether the model spec a checkpoint names may be imported and called (see ``ModelTrust``)."""
    group = parser.add_argument_group("model code")
    group.add_argument("--trust-model-code", action="store_true",
                       help="import and call whatever model spec the checkpoint names (only for your own files)")
    group.add_argument("--trust-model", action="append", default=[], metavar="PATTERN",
                       help=f"trust specs matching PATTERN, e.g. 'mypkg.nets:*' (repeatable; also "
                            f"${TRUSTED_MODELS_ENV}, comma-separated; fxquant.models and torchvision are trusted)")


def model_trust(args: argparse.Namespace) -> ModelTrust:
    return ModelTrust(args.trust_model_code, tuple(args.trust_model))


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--amp`` of a training stage (torchrun adds the processes, see fxquant.placement)."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", metavar="DEVICE",
                       help=f"{DEVICE_CHOICES} (default auto: the first GPU if there is one); under torchrun "
                            "a bare 'cuda' is each process's LOCAL_RANK GPU")
    group.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None,
                       help="mixed precision for conv/linear layers; quantizers stay float32")


def placement_from_args(args: argparse.Namespace) -> Placement:
    """This process's placement; joins the torchrun process group when there is one."""
    return init_distributed(resolve_device(args.device), args.amp)


def writes_files() -> bool:
    """Whether this process writes outputs and reports: the only one, or rank 0 under torchrun."""
    return os.environ.get("RANK", "0") == "0"


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress``/``--no-progress``, else progress bars only when stderr is a terminal."""
    return args.progress if args.progress is not None else sys.stderr.isatty()


# -- models -------------------------------------------------------------------------------------------------


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    kwargs = dict(args.model_kwargs)
    for option in ("num_classes", "in_channels"):
        if getattr(args, option) is not None:
            kwargs[option] = getattr(args, option)
    return ModelSpec(args.model, kwargs)


def build_float_model(args: argparse.Namespace, report: RunReport, seed: int) -> tuple[ModelSpec, nn.Module]:
    """The float model of ``--model`` (seeded), with ``--weights`` loaded when given."""
    spec = model_spec_from_args(args)
    torch.manual_seed(seed)
    model = spec.build()
    report.settings["model"] = spec.to_dict()
    if args.weights is not None:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling raises many types
            raise CheckpointError(
                f"cannot load float weights {args.weights} (expected torch.save(model.state_dict())): {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{args.weights} holds a {type(state).__name__}, not a state dict")
        mismatch = describe_mismatch(model.state_dict(), state)
        if mismatch:
            raise CheckpointError(f"float weights {args.weights} do not fit {spec}: {mismatch}")
        model.load_state_dict(state)
        report.add_input("weights", args.weights)
    return spec, model


# -- the wrapper --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineCommand:
    """A subcommand as data: its arguments, its body, the paths it reads and writes, and where its report goes.

    ``run(args, report)`` does the work and fills the report; raising a :class:`FxQuantError` makes the run
    exit 1 with the report still written (with the error in it). ``outputs`` and ``inputs`` name every path
    the run writes and reads, with the option that names it, so that collisions are refused before the work.
    """

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, RunReport], None]
    outputs: Callable[[argparse.Namespace], Sequence[Output]]
    default_report: Callable[[argparse.Namespace], Path]
    inputs: Callable[[argparse.Namespace], Sequence[tuple[str, Path]]] = lambda args: ()

    def setup(self, parser: argparse.ArgumentParser) -> Handler:
        self.add_arguments(parser)
        return self.handle

    def handle(self, args: argparse.Namespace) -> int:
        arguments = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
        report = RunReport(self.name, arguments)
        report_path = args.report if args.report is not None else self.default_report(args)
        if not writes_files():  # other torchrun ranks: rank 0 checks, locks and writes the outputs and the report
            self.run(args, report)
            return 0
        outputs = list(self.outputs(args))
        inputs = [(role, path) for role, path in self.inputs(args) if path is not None]
        report_output = Output(report_path, "--report" if args.report is not None else "report")
        with output_lock([o.path for o in outputs] + [report_path]):
            for output in outputs + [report_output]:
                recover_folder(output.path)
                clean_stale_temps(output.path)
            # the command's own earlier report is rewritten by a rerun; any other file there needs --force
            rewritable = [report_path] if _report_of(report_path, self.name) is not None else []
            try:
                check_outputs(outputs + [report_output], inputs, args.force, rewritable)
            except FxQuantError as exc:
                report.fail(exc)
                _write_failure(report, report_path, outputs, inputs)
                raise
            try:
                self.run(args, report)
            except (Exception, KeyboardInterrupt) as exc:  # fxquant errors exit 1, bugs keep their traceback
                report.fail(exc, 130 if isinstance(exc, KeyboardInterrupt) else 1)
                _write_failure(report, report_path, outputs, inputs)
                raise
            report.exit_status = 0
            report.write(report_path)
        return 0


def _report_of(path: Path, command: str) -> dict[str, Any] | None:
    """The report at ``path`` when it is an fxquant report of ``command``, else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("format") == REPORT_FORMAT and data.get("command") == command:
        return data
    return None


def _write_failure(
    report: RunReport, path: Path, outputs: Sequence[Output], inputs: Sequence[tuple[str, Path]]
) -> None:
    """Write a failed run's report where that loses nothing: never over an output, an input, a foreign file
    or the report of a successful run (a retry may replace a failed run's report)."""
    target = Path(path).resolve()
    if any(target == Path(p).resolve() for p in [o.path for o in outputs] + [p for _, p in inputs]):
        return
    if os.path.lexists(path):
        earlier = _report_of(path, report.command)
        if earlier is None or earlier.get("exit_status") in (0, None):
            return
    try:
        report.write(path)
    except FxQuantError:
        pass  # the error that ended the run is the one to show; the report folder may be what failed


def main_output(path: Path, folder: bool = False, owned: Callable[[Path], str | None] | None = None) -> Output:
    """The ``-o/--output`` of a command."""
    return Output(path, "-o", folder, owned)


def sibling(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended to its full name (``a.ckpt`` -> ``a.ckpt.report.json``; ``.`` names
    the current folder by its absolute path)."""
    path = path if path.name else Path(os.path.abspath(path))
    return path.with_name(path.name + suffix)

