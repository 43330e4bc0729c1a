"""Where a compiled ResNet-18 spends its time: every Relax VM call of the ``tvm-llvm`` module, timed and grouped.

The end-to-end benchmark (``bench_resnet18_e2e.py``) gives one number per bit-width; this one splits it into
the conv kernels (bit-serial, dot, direct), the fused elementwise functions around them (input quantize,
rescale, residual add, ReLU), pooling and the VM's own allocations. Each call is timed with the VM's
instrument hook (``VirtualMachine.set_instrument``), so the sum runs a little above an uninstrumented call.
Names are grouped by replacing digits with ``#`` (``bitserial_layer1_0_conv1`` -> ``bitserial_layer#_#_conv#``).

    .venv/bin/python benchmarks/profile_resnet18_ops.py --configs w1a1 w2a2 w8a8 --out runs/ops.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _end_to_end_benchmark() -> Any:
    """``bench_resnet18_e2e.py`` as a module: the same model and host report as the end-to-end table."""
    path = Path(__file__).resolve().parent / "bench_resnet18_e2e.py"
    spec = importlib.util.spec_from_file_location("_fxquant_bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _category(group: str) -> str:
    for prefix, name in (("bitserial_", "bit-serial conv"), ("dot_", "dot conv"), ("direct_", "direct conv"),
                         ("vm.builtin", "VM allocation"), ("max_pool", "pooling"), ("adaptive_avg", "pooling")):
        if group.startswith(prefix):
            return name
    return "elementwise (quantize, rescale, add, relu)"


def profile(module: Any, x: torch.Tensor, runs: int) -> dict[str, dict[str, float]]:
    """``{group: {"ms": per call, "calls": per call}}`` over ``runs`` instrumented calls after 3 plain ones."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(module.executable, tvm.cpu())
    arg = tvm.runtime.tensor(np.ascontiguousarray(x.numpy()))
    for _ in range(3):
        vm["main"](arg)
    started: dict[str, float] = {}
    totals: dict[str, list[float]] = {}

    def instrument(_func: Any, name: str, before_run: bool, _ret: Any, *_args: Any) -> int:
        now = time.perf_counter()
        if before_run:
            started[str(name)] = now
        else:
            entry = totals.setdefault(re.sub(r"\d+", "#", str(name)), [0.0, 0])
            entry[0] += now - started.pop(str(name), now)
            entry[1] += 1
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](arg)
    return {g: {"ms": 1000 * t / runs, "calls": n / runs} for g, (t, n) in totals.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["w1a1", "w2a2", "w4a4", "w8a8"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="groups printed per config")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import fxquant

    e2e = _end_to_end_benchmark()
    host = e2e._load_host()
    info = host.host_info()
    host.print_host(info)
    torch.manual_seed(0)
    model, x = e2e._model(args.size), torch.randn(1, 3, args.size, args.size)
    results: dict[str, Any] = {"host": info, "settings": vars(args) | {"out": str(args.out)},
                               "configs": {}}
    for name in args.configs:
        w, a = (int(v) for v in re.fullmatch(r"w(\d)a(\d)", name).groups())
        cfg = fxquant.QuantConfig(quantizer="dsq", weight_bits=w, act_bits=a, first_last_bits=8)
        module = fxquant.convert(fxquant.prepare(model, (x,), cfg).eval(), backend="tvm-llvm",
                                 num_threads=args.threads)
        groups = profile(module, x, args.runs)
        categories: dict[str, float] = {}
        for group, row in groups.items():
            categories[_category(group)] = categories.get(_category(group), 0.0) + row["ms"]
        total = sum(categories.values())
        print(f"\n{name}: {total:.2f} ms per instrumented call, {args.threads} thread(s), {args.runs} runs")
        for category, ms in sorted(categories.items(), key=lambda kv: -kv[1]):
            print(f"  {category:<44} {ms:7.2f} ms  {100 * ms / total:5.1f} %")
        print("  top functions:")
        for group, row in sorted(groups.items(), key=lambda kv: -kv[1]["ms"])[: args.top]:
            print(f"    {row['ms']:7.3f} ms  {row['calls']:4.0f} calls  {group}")
        results["configs"][name] = {"total_ms": total, "categories_ms": categories, "functions": groups}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
