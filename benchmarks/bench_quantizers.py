"""The quantizer family side by side: float, STE, DSQ, LSQ, QN and LCQ at W4A4, W3A3 and W2A2, and torch.ao QAT.

Every method trains ResNet-8 (``fxquant.models.resnet_small``; ``--model resnet20`` for ResNet-20) on
Fashion-MNIST with one recipe and seed:

1. a float model is trained once for ``--float-epochs`` (the pretrained start every paper assumes);
2. each method then trains ``--epochs`` from that model with the same optimizer (SGD, momentum 0.9, Nesterov,
   weight decay 5e-4 on layer weights only, cosine learning rate from ``--lr``), gradient-norm clipping at
   ``--clip`` (Quantization Networks' original recipe clips; every method gets it), and the same batches.
   The "float" row is the float model trained for the same extra epochs.

Quantized layers run at the column's weight and activation bits (``--bits 4 2``: W4A4 and W2A2;
``--configs w1a2 w2a2``: any pair); the first conv and the last linear layer stay at 8 bits
(``QuantConfig.first_last_bits``), per-channel weights, QAT batch-norm folding. Schedules (QN temperature)
advance with ``fxquant.update_schedules`` after every step. fxquant accuracy is measured in eval mode, i.e. with
the integer arithmetic of ``convert(backend="torch")`` (checked equal on one test batch per run), after the
end-of-training check of :func:`fxquant.training.agreement.ensure_agreement` (batch-norm statistics re-estimated on
training batches when training-mode and eval-mode accuracy differ); the training-mode accuracy on the test
set is recorded next to it (``train_mode_accuracy``). The peer is
``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with ``FakeQuantize`` at the same bits (weights: per-channel
symmetric ``[-2^(b-1), 2^(b-1)-1]``, moving-average min/max; activations: per-tensor affine ``[0, 2^b-1]``),
first/last layers at 8 bits, evaluated as fake-quantized float with observers frozen.

    .venv/bin/python benchmarks/bench_quantizers.py --quick --threads 1     # CPU smoke run on subsets
    .venv/bin/python benchmarks/bench_quantizers.py --epochs 5              # the full comparison
    .venv/bin/python benchmarks/bench_quantizers.py --configs w1a1 w1a2 w2a2 --schemes dsq lsq --model resnet20

Prints a table and writes ``results.json`` (settings, per-run accuracy, epochs, seconds per epoch and that time
relative to the float epoch) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxquant
from fxquant.data.fashion_mnist import TensorBatches, fashion_mnist_loaders
from fxquant.models import resnet20, resnet_small
from fxquant.quantizers.base import Quantizer
from fxquant.training.agreement import check_agreement, ensure_agreement
from fxquant.training.loop import evaluate, train_epoch

__all__ = ["BenchSettings", "QUICK", "run", "main"]

#: row name -> (quantizer, quantizer_options); "qn-kmeans" is QN with the original's non-uniform k-means levels
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ste": ("ste", {}), "dsq": ("dsq", {}), "lsq": ("lsq", {}), "qn": ("qn", {}),
    "qn-kmeans": ("qn", {"levels": "kmeans"}), "lcq": ("lcq", {}),
}
SCHEMES = tuple(METHODS)
#: --model name -> builder of a 1-channel, 10-class network
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet8": lambda: resnet_small(num_classes=10, in_channels=1),
    "resnet20": lambda: resnet20(num_classes=10, in_channels=1),
}


def label(config: tuple[int, int]) -> str:
    """``(weight_bits, act_bits)`` as a column name: ``W1A2``."""
    return f"W{config[0]}A{config[1]}"


@dataclass(frozen=True)
class BenchSettings:
    float_epochs: int = 3
    epochs: int = 3
    batch_size: int = 128
    train_subset: int | None = None
    test_subset: int | None = None
    float_lr: float = 0.1
    lr: float = 0.01
    weight_decay: float = 5e-4
    clip: float = 5.0
    configs: tuple[tuple[int, int], ...] = ((4, 4), (3, 3), (2, 2))  # (weight bits, activation bits)
    schemes: tuple[str, ...] = SCHEMES
    model: str = "resnet8"
    torch_ao: bool = True
    seed: int = 0


QUICK = BenchSettings(float_epochs=3, epochs=2, train_subset=4096, test_subset=2000)


def _optimizer(model: nn.Module, lr: float, s: BenchSettings, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with weight decay on layer weights only (not on quantizer scales, biases or batch-norm affines)."""
    quant_params = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_weight = name.endswith("weight") and p.dim() > 1
        (decay if is_weight and id(p) not in quant_params else rest).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    if s.clip > 0:
        params = decay + rest

        def clip(*_: Any) -> None:
            nn.utils.clip_grad_norm_(params, s.clip)

        opt.register_step_pre_hook(clip)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))


def _train(
    model: nn.Module, train: TensorBatches, s: BenchSettings, epochs: int, lr: float, name: str, progress: bool,
    on_progress: Callable[[float], None] | None = None,
) -> list[float]:
    """Train ``epochs`` with the shared recipe; returns seconds per epoch. Batches are reseeded per run."""
    train.generator.manual_seed(s.seed)
    torch.manual_seed(s.seed)
    total = epochs * len(train)
    opt, sched = _optimizer(model, lr, s, total)
    seconds = []
    for epoch in range(epochs):
        done = epoch * len(train)

        def on_step(step: int, done: int = done) -> None:
            if on_progress is not None:
                on_progress(min(1.0, (done + step + 1) / total))

        t0 = time.perf_counter()
        loss = train_epoch(model, train, opt, sched, progress, on_step=on_step, description=f"{name} {epoch + 1}")
        seconds.append(time.perf_counter() - t0)
        print(f"  {name} epoch {epoch + 1}/{epochs}: loss {loss:.4f} ({seconds[-1]:.1f}s)", flush=True)
    return seconds


def _ao_qconfig(weight_bits: int, act_bits: int) -> Any:
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
    )

    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2**act_bits - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                    quant_min=-(2 ** (weight_bits - 1)), quant_max=2 ** (weight_bits - 1) - 1,
                                    dtype=torch.qint8,
                                    qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfig(activation=act, weight=weight)


def _torch_ao_model(float_model: nn.Module, config: tuple[int, int], example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    mapping = QConfigMapping().set_global(_ao_qconfig(*config))
    for edge in ("conv1", "fc"):  # the first conv and the last linear layer, as fxquant's first_last_bits
        mapping = mapping.set_module_name(edge, _ao_qconfig(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(float_model).train(), mapping, (example,))


def _ao_evaluate(model: nn.Module, test: TensorBatches) -> float:
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)
    return evaluate(model, test)


def run(s: BenchSettings, out_dir: Path, progress: bool) -> dict[str, Any]:
    train, test = fashion_mnist_loaders(s.batch_size, s.train_subset, s.test_subset, s.seed)
    example = next(iter(test))[0]
    torch.manual_seed(s.seed)
    pretrained = MODELS[s.model]()
    print(f"float pretraining, {s.float_epochs} epochs", flush=True)
    _train(pretrained, train, s, s.float_epochs, s.float_lr, "pretrain", progress)
    pretrained.eval()
    rows: list[dict[str, Any]] = []

    def record(method: str, config: tuple[int, int] | None, acc: float, seconds: list[float], **extra: Any) -> None:
        bits = {} if config is None else {"weight_bits": config[0], "act_bits": config[1], "config": label(config)}
        rows.append({"method": method, **bits, "accuracy": acc, "epochs": len(seconds),
                     "seconds_per_epoch": sum(seconds) / max(len(seconds), 1), **extra})
        detail = "".join(f", {k} {extra[k]}" for k in ("accuracy_before_check", "train_mode_accuracy", "bn_reestimated")
                         if k in extra)
        print(f"{method} {'' if config is None else label(config)}: {acc:.2f}%{detail}", flush=True)

    model = copy.deepcopy(pretrained)
    seconds = _train(model, train, s, s.epochs, s.lr, "float", progress)
    record("float", None, evaluate(model, test), seconds)

    for scheme in s.schemes:
        for bits in s.configs:
            torch.manual_seed(s.seed)
            quantizer, options = METHODS[scheme]
            config = fxquant.QuantConfig(quantizer=quantizer, weight_bits=bits[0], act_bits=bits[1],
                                         quantizer_options=options)
            qmodel = fxquant.prepare(pretrained, (example,), config)
            init_acc = evaluate(qmodel, test)
            seconds = _train(qmodel, train, s, s.epochs, s.lr, f"{scheme} {label(bits)}", progress,
                             on_progress=lambda p, m=qmodel: fxquant.update_schedules(m, p))
            acc_trained = evaluate(qmodel, test)
            # the end-of-training check (batch norm re-estimated on training batches when it fails), then both
            # modes on the whole test set: the eval-mode number is the model's accuracy
            check = ensure_agreement(qmodel, train)
            final = check_agreement(qmodel, test, max_batches=None)
            with torch.no_grad():
                matches = bool(torch.equal(qmodel.eval()(example), fxquant.convert(qmodel, backend="torch")(example)))
            record(scheme, bits, final.eval_accuracy, seconds, accuracy_at_init=init_acc,
                   accuracy_before_check=acc_trained, train_mode_accuracy=final.train_accuracy,
                   bn_reestimated=check.reestimated, frozen_matches_prepared=matches)

    if s.torch_ao:
        for bits in s.configs:
            torch.manual_seed(s.seed)
            ao_model = _torch_ao_model(pretrained, bits, example)
            seconds = _train(ao_model, train, s, s.epochs, s.lr, f"torch.ao {label(bits)}", progress)
            record("torch.ao", bits, _ao_evaluate(ao_model, test), seconds)

    float_epoch = rows[0]["seconds_per_epoch"]
    for r in rows:
        r["time_vs_float"] = r["seconds_per_epoch"] / float_epoch if float_epoch > 0 else math.nan
    _print_table(rows, s)
    result = {"settings": asdict(s), "results": rows, "torch_threads": torch.get_num_threads(),
              "torch_version": torch.__version__}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out_dir / 'results.json'}")
    return result


def _print_table(rows: list[dict[str, Any]], s: BenchSettings) -> None:
    name = {"resnet8": "ResNet-8", "resnet20": "ResNet-20"}[s.model]
    print(f"\n{name}, Fashion-MNIST ({s.train_subset or 60000} train / {s.test_subset or 10000} test images), "
          f"{s.float_epochs} float + {s.epochs} QAT epochs, first/last layers 8-bit")
    labels = [label(c) for c in s.configs]
    header = f"{'method':<10}" + "".join(f"{name:>10}" for name in labels) + f"{'time/epoch vs float':>22}"
    print(header)
    print("-" * len(header))
    float_row = rows[0]
    print(f"{'float':<10}" + "".join(f"{float_row['accuracy']:>9.2f}%" for _ in labels) + f"{1.0:>21.2f}x")
    for method in [m for m in dict.fromkeys(r["method"] for r in rows) if m != "float"]:
        by_config = {r["config"]: r for r in rows if r["method"] == method}
        cells = "".join(f"{by_config[c]['accuracy']:>9.2f}%" if c in by_config else f"{'-':>10}" for c in labels)
        times = [by_config[c]["time_vs_float"] for c in labels if c in by_config]
        print(f"{method:<10}{cells}{sum(times) / len(times):>21.2f}x")


def _config(text: str) -> tuple[int, int]:
    """``w1a2`` -> (1, 2), for ``--configs``."""
    match = re.fullmatch(r"[wW](\d)[aA](\d)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight/activation pair like w1a2")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchSettings()
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 4k/2k-image subsets, 3 float + 2 QAT epochs")
    p.add_argument("--epochs", type=int, default=None, help=f"QAT epochs per method ({d.epochs})")
    p.add_argument("--float-epochs", type=int, default=None, help=f"float pretraining epochs ({d.float_epochs})")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help=f"QAT learning rate ({d.lr})")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--bits", type=int, nargs="+", default=None, help="bit-widths with W=A (4 3 2)")
    bits.add_argument("--configs", type=_config, nargs="+", default=None, help="weight/activation pairs: w1a2 w2a2")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help=f"network ({d.model})")
    p.add_argument("--schemes", nargs="+", default=None, choices=SCHEMES)
    p.add_argument("--no-torch-ao", action="store_true", help="skip the torch.ao prepare_qat_fx peer")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core host)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/bench_quantizers"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    s = QUICK if args.quick else d
    changes = {k: v for k, v in {
        "epochs": args.epochs, "float_epochs": args.float_epochs, "train_subset": args.train_subset,
        "test_subset": args.test_subset, "lr": args.lr, "seed": args.seed,
        "configs": tuple((b, b) for b in args.bits) if args.bits else tuple(args.configs) if args.configs else None,
        "schemes": tuple(args.schemes) if args.schemes else None, "model": args.model,
    }.items() if v is not None}
    s = replace(s, torch_ao=not args.no_torch_ao, **changes)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(s, args.out_dir, progress=not args.no_progress and sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    sys.exit(main())
