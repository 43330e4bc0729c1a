"""Every torchvision classifier through prepare -> convert("torch") -> convert("tvm-llvm"): lowered or not and why.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights, batch norms
calibrated on two random batches): ``prepare`` (DSQ, W2A2 by default) with its seconds, the integer
reference, the TVM build with its seconds, whether every integer layer's accumulator equals the reference's,
the largest output difference, and the latency of the TVM module, of PyTorch fp32 and of torch.ao int8 (FX
graph mode, ``x86`` qconfig; "n/a" with the reason where torch.ao cannot quantize the model). Each model
runs in its own process (a crash or a timeout costs that row only). Prints a table; ``--out`` writes JSON.

    .venv/bin/python benchmarks/bench_torchvision.py --size 64 --out runs/torchvision.json
    .venv/bin/python benchmarks/bench_torchvision.py --models resnet18 vit_b_16 --size 224
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

#: the input size each model needs at least (fixed-size position embeddings, or pooling below 1x1 otherwise)
MIN_SIZE = {"inception_v3": 75, "googlenet": 32, "alexnet": 63, "maxvit_t": 224}
FIXED_SIZE_PREFIXES = ("vit_",)  # positional embeddings for 224x224; the builder takes image_size=


def _calibrated(model: Any, size: int) -> Any:
    import torch

    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def _latency_ms(fn: Any, x: Any, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up (a shared host adds time, never removes it)."""
    import torch

    with torch.no_grad():
        fn(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 3)


def _torch_ao(model: Any, x: Any) -> Any:
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            prepared(x)
        return convert_fx(prepared)


def run_one(name: str, size: int, bits: int, repeats: int, cost_model: str) -> dict[str, Any]:
    """One model's row (runs in the worker process)."""
    import torch
    import torchvision

    import fxquant
    from fxquant.integer import IntegerLayer

    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith(FIXED_SIZE_PREFIXES) else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    model = _calibrated(torchvision.models.get_model(name, **kwargs), size)
    x = torch.randn(1, 3, size, size)
    row: dict[str, Any] = {"model": name, "size": size, "bits": bits}
    start = time.perf_counter()
    q = fxquant.prepare(model, (x,), fxquant.QuantConfig(quantizer="dsq", weight_bits=bits, act_bits=bits)).eval()
    row["prepare_s"] = round(time.perf_counter() - start, 2)
    ref = fxquant.convert(q, backend="torch")
    start = time.perf_counter()
    try:
        mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, cost_model=cost_model)
    except fxquant.FxQuantError as exc:
        row.update(lowered=False, why=str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:3]))
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    seen: dict[str, Any] = {}
    hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: seen.__setitem__(n, a[0]))
             for n, m in ref.named_modules() if isinstance(m, IntegerLayer)]
    with torch.no_grad():
        want = ref(x)
    for hook in hooks:
        hook.remove()
    out, accs = mod.run_with_accumulators(x)
    differing = 0
    for layer_name, acc in accs.items():
        layer = ref.get_submodule(layer_name)
        expected = layer.accumulate(layer.input_values(layer.input_codes(seen[layer_name])))
        differing += int((acc.to(torch.int64) != expected).sum())
    kernels = mod.manifest["kernel_counts"]
    row.update(lowered=True, why="", exact=differing == 0, differing_accumulators=differing,
               max_diff=float((out - want).abs().max()), top1_equal=bool(torch.equal(out.argmax(1), want.argmax(1))),
               kernels=kernels)
    row["tvm_ms"] = _latency_ms(mod, x, repeats)
    row["fp32_ms"] = _latency_ms(model, x, repeats)
    try:
        row["ao_int8_ms"] = _latency_ms(_torch_ao(model, x), x, repeats)
    except Exception as exc:  # torch.ao FX cannot quantize every model (e.g. its tracing, attention modules)
        row["ao_int8_ms"] = None
        row["ao_why"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


def _size_for(name: str, size: int) -> int:
    return max(size, MIN_SIZE.get(name, 0))


def _worker(args: argparse.Namespace) -> int:
    row = run_one(args.worker, args.size, args.bits, args.repeats, args.cost_model)
    print("ROW " + json.dumps(row), flush=True)
    return 0


def _spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    size = _size_for(name, args.size)
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--bits", str(args.bits),
           "--repeats", str(args.repeats), "--cost-model", args.cost_model]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "lowered": False, "why": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            row = json.loads(line[4:])
            row["wall_s"] = round(time.perf_counter() - start, 1)
            return row
    tail = [ln for ln in (done.stderr or "").splitlines() if ln.strip() and "Warning" not in ln]
    why = next((ln for ln in tail if "ERROR" in ln or "Error" in ln), tail[-1] if tail else "no output")
    return {"model": name, "size": size, "lowered": False, "why": f"exit {done.returncode}: {why[:200]}"}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("model", "size", "lowered", "exact", "max diff", "prepare s", "compile s", "tvm ms", "fp32 ms",
            "ao int8 ms")
    print(" | ".join(head))
    for r in rows:
        if not r.get("lowered"):
            print(f"{r['model']} | {r.get('size')} | no: {r.get('why', '')}")
            continue
        ao = r["ao_int8_ms"] if r.get("ao_int8_ms") is not None else "n/a"
        print(" | ".join(str(v) for v in (r["model"], r["size"], "yes", r["exact"], f"{r['max_diff']:.2e}",
                                          r["prepare_s"], r["compile_s"], r["tvm_ms"], r["fp32_ms"], ao)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="default: every classifier in torchvision.models")
    parser.add_argument("--size", type=int, default=224, help="input height and width (raised where a model needs)")
    parser.add_argument("--bits", type=int, default=2, help="weight and activation bits (DSQ)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per latency (the fastest is kept)")
    parser.add_argument("--cost-model", default="model", choices=("model", "measure"), help="kernel choice")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--out", type=Path, help="write the rows and the host as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    import torchvision

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _host import host_info, print_host

    from fxquant.io.output_files import write_text_atomic

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    host = host_info()
    print_host(host)
    rows = []
    for name in names:
        rows.append(_spawn(name, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.out, json.dumps({"host": host, "rows": rows}, indent=2) + "\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
