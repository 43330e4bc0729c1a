"""``fxquant inspect``: the per-layer table of a checkpoint, as text, JSON (``--json``) and a PNG (``--plot``).

    fxquant inspect trained.ckpt --json layers.json --plot layers.png
"""

from __future__ import annotations

import json
from argparse import ArgumentParser, Namespace
from pathlib import Path

from fxquant.cli.common import (
    Output,
    PipelineCommand,
    add_output_arguments,
    add_trust_arguments,
    model_trust,
    sibling,
)
from fxquant.io.checkpoint import read_checkpoint
from fxquant.io.output_files import write_bytes_atomic, write_text_atomic
from fxquant.io.run_report import RunReport, jsonable
from fxquant.tools.inspection import format_table, layer_rows, plot_rows

__all__ = ["COMMAND"]


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="prepared or reference checkpoint")
    parser.add_argument("--json", type=Path, help="write the table as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart of weight SQNR per layer")
    add_trust_arguments(parser)
    add_output_arguments(parser, None)


def run(args: Namespace, report: RunReport) -> None:
    checkpoint = read_checkpoint(args.checkpoint)
    report.add_input("checkpoint", args.checkpoint)
    rows = layer_rows(checkpoint.build_prepared(trust=model_trust(args)))
    print(format_table(rows))
    table = [r.to_dict() for r in rows]
    if args.json is not None:
        document = {"checkpoint": str(args.checkpoint), "model": checkpoint.model and checkpoint.model.to_dict(),
                    "layers": table}
        write_text_atomic(args.json, json.dumps(jsonable(document), indent=2, sort_keys=True) + "\n")
        report.add_output("json", args.json)
    if args.plot is not None:
        write_bytes_atomic(args.plot, plot_rows(rows))
        report.add_output("plot", args.plot)
    finite = [r.weight_sqnr_db for r in rows if r.weight_sqnr_db is not None]
    report.metrics.update(
        layers=table,
        quantized_layers=len(rows),
        min_weight_sqnr_db=min(finite, default=None),
        mean_weight_sqnr_db=sum(finite) / len(finite) if finite else None,
    )


def _outputs(args: Namespace) -> list[Output]:
    return [Output(p, role) for p, role in ((args.json, "--json"), (args.plot, "--plot")) if p is not None]


def _default_report(args: Namespace) -> Path:
    return sibling(args.json, ".report.json") if args.json else sibling(args.checkpoint, ".inspect.report.json")


COMMAND = PipelineCommand(
    name="inspect",
    add_arguments=add_arguments,
    run=run,
    outputs=_outputs,
    default_report=_default_report,
    inputs=lambda args: [("checkpoint", args.checkpoint)],
)
