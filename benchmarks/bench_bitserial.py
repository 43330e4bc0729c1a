"""Per-layer time of the bit-serial conv kernels vs PyTorch fp32 ``F.conv2d`` on ResNet-18's 3x3 conv shapes.

Both run in this process with the same thread count (``--threads``; TVM reads ``TVM_NUM_THREADS``, set here
before TVM starts its pool), in alternating blocks of back-to-back calls so that both see the same machine load.
Reported per layer: the median over rounds of the per-call block time, the speed-up over fp32, and one-bit MACs
per cycle (``bit_ops / (seconds * Hz)``, in total and per thread) against the kernel's per-core bound.
On a machine shared with other jobs, ``--threads 1 --clock thread`` times CPU seconds of the calling thread
(both libraries then run inline in it), which other processes barely disturb.

    .venv/bin/python benchmarks/bench_bitserial.py --quick --out results/bitserial.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, height = width): 3x3, stride 1, pad 1, batch 1
BITS = ((1, 1), (1, 2), (2, 2), (3, 3), (4, 4))  # (weight bits, activation bits)

# Best one-bit MACs per cycle per core of each inner loop, from its instruction mix.
PEAK_BITOPS_PER_CYCLE = {
    # 256 bit-ops per step: and, and, pshufb, pshufb, add, add = 6 uops on Zen 3's 4 vector pipes -> 1.5 cycles.
    "x86-avx2": 256 / 1.5,
    # 512 bit-ops per step: vpandq, vpopcntq, vpaddq; vpopcntq issues once a cycle on Zen 4 and Ice Lake -> 1 cycle.
    "x86-avx512-vpopcntdq": 512 / 1.0,
    # 128 bit-ops per step: and, cnt, add = 3 uops on 2 NEON pipes (Cortex-A7x class) -> 1.5 cycles.
    "aarch64-neon": 128 / 1.5,
    # 64 bit-ops per word: and, popcnt, add on 4 integer ALUs -> 0.75 cycles.
    "generic-llvm": 64 / 0.75,
}


_ADD_CHAIN_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    unsigned long x = 1, n = 300000000UL;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (unsigned long i = 0; i < n; i += 8)
        __asm__ volatile("add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\t"
                         "add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0" : "+r"(x));
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    printf("%f\n", n / ((b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec)) / 1e9);
    return (int)(x & 1) * 0;
}
"""


def _cpu_ghz() -> tuple[float, str]:
    """The core clock in GHz and how it was found.

    A chain of dependent x86 adds runs one per cycle, so adds per CPU-second is the clock actually reached
    (``/proc/cpuinfo`` shows a nominal figure under a hypervisor, below the boost clock). Falls back to
    ``/proc/cpuinfo`` when there is no C compiler or the host is not x86.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler and platform.machine() in ("x86_64", "AMD64"):
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = Path(tmp) / "chain.c", Path(tmp) / "chain"
            src.write_text(_ADD_CHAIN_C)
            try:
                subprocess.run([compiler, "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
                runs = [float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
                        for _ in range(3)]
                return max(runs), "measured (dependent-add chain)"
            except (subprocess.CalledProcessError, ValueError, OSError):
                pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":")[1]) / 1000.0, "/proc/cpuinfo"
    except OSError:
        pass
    return 0.0, "unknown"


def _block(call: Callable[[], Any], count: int, clock: Callable[[], float]) -> float:
    """Mean seconds per call over ``count`` back-to-back calls, after one untimed call."""
    call()
    start = clock()
    for _ in range(count):
        call()
    return (clock() - start) / count


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and only W1A1, W2A2: a short run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for TVM and for PyTorch")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per layer (default 15, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, quick 1)")
    p.add_argument("--block", type=int, default=5, help="back-to-back calls per timed block")
    p.add_argument(
        "--clock", choices=("wall", "thread"), default="wall",
        help="wall time, or CPU time of this thread (only with --threads 1)",
    )
    p.add_argument("--ghz", type=float, default=None, help="clock for bit-ops/cycle (default: measured)")
    p.add_argument("--target", type=str, default=None, help="TVM target as JSON (default: this CPU)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


class _Case:
    """One layer: the compiled kernel with its arguments, and the fp32 PyTorch conv of the same shape."""

    def __init__(self, channels: int, size: int, wb: int, ab: int, target: Any, gen: Any):
        import numpy as np
        import torch
        import tvm

        from fxquant.backends.tvm.kernels.bitserial import conv2d_primfunc, conv_geometry, pack_weights, select_isa
        from fxquant.integer import FrozenConv2d, frozen_layer

        codes_w = torch.randint(0, 1 << wb, (channels, channels, 3, 3), generator=gen)
        self.layer = frozen_layer(
            FrozenConv2d, weight_int=2 * codes_w - ((1 << wb) - 1), weight_codes=codes_w,
            weight_scale=torch.ones(channels),
            bias=None, weight_bits=wb, weight_encoding="bipolar", act_bits=ab, input_low=torch.tensor(0.0),
            input_step=torch.tensor(1.0), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
        )
        shape = (1, channels, size, size)
        self.geom = conv_geometry(self.layer, shape)
        self.isa = select_isa(target)
        self.tiling = self.isa.tiling(self.geom)
        self.kernel = tvm.compile(conv2d_primfunc(self.layer, shape, target), target=target).mod["bitserial_conv2d"]
        self.codes = torch.randint(0, 1 << ab, shape, generator=gen, dtype=torch.int32)
        dev = tvm.cpu()
        self.args = (
            tvm.runtime.tensor(self.codes.numpy(), dev),
            tvm.runtime.tensor(pack_weights(self.layer), dev),
            tvm.runtime.tensor(np.zeros(self.geom.out_shape, np.int32), dev),
        )
        self.x = torch.randn(shape)
        self.w = torch.randn(channels, channels, 3, 3)

    def exact(self) -> bool:
        import numpy as np

        self.run_tvm()
        got = self.args[2].numpy().astype(np.int64)
        from fxquant.integer import accumulate

        return bool(np.array_equal(got, accumulate(self.layer, self.codes).numpy()))

    def run_tvm(self) -> None:
        self.kernel(*self.args)

    def run_torch(self) -> None:
        import torch.nn.functional as F

        F.conv2d(self.x, self.w, padding=1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch
    import tvm
    from tvm.target.codegen import llvm_get_system_cpu

    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    bits_list = ((1, 1), (2, 2)) if args.quick else BITS
    ghz, ghz_source = (args.ghz, "--ghz") if args.ghz else _cpu_ghz()
    target_spec = json.loads(args.target) if args.target else {"kind": "llvm", "mcpu": llvm_get_system_cpu()}
    target = tvm.target.Target(target_spec)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    print(f"threads={args.threads} timer={args.clock} clock={ghz:.2f} GHz ({ghz_source}) target={target_spec}")
    header = ("layer", "bits", "tvm ms", "fp32 ms", "speed-up", "bitop/cyc", "/core", "of peak")
    print("".join(f"{h:<12}" if i == 0 else f"{h:<6}" if i == 1 else f"{h:>10}" for i, h in enumerate(header)))
    for channels, size in SHAPES:
        for wb, ab in bits_list:
            case = _Case(channels, size, wb, ab, target, gen)
            exact = case.exact()
            tvm_t, torch_t = [], []
            for i in range(warmup + rounds):
                t_tvm = _block(case.run_tvm, args.block, clock)
                t_torch = _block(case.run_torch, args.block, clock)
                if i >= warmup:
                    tvm_t.append(t_tvm)
                    torch_t.append(t_torch)
            tvm_ms = statistics.median(tvm_t) * 1e3
            torch_ms = statistics.median(torch_t) * 1e3
            per_cycle = case.geom.bit_ops / (tvm_ms * 1e-3 * ghz * 1e9) if ghz else float("nan")
            peak = PEAK_BITOPS_PER_CYCLE.get(case.isa.name, float("nan"))
            row = {
                "layer": f"{channels}x{size}x{size}",
                "weight_bits": wb,
                "act_bits": ab,
                "isa": case.isa.name,
                "tiling": [case.tiling.tile_w, case.tiling.vec_blocks],
                "exact": exact,
                "tvm_ms": round(tvm_ms, 4),
                "tvm_min_ms": round(min(tvm_t) * 1e3, 4),
                "torch_fp32_ms": round(torch_ms, 4),
                "torch_fp32_min_ms": round(min(torch_t) * 1e3, 4),
                "speedup": round(torch_ms / tvm_ms, 3),
                "bit_ops": case.geom.bit_ops,
                "bitops_per_cycle": round(per_cycle, 1),
                "bitops_per_cycle_per_core": round(per_cycle / args.threads, 1),
                "peak_bitops_per_cycle_per_core": round(peak, 1),
            }
            rows.append(row)
            print(
                f"{row['layer']:<12}W{wb}A{ab:<3}{tvm_ms:>10.3f}{torch_ms:>10.3f}{row['speedup']:>9.2f}x"
                f"{per_cycle:>10.1f}{per_cycle / args.threads:>10.1f}{per_cycle / args.threads / peak:>10.0%}"
                + ("" if exact else "  NOT EXACT"),
                flush=True,
            )
    result = {
        "machine": platform.machine(),
        "threads": args.threads,
        "timer": args.clock,
        "clock_ghz": ghz,
        "clock_source": ghz_source,
        "target": target_spec,
        "rounds": rounds,
        "warmup": warmup,
        "block": args.block,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
