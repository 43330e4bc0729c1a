"""End-to-end ResNet-18 latency: ``tvm-llvm`` (W2A2, first/last layer 8-bit) against PyTorch fp32 eager.

Both run on this host in the same process, on the same input, with the same thread count; each latency is
the median of ``--runs`` timed calls after ``--warmup`` untimed ones. Also reported: compile time of the
host module, agreement with the integer reference, and the size of the ``tvm-arm`` artifact.

    .venv/bin/python benchmarks/bench_resnet18_e2e.py --runs 20 --out results.json

Weights are random (no pretrained weights are available offline): latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
import tvm

import fxquant
from fxquant.backends.tvm.build import host_target_dict

__all__ = ["main", "median_latency"]


def median_latency(fn: Callable[[], Any], runs: int, warmup: int) -> tuple[float, list[float]]:
    """Median seconds per call of ``fn`` (and all samples)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def _model(size: int) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=1000)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))  # real batch-norm statistics, so the folded model is sane
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bits", type=int, default=2, help="weight and activation bits of the inner layers")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for PyTorch and TVM")
    parser.add_argument("--no-arm", action="store_true", help="skip building the tvm-arm artifact")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _model(args.size)
    x = torch.randn(args.batch, 3, args.size, args.size)
    config = fxquant.QuantConfig(weight_bits=args.bits, act_bits=args.bits, first_last_bits=8)
    qmodel = fxquant.prepare(model, (x,), config).eval()

    with torch.no_grad():
        fp32_s, _ = median_latency(lambda: model(x), args.runs, args.warmup)

    start = time.perf_counter()
    compiled = fxquant.convert(qmodel, backend="tvm-llvm")
    compile_s = time.perf_counter() - start
    tvm_s, samples = median_latency(lambda: compiled(x), args.runs, args.warmup)

    reference = fxquant.convert(qmodel, backend="torch")
    with torch.no_grad():
        want = reference(x)
    got = compiled(x)
    agreement = {
        "max_abs_diff": float((got - want).abs().max()),
        "max_abs_reference": float(want.abs().max()),
        "top1_equal": bool(torch.equal(got.argmax(1), want.argmax(1))),
    }

    arm: dict[str, Any] = {"skipped": True}
    if not args.no_arm:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            art = fxquant.convert(qmodel, backend="tvm-arm", output_dir=Path(tmp) / "resnet18")
            arm = {
                "compile_seconds": round(time.perf_counter() - start, 2),
                "model_so_bytes": art.manifest["files"]["model.so"]["bytes"],
                "kernel_counts": art.manifest["kernel_counts"],
            }

    results = {
        "model": "resnet18",
        "input_shape": list(x.shape),
        "bits": {"inner": args.bits, "first_last": 8},
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "llvm_cpu": host_target_dict()["mcpu"],
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "tvm": tvm.__version__,
        },
        "runs": args.runs,
        "warmup": args.warmup,
        "pytorch_fp32_ms": round(fp32_s * 1e3, 3),
        "tvm_llvm_ms": round(tvm_s * 1e3, 3),
        "tvm_llvm_ms_min": round(min(samples) * 1e3, 3),
        "speedup_vs_fp32": round(fp32_s / tvm_s, 3),
        "tvm_llvm_compile_seconds": round(compile_s, 2),
        "tvm_llvm_kernel_counts": compiled.manifest["kernel_counts"],
        "agreement_with_integer_reference": agreement,
        "tvm_arm": arm,
    }
    rows = [
        ("PyTorch fp32 eager", f"{results['pytorch_fp32_ms']:.2f} ms", "median"),
        (f"tvm-llvm W{args.bits}A{args.bits}", f"{results['tvm_llvm_ms']:.2f} ms",
         f"median, {results['speedup_vs_fp32']:.2f}x vs fp32"),
        ("tvm-llvm compile", f"{compile_s:.1f} s", str(results["tvm_llvm_kernel_counts"])),
        ("tvm-arm model.so", f"{arm.get('model_so_bytes', 0) / 1e6:.2f} MB" if "model_so_bytes" in arm else "-",
         f"compile {arm['compile_seconds']} s" if "compile_seconds" in arm else "skipped"),
        ("agreement", f"max|diff| {agreement['max_abs_diff']:.3g}", f"top-1 equal: {agreement['top1_equal']}"),
    ]
    print(f"ResNet-18 {tuple(x.shape)} on {results['host']['llvm_cpu']}, {args.threads} thread(s), "
          f"{args.runs} runs after {args.warmup} warmup")
    for row in rows:
        print(f"  {row[0]:<22} {row[1]:>14}   {row[2]}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


if __name__ == "__main__":
    main()
