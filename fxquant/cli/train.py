"""``fxquant train``: QAT on a prepared checkpoint; resumable from the checkpoint it writes.

    fxquant train prepared.ckpt -o trained.ckpt --epochs 2 --steps 200   # stops after 200 steps
    fxquant train trained.ckpt -o trained2.ckpt                          # continues the same schedule

A resumed run keeps the settings it started with (data, epochs, batch size, subset, lr, seed, agreement
tolerance); ``--restart`` starts a new schedule from the checkpoint's weights instead. At the end of the
schedule training-mode and eval-mode accuracy are compared on training batches (batch norm re-estimated with
the quantized model when they differ by more than the tolerance); the result is in the report, and a gap that
remains is a warning on stderr. ``--device``/``--amp`` choose where it runs and may differ between the parts
of a run. Several processes train data-parallel the standard way::

    torchrun --nproc-per-node 2 -m fxquant train prepared.ckpt -o trained.ckpt --save-every 100

``--batch-size`` stays the global batch (each process takes its share), so the result equals a one-process
run up to float rounding (batch-norm statistics in training are per process, as in plain DDP); rank 0
alone writes the checkpoint and the report. ``--save-every N`` writes the checkpoint every N steps, so a run
whose process died resumes from the last one, with any number of processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fxquant.cli.common import (
    PipelineCommand,
    add_data_arguments,
    add_output_arguments,
    add_placement_arguments,
    add_trust_arguments,
    main_output,
    model_trust,
    non_negative_float,
    placement_from_args,
    positive_int,
    progress_enabled,
    sibling,
)
from fxquant.data.sources import DataSpec, data_location, open_data
from fxquant.errors import CheckpointError, ConfigError, InputError
from fxquant.io.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from fxquant.io.run_report import RunReport
from fxquant.placement import Placement, process_group
from fxquant.training.agreement import DEFAULT_TOLERANCE
from fxquant.training.loop import evaluate
from fxquant.training.trainer import QATTrainer, TrainSettings

__all__ = ["COMMAND"]

#: the options that fix a run (TrainSettings fields of the same name)
_RUN_OPTIONS = ("data", "epochs", "batch_size", "train_subset", "lr", "seed", "agreement_tolerance")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="prepared checkpoint (from fxquant prepare or fxquant train)")
    add_data_arguments(parser, train=True, test=True, batch_default=None)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, help=f"length of the schedule (default {TrainSettings.epochs})")
    group.add_argument("--lr", type=non_negative_float, help=f"peak learning rate (default {TrainSettings.lr})")
    group.add_argument("--steps", type=positive_int, help="stop after this many steps (resume later)")
    group.add_argument("--restart", action="store_true", help="ignore the checkpoint's training state")
    group.add_argument("--save-every", type=positive_int, metavar="N",
                       help="also write the output checkpoint every N steps (resume from it after a failure)")
    group.add_argument("--no-eval", action="store_true", help="skip the test-set accuracy")
    group.add_argument("--agreement-tolerance", type=non_negative_float,
                       help="largest training-mode vs eval-mode accuracy gap (points) accepted at the end of the "
                            f"schedule; batch norm is re-estimated when it is exceeded (default {DEFAULT_TOLERANCE})")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: when stderr is a terminal)")
    add_trust_arguments(parser)
    add_placement_arguments(parser)
    add_output_arguments(parser, "checkpoint to write (holds the training state)")


def _settings(args: argparse.Namespace, checkpoint: Checkpoint) -> tuple[TrainSettings, bool]:
    """The run's settings and whether it resumes; a resumed run refuses options that would change it."""
    given = {option: getattr(args, option) for option in _RUN_OPTIONS if getattr(args, option) is not None}
    if checkpoint.training is None or args.restart:
        return TrainSettings(**given), False
    stored = TrainSettings.from_dict(checkpoint.training["settings"])
    conflicts = [f"--{k.replace('_', '-')} {v!r} (checkpoint: {getattr(stored, k)!r})"
                 for k, v in given.items() if getattr(stored, k) != v]
    if conflicts:
        raise ConfigError(
            f"{args.checkpoint} is resumed with its own settings, and these options differ: {', '.join(conflicts)}; "
            "drop them, or pass --restart to start a new schedule from its weights"
        )
    return stored, True


def run(args: argparse.Namespace, report: RunReport) -> None:
    checkpoint = read_checkpoint(args.checkpoint)
    report.add_input("checkpoint", args.checkpoint)
    if checkpoint.kind != "prepared":
        raise CheckpointError(f"{args.checkpoint} is a {checkpoint.kind} checkpoint; train the prepared one")
    settings, resume = _settings(args, checkpoint)
    with process_group(placement_from_args(args)) as placement:
        _train(args, report, checkpoint, settings, resume, placement)


def _train(args: argparse.Namespace, report: RunReport, checkpoint: Checkpoint, settings: TrainSettings,
           resume: bool, placement: Placement) -> None:
    data = DataSpec(settings.data, settings.batch_size, settings.train_subset, args.test_subset, settings.seed,
                    checkpoint.input_shape[0])
    with report.phase("data"):
        train, test = open_data(data)
    if (location := data_location(data)) is not None:
        report.add_input("data", location, source=data.source)
    if tuple(train.images.shape[1:]) != checkpoint.input_shape:
        raise InputError(f"data {data.source} has inputs of shape {tuple(train.images.shape[1:])}, "
                         f"{args.checkpoint} was prepared for {checkpoint.input_shape}")
    if settings.batch_size < placement.world_size:
        raise ConfigError(f"--batch-size {settings.batch_size} is the global batch: it needs at least one sample "
                          f"for each of the {placement.world_size} processes")
    qmodel = checkpoint.build_prepared(trust=model_trust(args))
    if not resume:
        torch.manual_seed(settings.seed)
    trainer = QATTrainer(qmodel, train, settings, placement)
    if resume:
        trainer.load_state_dict(checkpoint.training)
    if trainer.finished:
        raise ConfigError(f"{args.checkpoint} has finished its schedule ({trainer.total_steps} steps); "
                          "pass --restart (and --epochs) to train a new one")
    start = trainer.global_step
    end = trainer.total_steps if args.steps is None else min(trainer.total_steps, start + args.steps)
    losses: list[float] = []

    def save() -> None:  # the output was checked writable before the run; later saves of this run replace it
        if placement.writes_files:
            result = Checkpoint.from_prepared(qmodel, checkpoint.input_shape, checkpoint.model, trainer.state_dict())
            save_checkpoint(result, args.output, force=True)

    with report.phase("train"):
        while trainer.global_step < end:
            chunk = end - trainer.global_step if args.save_every is None else min(args.save_every,
                                                                                    end - trainer.global_step)
            losses += trainer.run(chunk, progress_enabled(args))
            if args.save_every is not None and trainer.global_step < end:
                save()
    report.settings.update(training=settings.to_dict(), data=data.to_dict(), resumed=resume,
                           placement={"device": str(placement.device), "amp": placement.amp,
                                      "processes": placement.world_size})
    report.metrics.update(
        steps_run=trainer.global_step - start, global_step=trainer.global_step, total_steps=trainer.total_steps,
        epoch=trainer.epoch, finished=trainer.finished, train_loss=losses[-1], train_losses=losses,
    )
    if trainer.agreement is not None:
        report.metrics["train_eval_agreement"] = trainer.agreement.to_dict()
        if not trainer.agreement.passed and placement.writes_files:
            print(f"warning: {trainer.agreement.summary()}: eval accuracy differs from training", file=sys.stderr)
    if not args.no_eval and placement.writes_files:
        with report.phase("eval"):
            report.metrics["test_accuracy"] = evaluate(qmodel, test, placement=placement)
    save()
    if not placement.writes_files:
        return
    report.add_output("checkpoint", args.output)
    accuracy = report.metrics.get("test_accuracy")
    print(f"trained steps {start}..{trainer.global_step} of {trainer.total_steps}: loss {losses[-1]:.4f}"
          + (f", test accuracy {accuracy:.2f}%" if accuracy is not None else "") + f" -> {args.output}")


COMMAND = PipelineCommand(
    name="train",
    add_arguments=add_arguments,
    run=run,
    outputs=lambda args: [main_output(args.output)],
    default_report=lambda args: sibling(args.output, ".report.json"),
    inputs=lambda args: [("checkpoint", args.checkpoint)],
)
