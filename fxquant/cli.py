"""The ``fxquant`` command: subcommands a pipeline calls; exit code 0 on success, 1 with a one-line
reason on a fxquant error, 2 on bad usage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fxquant.errors import FxQuantError

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace], int]


def _demo(parser: argparse.ArgumentParser) -> Handler:
    from fxquant import demo

    demo.add_arguments(parser)
    return demo.main


#: subcommand name -> (help, function that adds its arguments and returns its handler)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "demo": ("train a ResNet on Fashion-MNIST, quantize it with DSQ W4A4 and check the integer reference", _demo),
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
        print(f"fxquant {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
