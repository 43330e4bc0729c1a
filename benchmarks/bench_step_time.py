"""QAT step time of every quantizer against the float step, measured in the same run.

One training step (forward, cross-entropy, backward, SGD) of ResNet-8 (``fxquant.models.resnet_small``) on a
batch of 1×28×28 inputs, float against the model prepared by each scheme at ``--bits`` (first/last layer
8-bit). Steps alternate between the two models and the medians are compared, so a noisy host slows both
alike. Schedules sit at mid-training (``update_schedules(model, 0.5)``: QN's temperature, DSQ's α).

    .venv/bin/python benchmarks/bench_step_time.py --threads 1

Prints a table and writes ``step_time.json`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fxquant
from fxquant.models import resnet_small

SCHEMES = ("ste", "dsq", "lsq", "qn", "lcq")


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def measure(scheme: str, bits: int, batch: int, steps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    float_model = resnet_small(num_classes=10, in_channels=1)
    quant = fxquant.prepare(float_model, (x,), fxquant.QuantConfig(quantizer=scheme, weight_bits=bits, act_bits=bits))
    float_model.train()
    quant.train()
    fxquant.update_schedules(quant, 0.5)
    pairs = [(m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)) for m in (float_model, quant)]
    times: list[list[float]] = [[], []]
    for i in range(warmup + steps):
        for k, (m, opt) in enumerate(pairs):
            t = _step(m, opt, x, y)
            if i >= warmup:
                times[k].append(t)
    f, q = statistics.median(times[0]), statistics.median(times[1])
    return {"scheme": scheme, "bits": bits, "float_ms": f * 1e3, "quant_ms": q * 1e3, "ratio": q / f}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(s, args.bits, args.batch, args.steps, args.warmup) for s in args.schemes]
    print(f"ResNet-8, batch {args.batch}, W{args.bits}A{args.bits}, {torch.get_num_threads()} thread(s)")
    print(f"{'scheme':8} {'float ms':>9} {'QAT ms':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['scheme']:8} {r['float_ms']:9.1f} {r['quant_ms']:9.1f} {r['ratio']:6.2f}x")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = {"settings": vars(args) | {"out_dir": str(args.out_dir)}, "results": rows,
           "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}
    (args.out_dir / "step_time.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out_dir / 'step_time.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
