"""SDQ mixed precision vs uniform bit-widths on Fashion-MNIST with ResNet-8 (``resnet_small``), same quantizer.

All methods start from the same trained float model and get the same number of quantized training steps
(``--qat-steps``); SDQ spends ``--search-steps`` of them on the search (at an average of ``--avg-bits``
weight bits, activations at 4 bits, bit-widths searched down from ``--max-bits``) and the rest on QAT with
DSQ at the plan's bits, continuing from the weights the search trained (``search(update_weights=True)``;
``--cold-start`` starts it again from the float model, and the search's steps are lost to the weights). A
search step computes each quantizer at two bit-widths; the budget counts steps, not time. The uniform
baselines train DSQ for all of the steps at the two whole bit-widths around the budget (W3 and W4 for the
default 3.0 average; the targets: SDQ at least as accurate as the lower, within 0.5 point of the higher).
First and last layers stay at 8 bits everywhere (``QuantConfig.first_last_bits``) and count in every cost.
Accuracy is measured with the integer path (eval mode), i.e. that of the deployed model.

    .venv/bin/python benchmarks/bench_sdq.py --quick --threads 1       # CPU smoke run on subsets
    .venv/bin/python benchmarks/bench_sdq.py --out-dir runs/bench_sdq  # the full comparison

Writes ``results.json`` (settings, per-method accuracy and costs, the plan), ``sdq_plan.json`` and the
per-layer chart ``sdq_plan.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxquant
from fxquant.data.fashion_mnist import TensorBatches, fashion_mnist_loaders
from fxquant.models import resnet_small
from fxquant.passes.analysis.cost_model import layer_costs, plan_cost
from fxquant.training.loop import evaluate, train_epoch
from fxquant.training.losses import sdq_loss


@dataclass(frozen=True)
class BenchSettings:
    float_epochs: int = 3
    qat_steps: int = 1407  # 3 epochs of 60k images at batch 128
    search_steps: int = 469
    batch_size: int = 128
    train_subset: int | None = None
    test_subset: int | None = None
    lr: float = 0.1
    qat_lr: float = 0.01
    avg_bits: float = 3.0
    act_bits: int = 4
    max_bits: int = 6  # where the search starts (Budget.max_bits): the range a 3-bit average can use
    seed: int = 0
    ebr_kd: bool = False
    warm_start: bool = True


QUICK = BenchSettings(float_epochs=3, qat_steps=64, search_steps=24, train_subset=4096, test_subset=2000)


def _sgd(params: Any, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)


def uniform_bits(avg_bits: float) -> tuple[int, int]:
    """The whole bit-widths below and above an average budget (3.0 -> W3, W4; 2.5 -> W2, W3)."""
    low = max(1, min(7, math.floor(avg_bits)))
    return low, low + 1


def train_float(s: BenchSettings, train: TensorBatches, progress: bool) -> nn.Module:
    torch.manual_seed(s.seed)
    model = resnet_small(num_classes=10, in_channels=1)
    opt, sched = _sgd(model.parameters(), s.lr, s.float_epochs * len(train))
    for epoch in range(s.float_epochs):
        loss = train_epoch(model, train, opt, sched, progress, description=f"float {epoch + 1}/{s.float_epochs}")
        print(f"float epoch {epoch + 1}: loss {loss:.4f}", flush=True)
    return model.eval()


def qat(
    float_model: nn.Module, config: fxquant.QuantConfig, train: TensorBatches, steps: int, s: BenchSettings,
    progress: bool, name: str, teacher: nn.Module | None = None,
) -> nn.Module:
    """DSQ QAT from ``float_model`` for exactly ``steps`` optimizer steps (EBR+KD from ``teacher`` if set)."""
    torch.manual_seed(s.seed)
    example = next(iter(train))[0]
    qmodel = fxquant.prepare(float_model, (example,), config)
    loss_fn = sdq_loss(qmodel, teacher=teacher) if teacher is not None else None
    opt, sched = _sgd(qmodel.parameters(), s.qat_lr, steps)
    done = 0
    while done < steps:
        start = done

        def on_step(step: int, start: int = start) -> None:
            fxquant.update_schedules(qmodel, min(1.0, (start + step + 1) / steps))

        train_epoch(qmodel, train, opt, sched, progress, on_step=on_step, loss_fn=loss_fn,
                    description=f"QAT {name}", max_steps=steps - done)
        done = min(steps, done + len(train))
    return qmodel


def costs_of(qmodel: nn.Module) -> dict[str, float]:
    costs = layer_costs(qmodel)
    w = {n: qmodel.get_submodule(n).weight_quant.bits for n in costs}
    a = {n: qmodel.get_submodule(n).input_quant.bits for n in costs}
    return {m: float(plan_cost(costs, m, w, a)) for m in ("avg_weight_bits", "bitops", "size_bytes")}


def run(s: BenchSettings, out_dir: Path, progress: bool) -> dict[str, Any]:
    train, test = fashion_mnist_loaders(s.batch_size, s.train_subset, s.test_subset, s.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    float_model = train_float(s, train, progress)
    timings["float_s"] = time.perf_counter() - t0
    float_acc = evaluate(float_model, test)
    print(f"float accuracy: {float_acc:.2f}%", flush=True)
    rows: list[dict[str, Any]] = [{"method": "float", "accuracy": float_acc, "steps": 0}]

    low, high = uniform_bits(s.avg_bits)
    for bits in (low, high):
        name = f"uniform W{bits}A{s.act_bits}"
        t0 = time.perf_counter()
        config = fxquant.QuantConfig(quantizer="dsq", weight_bits=bits, act_bits=s.act_bits)
        qmodel = qat(float_model, config, train, s.qat_steps, s, progress, name)
        timings[name] = time.perf_counter() - t0
        rows.append({"method": name, "accuracy": evaluate(qmodel, test), "steps": s.qat_steps, **costs_of(qmodel)})
        print(f"{name}: {rows[-1]['accuracy']:.2f}%", flush=True)

    t0 = time.perf_counter()
    example = next(iter(train))[0]
    budget = fxquant.Budget(avg_weight_bits=s.avg_bits, act_bits=s.act_bits, max_bits=s.max_bits)
    options = fxquant.SearchOptions(steps=s.search_steps, seed=s.seed)
    start_model = copy.deepcopy(float_model)  # the search writes its training here when warm-starting
    plan = fxquant.search(start_model, (example,), train, budget, fxquant.QuantConfig(quantizer="dsq"),
                          options=options, progress=progress, update_weights=s.warm_start)
    timings["sdq_search_s"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    plan.save(out_dir / "sdq_plan.json")
    plan.report(out_dir / "sdq_plan.png", title=f"SDQ plan, {s.avg_bits} avg weight bits, A{s.act_bits}")
    name = f"SDQ avg W{s.avg_bits:g} A{s.act_bits}" + (" +EBR+KD" if s.ebr_kd else "") + (
        "" if s.warm_start else " (cold)")
    t0 = time.perf_counter()
    qat_steps = s.qat_steps - s.search_steps
    qmodel = qat(start_model, fxquant.QuantConfig(quantizer="dsq", plan=plan), train, qat_steps, s, progress,
                 "sdq", teacher=float_model if s.ebr_kd else None)
    timings["sdq_qat_s"] = time.perf_counter() - t0
    rows.append({"method": name, "accuracy": evaluate(qmodel, test), "steps": s.qat_steps,
                 "search_steps": s.search_steps, **costs_of(qmodel)})

    print(f"\n{'method':<30}{'avg W bits':>11}{'MBitOPs':>10}{'KB':>8}{'steps':>7}{'accuracy':>10}")
    for r in rows:
        if r["method"] == "float":
            print(f"{'float ResNet-8':<30}{'32':>11}{'':>10}{'':>8}{'':>7}{r['accuracy']:>9.2f}%")
            continue
        print(f"{r['method']:<30}{r['avg_weight_bits']:>11.3f}{r['bitops'] / 1e6:>10.1f}"
              f"{r['size_bytes'] / 1024:>8.1f}{r['steps']:>7}{r['accuracy']:>9.2f}%")
    sdq, acc_low, acc_high = rows[-1]["accuracy"], rows[1]["accuracy"], rows[2]["accuracy"]
    ge_low, near_high = f"sdq_ge_uniform_w{low}", f"sdq_within_0.5_of_uniform_w{high}"
    verdict = {ge_low: sdq >= acc_low, near_high: sdq >= acc_high - 0.5}
    print(f"SDQ >= uniform W{low}: {verdict[ge_low]} ({sdq - acc_low:+.2f}); "
          f"SDQ within 0.5 of uniform W{high}: {verdict[near_high]} ({sdq - acc_high:+.2f})")
    result = {
        "settings": asdict(s),
        "results": rows,
        "targets": verdict,
        "plan": plan.to_dict(),
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'sdq_plan.json'}, {out_dir / 'sdq_plan.png'}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchSettings()
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 4k/2k-image subsets, few steps")
    p.add_argument("--float-epochs", type=int, default=None)
    p.add_argument("--qat-steps", type=int, default=None, help=f"quantized training steps per method ({d.qat_steps})")
    p.add_argument("--search-steps", type=int, default=None, help=f"of which SDQ searches ({d.search_steps})")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--avg-bits", type=float, default=None)
    p.add_argument("--max-bits", type=int, default=None, help=f"bits the search starts from ({d.max_bits})")
    p.add_argument("--ebr-kd", action="store_true", help="SDQ's QAT with EBR and distillation from the float model")
    p.add_argument("--cold-start", action="store_true",
                   help="SDQ's QAT starts again from the float model instead of the search's weights")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core host)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/bench_sdq"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    s = QUICK if args.quick else d
    changes = {k: v for k, v in {
        "float_epochs": args.float_epochs, "qat_steps": args.qat_steps, "search_steps": args.search_steps,
        "train_subset": args.train_subset, "test_subset": args.test_subset, "avg_bits": args.avg_bits,
        "max_bits": args.max_bits, "seed": args.seed}.items() if v is not None}
    s = replace(s, ebr_kd=args.ebr_kd, warm_start=not args.cold_start, **changes)
    if s.search_steps >= s.qat_steps:
        p.error("--search-steps must be below --qat-steps (the search is part of the same training budget)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(s, args.out_dir, progress=not args.no_progress and sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
