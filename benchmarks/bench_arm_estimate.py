"""Static estimate of the bit-serial conv kernels of ResNet-18 (224x224, batch 1) on named aarch64 cores.

No ARM hardware is involved: for each core of ``fxquant.backends.tvm.arm_cores`` the NEON hot loop is compiled
for that core and analysed with ``llvm-mca`` (a static instruction count where it is absent), and each layer's
time is modelled from it (``fxquant.backends.tvm.arm_estimate``; one thread, every load an L1 hit). Reported per
distinct conv shape and bitwidth: the estimated microseconds, the bit-serial (popcount) ceiling, the int8
ceiling (MACs / int8 MACs per cycle / clock), the layer's efficiency (ceiling / estimate) and, per core, the hot
loop's efficiency (ceiling cycles / modelled cycles). The totals cover every conv but the first (kept at 8 bits
in practice; listed for reference).

    .venv/bin/python benchmarks/bench_arm_estimate.py --out results/arm_estimate.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (name, in channels, out channels, kernel, stride, input size, occurrences in ResNet-18)
RESNET18_CONVS = (
    ("conv1", 3, 64, 7, 2, 224, 1),
    ("layer1 3x3", 64, 64, 3, 1, 56, 4),
    ("layer2.0 3x3/2", 64, 128, 3, 2, 56, 1),
    ("layer2 3x3", 128, 128, 3, 1, 28, 3),
    ("layer2.0 down 1x1/2", 64, 128, 1, 2, 56, 1),
    ("layer3.0 3x3/2", 128, 256, 3, 2, 28, 1),
    ("layer3 3x3", 256, 256, 3, 1, 14, 3),
    ("layer3.0 down 1x1/2", 128, 256, 1, 2, 28, 1),
    ("layer4.0 3x3/2", 256, 512, 3, 2, 14, 1),
    ("layer4 3x3", 512, 512, 3, 1, 7, 3),
    ("layer4.0 down 1x1/2", 256, 512, 1, 2, 14, 1),
)
BITS = ((1, 1), (2, 2), (4, 4))


@dataclass(frozen=True)
class Row:
    core: str
    layer: str
    count: int
    weight_bits: int
    act_bits: int
    macs: int
    estimate_us: float
    popcount_ceiling_us: float
    int8_ceiling_us: float

    @property
    def efficiency(self) -> float:
        return self.popcount_ceiling_us / self.estimate_us


def host_cpu() -> str:
    """The host's CPU model (this benchmark runs nothing on it, but results are reported with it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def geometry(cin: int, cout: int, k: int, stride: int, size: int, wb: int, ab: int) -> Any:
    from fxquant.backends.tvm.kernels.geometry import BitserialGeometry

    pad = k // 2
    return BitserialGeometry(1, cin, size, size, cout, k, k, (stride, stride), (1, 1), (pad,) * 4, ab, wb, True)


def run(cores: list[str]) -> tuple[list[Row], dict[str, Any]]:
    from fxquant.backends.tvm import arm_estimate as est

    rows: list[Row] = []
    loops = {}
    for core in cores:
        hot = est.hot_loop(core)
        loops[core] = {
            "method": hot.method,
            "cycles_per_iteration": hot.cycles,
            "one_bit_macs_per_iteration": hot.ones_per_iteration,
            "instructions": len(hot.loop.body),
            "stack_accesses": len(hot.loop.stack_accesses),
            "efficiency": est.hot_loop_efficiency(core),
        }
        for wb, ab in BITS:
            for name, cin, cout, k, stride, size, count in RESNET18_CONVS:
                geom = geometry(cin, cout, k, stride, size, wb, ab)
                macs = geom.bit_ops // (wb * ab)
                rows.append(Row(
                    core, name, count, wb, ab, macs,
                    est.estimate_bitserial_us(core, macs, wb, ab, geom),
                    est.popcount_ceiling_us(core, macs, wb, ab),
                    est.int8_ceiling_us(core, macs),
                ))
    return rows, loops


def totals(rows: list[Row]) -> dict[tuple[str, int, int], tuple[float, float, float]]:
    """(core, wb, ab) -> summed (estimate, popcount ceiling, int8 ceiling) over every conv but conv1."""
    out: dict[tuple[str, int, int], tuple[float, float, float]] = {}
    for r in rows:
        if r.layer == "conv1":
            continue
        key = (r.core, r.weight_bits, r.act_bits)
        e, p, i = out.get(key, (0.0, 0.0, 0.0))
        out[key] = (e + r.count * r.estimate_us, p + r.count * r.popcount_ceiling_us, i + r.count * r.int8_ceiling_us)
    return out


def table(rows: list[Row], loops: dict[str, Any]) -> str:
    from fxquant.backends.tvm.arm_cores import ARM_CORES

    lines = []
    sums = totals(rows)
    for core in dict.fromkeys(r.core for r in rows):
        info, spec = loops[core], ARM_CORES[core]
        lines.append(
            f"\n{core}: {spec.clock_ghz} GHz, ceilings {spec.popcount_ones_per_cycle:g} one-bit / "
            f"{spec.int8_macs_per_cycle:g} int8 MACs per cycle; hot loop {info['cycles_per_iteration']:.2f} cycles "
            f"per {info['one_bit_macs_per_iteration']} one-bit MACs = {info['efficiency']:.1%} of the ceiling, "
            f"{info['stack_accesses']} stack accesses ({info['method']})"
        )
        head = f"{'layer':<20} {'x':>2} {'MMACs':>7}"
        for wb, ab in BITS:
            head += f" | W{wb}A{ab} {'est us':>8} {'ceil':>7} {'eff':>5}"
        head += f" | {'int8 us':>8}"
        lines += [head, "-" * len(head)]
        for name, *_ in RESNET18_CONVS:
            mine = {(r.weight_bits, r.act_bits): r for r in rows if r.core == core and r.layer == name}
            first = next(iter(mine.values()))
            line = f"{name:<20} {first.count:>2} {first.macs / 1e6:>7.1f}"
            for bits in BITS:
                r = mine[bits]
                line += f" |      {r.estimate_us:>8.1f} {r.popcount_ceiling_us:>7.1f} {r.efficiency:>5.0%}"
            lines.append(line + f" | {first.int8_ceiling_us:>8.1f}")
        line = f"{'total (no conv1)':<20} {'':>2} {'':>7}"
        int8 = 0.0
        for wb, ab in BITS:
            e, p, int8 = sums[(core, wb, ab)]
            line += f" |      {e:>8.0f} {p:>7.0f} {p / e:>5.0%}"
        lines.append(line + f" | {int8:>8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fxquant.backends.tvm import arm_estimate as est
    from fxquant.backends.tvm.arm_cores import ARM_CORES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--cores", nargs="*", default=list(ARM_CORES), choices=list(ARM_CORES))
    args = parser.parse_args(argv)

    mca = est.llvm_mca_path()
    print(f"host: {host_cpu()} ({platform.machine()}); nothing runs on it: static model, one aarch64 thread")
    print(f"llvm-mca: {mca or 'absent (static instruction counts instead)'}")
    rows, loops = run(args.cores)
    print(table(rows, loops))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sums = totals(rows)
        payload = {
            "host_cpu": host_cpu(),
            "llvm_mca": mca,
            "hot_loops": loops,
            "layers": [{**r.__dict__, "efficiency": r.efficiency} for r in rows],
            "totals_without_conv1": [
                {"core": c, "weight_bits": wb, "act_bits": ab, "estimate_us": e, "popcount_ceiling_us": p,
                 "int8_ceiling_us": i, "efficiency": p / e}
                for (c, wb, ab), (e, p, i) in sums.items()
            ],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
