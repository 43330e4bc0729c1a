"""The demo pipeline: float training → DSQ W4A4 QAT → integer reference, on Fashion-MNIST.

    fxquant demo                 # full run (about 10 minutes on 2 cores)
    fxquant demo --quick         # a 1-minute smoke run on subsets
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fxquant
from fxquant.data.fashion_mnist import fashion_mnist_loaders
from fxquant.models import resnet_small
from fxquant.training.loop import evaluate, train_epoch

__all__ = ["DemoSettings", "run_demo", "add_arguments"]


@dataclass(frozen=True)
class DemoSettings:
    float_epochs: int = 3
    qat_epochs: int = 2
    weight_bits: int = 4
    act_bits: int = 4
    quantizer: str = "dsq"
    batch_size: int = 128
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0
    lr: float = 0.1
    qat_lr: float = 0.01


def _sgd(params, lr: float, steps: int):
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)


def run_demo(settings: DemoSettings, progress: bool = True) -> dict:
    """Run the whole pipeline and return its measured numbers."""
    torch.manual_seed(settings.seed)
    train, test = fashion_mnist_loaders(settings.batch_size, settings.train_subset, settings.test_subset, settings.seed)
    model = resnet_small(num_classes=10, in_channels=1)
    timings = {}

    t0 = time.perf_counter()
    opt, sched = _sgd(model.parameters(), settings.lr, settings.float_epochs * len(train))
    for epoch in range(settings.float_epochs):
        loss = train_epoch(model, train, opt, sched, progress, description=f"float {epoch + 1}/{settings.float_epochs}")
        print(f"float epoch {epoch + 1}: loss {loss:.4f}", flush=True)
    timings["float_train_s"] = time.perf_counter() - t0
    float_acc = evaluate(model, test)
    print(f"float test accuracy: {float_acc:.2f}%", flush=True)

    config = fxquant.QuantConfig(
        quantizer=settings.quantizer, weight_bits=settings.weight_bits, act_bits=settings.act_bits
    )
    example = next(iter(train))[0]
    qmodel = fxquant.prepare(model, (example,), config)
    t0 = time.perf_counter()
    steps = settings.qat_epochs * len(train)
    opt, sched = _sgd(qmodel.parameters(), settings.qat_lr, steps)
    for epoch in range(settings.qat_epochs):
        done = epoch * len(train)
        loss = train_epoch(
            qmodel, train, opt, sched, progress, description=f"QAT {epoch + 1}/{settings.qat_epochs}",
            on_step=lambda step, done=done: fxquant.update_schedules(qmodel, min(1.0, (done + step + 1) / steps)),
        )
        print(f"QAT epoch {epoch + 1}: loss {loss:.4f}", flush=True)
    timings["qat_train_s"] = time.perf_counter() - t0
    qat_acc = evaluate(qmodel, test)

    reference = fxquant.convert(qmodel, backend="torch")
    ref_acc = evaluate(reference, test)
    x, _ = next(iter(test))
    with torch.no_grad():
        agree = bool(torch.equal(qmodel.eval()(x), reference(x)))
    result = {
        "settings": settings.__dict__,
        "float_accuracy": float_acc,
        "qat_eval_accuracy": qat_acc,
        "integer_reference_accuracy": ref_acc,
        "reference_matches_prepared_bitwise": agree,
        "quantized_layers": len(fxquant.quantized_layer_names(qmodel)),
        "timings_s": timings,
    }
    bits = f"W{settings.weight_bits}A{settings.act_bits}"
    print(f"\n{'model':<34}{'test accuracy':>14}")
    print(f"{'float ResNet-8':<34}{float_acc:>13.2f}%")
    print(f"{settings.quantizer.upper() + ' ' + bits + ' (prepared, eval)':<34}{qat_acc:>13.2f}%")
    print(f"{settings.quantizer.upper() + ' ' + bits + ' integer reference':<34}{ref_acc:>13.2f}%")
    print(f"reference equals prepared model bit for bit: {agree}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    parser.add_argument("--float-epochs", type=int, default=d.float_epochs)
    parser.add_argument("--qat-epochs", type=int, default=d.qat_epochs)
    parser.add_argument("--quantizer", default=d.quantizer)
    parser.add_argument("--weight-bits", type=int, default=d.weight_bits)
    parser.add_argument("--act-bits", type=int, default=d.act_bits)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--quick", action="store_true", help="1 float + 1 QAT epoch on 4k/2k-image subsets")
    parser.add_argument("--report", type=Path, default=None, help="write the measured numbers as JSON")


def main(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        float_epochs=1 if args.quick else args.float_epochs,
        qat_epochs=1 if args.quick else args.qat_epochs,
        quantizer=args.quantizer,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        train_subset=4000 if args.quick else args.train_subset,
        test_subset=2000 if args.quick else args.test_subset,
        seed=args.seed,
    )
    result = run_demo(settings)
    if args.report is not None:
        args.report.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0
