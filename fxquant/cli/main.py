"""The ``fxquant`` command: subcommands a pipeline calls; exit code 0 on success, 1 with a one-line
reason on a fxquant error, 2 on bad usage."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from fxquant.errors import FxQuantError

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace], int]


def _demo(parser: argparse.ArgumentParser) -> Handler:
    from fxquant.cli import demo

    demo.add_arguments(parser)
    return demo.main


def _pipeline(module: str) -> Callable[[argparse.ArgumentParser], Handler]:
    """A pipeline stage: its module's ``COMMAND`` (a :class:`fxquant.cli.common.PipelineCommand`)."""

    def setup(parser: argparse.ArgumentParser) -> Handler:
        return importlib.import_module(module).COMMAND.setup(parser)

    return setup


#: subcommand name -> (help, function that adds its arguments and returns its handler)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "demo": ("train a ResNet on Fashion-MNIST, quantize it with DSQ W4A4 and check the integer reference", _demo),
    "prepare": ("build a model from MODULE:FUNCTION, quantize it per a config file, write a checkpoint",
                _pipeline("fxquant.cli.prepare")),
    "train": ("QAT-train a prepared checkpoint (resumable)", _pipeline("fxquant.cli.train")),
    "search": ("search per-layer bitwidths under a budget (SDQ); write a BitwidthPlan",
               _pipeline("fxquant.cli.search")),
    "convert": ("hard-quantize a checkpoint for a backend (torch reference or TVM artifacts)",
                _pipeline("fxquant.cli.convert")),
    "verify": ("compare a converted model with the integer reference on data", _pipeline("fxquant.cli.verify")),
    "inspect": ("per-layer bits, scales, weight SQNR and activation ranges of a checkpoint",
                _pipeline("fxquant.cli.inspect")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description="torch.fx quantization compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=setup(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FxQuantError as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line, all of it
        print(f"fxquant {args.command}: error: {reason}", file=sys.stderr)
        return 1
    except OSError as exc:  # the system refused a read or write fxquant did not anticipate (disk full, permissions)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fxquant {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
