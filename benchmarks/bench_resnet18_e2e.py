"""End-to-end ResNet-18 latency: fxquant ``tvm-llvm`` at several bitwidths against the int8 peers and fp32.

Contenders, all in this one process on the same input: PyTorch fp32 eager; torch.ao int8 (FX graph mode,
``x86`` qconfig); onnxruntime int8 (QDQ, per-channel weights, static calibration); and fxquant ``tvm-llvm`` for
each ``--configs`` entry ``wWaA`` (inner layers W-bit weights and A-bit activations, first and last layer
8-bit). The model has random weights (nothing pretrained is available offline; latency does not depend on the
values) but real batch-norm statistics. Timing is interleaved: after ``--warmup`` untimed calls of each, every
round times one call of each contender in turn (the start rotates from round to round), ``--rounds`` rounds;
the table gives the median and the minimum per contender and, for every row, the speed-up against the faster
of the two int8 peers (above 1: faster than both). The whole table runs once per ``--threads`` entry.

    .venv/bin/python benchmarks/bench_resnet18_e2e.py --out runs/bench_e2e.json
    .venv/bin/python benchmarks/bench_resnet18_e2e.py --quick --per-layer
    .venv/bin/python benchmarks/bench_resnet18_e2e.py --threads 1 --configs w2a2 --kernel 'layer4.*=dot'

onnxruntime and onnx come with the ``bench`` extra (``pip install -e .[bench]``); without them that row is
skipped. Every fxquant module is checked against ``convert(backend="torch")`` (max |diff|, top-1 equality).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

__all__ = ["main", "parse_config", "parse_kernel"]

DEFAULT_CONFIGS = ("w1a1", "w1a2", "w2a2", "w3a3", "w4a4", "w8a8")
QUICK_CONFIGS = ("w1a1", "w4a4")
CALIBRATION_BATCHES = 8
FP32, TORCH_AO, ORT = "PyTorch fp32 eager", "torch.ao int8", "onnxruntime int8"


def _load_host() -> Any:
    """``benchmarks/_host.py`` whether this file runs as a script or is imported from elsewhere."""
    path = Path(__file__).resolve().parent / "_host.py"
    spec = importlib.util.spec_from_file_location("_fxquant_bench_host", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(text: str) -> tuple[int, int]:
    """``"w2a4"`` -> ``(2, 4)``."""
    match = re.fullmatch(r"w(\d)a(\d)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected wWaA, e.g. w2a2")
    return int(match.group(1)), int(match.group(2))


def parse_kernel(text: str) -> str | dict[str, str]:
    """A kernel family (``auto``, ``bitserial``, ``dot``, ``direct``), ``glob=family,...`` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        return dict(json.loads(text))
    if "=" in text:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        return {key.strip(): value.strip() for key, value in pairs}
    return text


def _error(exc: BaseException) -> dict[str, str]:
    tail = traceback.format_exception(exc)[-3:]
    return {"error": f"{type(exc).__name__}: {exc}", "traceback_tail": "".join(tail)[-2000:]}


def _model(size: int) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=1000)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))  # real batch-norm statistics, so the folded model is sane
    return model.eval()


def _agreement(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    got, want = got.float(), want.float()
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "max_abs_reference": float(want.abs().max()),
        "top1_equal": bool(torch.equal(got.argmax(1), want.argmax(1))),
    }


# ---------------------------------------------------------------------------------------------- the int8 peers


def build_torch_ao(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor]) -> tuple[Any, dict]:
    """torch.ao FX graph mode int8 with the ``x86`` qconfig mapping, calibrated on ``calib``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    info: dict[str, Any] = {"qconfig_mapping": "x86"}
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    info["engine"] = torch.backends.quantized.engine
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao announces its deprecation on every call
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        quantized = convert_fx(prepared)
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    return quantized, info


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of batches (subclassed lazily below)."""

    def __init__(self, name: str, batches: list[torch.Tensor]):
        self._items = iter([{name: b.numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def build_ort_model(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor], workdir: Path) -> tuple[
        Path, dict]:
    """Export to ONNX, pre-process, and quantize (QDQ, per-channel QInt8 weights, QUInt8 activations)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    info: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "export_attempts": []}
    fp32_path = workdir / "resnet18.onnx"
    start = time.perf_counter()
    for label, kwargs in (("torchscript (dynamo=False)", {"dynamo": False, "opset_version": 17}),
                          ("dynamo (dynamo=True)", {"dynamo": True})):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(fp32_path), input_names=["input"], output_names=["output"],
                                  **kwargs)
            info["exporter"] = label
            info["export_attempts"].append({"exporter": label, "ok": True})
            break
        except Exception as exc:
            info["export_attempts"].append({"exporter": label, "ok": False, **_error(exc)})
    else:
        raise RuntimeError("no ONNX exporter worked: " + "; ".join(a["error"] for a in info["export_attempts"]))
    info["export_seconds"] = round(time.perf_counter() - start, 2)

    source = fp32_path
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre_path = workdir / "resnet18.pre.onnx"
        quant_pre_process(str(fp32_path), str(pre_path))
        source, info["pre_process"] = pre_path, "quant_pre_process"
    except Exception as exc:  # optional step: quantize the plain export instead
        info["pre_process"] = {"skipped": True, **_error(exc)}

    reader_cls = type("CalibReader", (_Reader, CalibrationDataReader), {})
    int8_path = workdir / "resnet18.int8.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(source), str(int8_path), reader_cls("input", calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    info["quantize_seconds"] = round(time.perf_counter() - start, 2)
    info.update(quant_format="QDQ", per_channel=True, activation_type="QUInt8", weight_type="QInt8",
                calibration_batches=len(calib), onnx_bytes=fp32_path.stat().st_size,
                onnx_int8_bytes=int8_path.stat().st_size)
    return int8_path, info


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------- fxquant


def convert_tvm(qmodel: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``fxquant.convert(qmodel, backend="tvm-llvm", **options)``, dropping options this fxquant does not know
    yet (a TypeError or ConfigError naming them as unknown) and saying which were dropped."""
    import fxquant

    opts, dropped = dict(options), {}
    while True:
        try:
            start = time.perf_counter()
            mod = fxquant.convert(qmodel, backend="tvm-llvm", **opts)
            return mod, {"options_passed": opts, "options_dropped": dropped,
                         "compile_seconds": round(time.perf_counter() - start, 2)}
        except (TypeError, fxquant.ConfigError) as exc:
            text = str(exc)
            unknown = "unknown" in text.lower() or "unexpected keyword" in text.lower()
            named = text.lower().split("allowed")[0]  # ConfigError lists what is allowed after the unknown keys
            culprits = [key for key in opts if re.search(rf"\b{re.escape(key)}\b", named)]
            if not (unknown and culprits):
                raise
            for key in culprits:
                dropped[key] = f"{type(exc).__name__}: {text}"
                del opts[key]


def layer_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's per-layer facts that matter here (cost estimates only where the manifest has them)."""
    rows = []
    for layer in manifest.get("layers", []):
        row = {key: layer.get(key) for key in ("name", "kernel", "macs", "weight_bits", "act_bits")}
        for key in ("estimate_us", "kernel_costs_us"):
            if key in layer:
                row[key] = layer[key]
        rows.append(row)
    return rows


def _pool_threads() -> int | None:
    import tvm

    get = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    return int(get()) if get is not None else None


def _set_pool(threads: int) -> None:
    """Resize the calling thread's TVM pool (threads share the process's CPUs; affinity left as it was)."""
    import tvm

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpus = sorted(affinity) if affinity else range(os.cpu_count() or 1)
    tvm.get_global_func("runtime.config_threadpool")(-3, threads, [str(c) for c in cpus])
    if affinity and os.sched_getaffinity(0) != affinity:
        os.sched_setaffinity(0, affinity)


# ------------------------------------------------------------------------------------------------------ timing


@dataclass
class Contender:
    name: str
    kind: str  # "fp32" | "peer" | "fxquant"
    fn: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)


def interleave(contenders: list[Contender], rounds: int, warmup: int, pause_s: float,
               before_timing: Callable[[], None] | None = None) -> None:
    """Round-robin: ``warmup`` untimed rounds, then ``rounds`` timed ones; the first contender rotates."""
    n = len(contenders)
    for _ in range(warmup):
        for c in contenders:
            c.fn()
    if before_timing is not None:
        before_timing()
    for r in range(rounds):
        for i in range(n):
            c = contenders[(r + i) % n]
            if pause_s:
                time.sleep(pause_s)  # lets the previous library's spinning workers go idle
            start = time.perf_counter()
            c.fn()
            c.samples.append(time.perf_counter() - start)


def _fmt_counts(counts: dict[str, int] | None) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items()) if counts else ""


def print_table(threads: int, rows: list[dict[str, Any]], header: str) -> None:
    print(f"\n{header}, {threads} thread(s)")
    cols = ("contender", "median ms", "min ms", "vs best int8", "vs fp32", "kernels / notes")
    table = [cols]
    for row in rows:
        if "median_ms" not in row:
            table.append((row["contender"], "-", "-", "-", "-", row.get("skipped") or row.get("error", "")))
            continue
        ratio = row.get("speedup_vs_best_int8_peer")
        note = _fmt_counts(row.get("kernel_counts"))
        if "exactness" in row:
            ex = row["exactness"]
            note += f"  |diff| {ex['max_abs_diff']:.3g} top1 {'==' if ex['top1_equal'] else '!='}"
        table.append((row["contender"], f"{row['median_ms']:.2f}", f"{row['min_ms']:.2f}",
                      f"{ratio:.2f}x" if ratio else "-", f"{row['speedup_vs_fp32']:.2f}x", note.strip()))
    widths = [max(len(str(r[i])) for r in table) for i in range(5)]
    for k, r in enumerate(table):
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(r[1:5], widths[1:], strict=True)]
        print("  " + "  ".join(cells) + "  " + str(r[5]))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths) + "  " + "-" * 15)


def print_layers(name: str, per_threads: dict[int, list[dict[str, Any]]]) -> None:
    """One config's per-layer table: MACs, bits, and the kernel (and estimate, if any) per thread count."""
    counts = list(per_threads)
    base = per_threads[counts[0]]
    has_est = any("estimate_us" in r or "kernel_costs_us" in r for rows in per_threads.values() for r in rows)
    head = ["layer", "MACs", "W/A"]
    for t in counts:
        head.append(f"kernel@{t}t")
        if has_est:
            head.append(f"est us@{t}t")
    table = [head]
    for i, layer in enumerate(base):
        bits = f"{layer['weight_bits']}/{layer['act_bits']}" if layer.get("weight_bits") is not None else "float"
        macs = f"{layer['macs'] / 1e6:.1f}M" if isinstance(layer.get("macs"), int | float) else "-"
        row = [layer["name"], macs, bits]
        for t in counts:
            other = per_threads[t][i] if i < len(per_threads[t]) else {}
            row.append(str(other.get("kernel", "-")))
            if has_est:
                est = other.get("estimate_us")
                costs = other.get("kernel_costs_us")
                text = f"{est:.1f}" if isinstance(est, int | float) else "-"
                if isinstance(costs, dict) and costs:
                    text += " (" + " ".join(f"{k}={v:.1f}" if isinstance(v, int | float) else f"{k}={v}"
                                            for k, v in costs.items()) + ")"
                row.append(text)
        table.append(row)
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    print(f"\nper-layer: fxquant {name}")
    for r in table:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="input height and width (default 224; --quick 112)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20; --quick 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each contender first")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help=f"thread counts, one table each (default 1 and {os.cpu_count()})")
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"fxquant wWaA configs (default {' '.join(DEFAULT_CONFIGS)}; --quick "
                             f"{' '.join(QUICK_CONFIGS)})")
    parser.add_argument("--kernel", type=parse_kernel, default="auto",
                        help="fxquant kernel: auto|bitserial|dot|direct, or 'glob=kind,...', or a JSON object")
    parser.add_argument("--cost-model", choices=("measure", "model"), default=None,
                        help="fxquant cost model for kernel=auto (default: not passed, fxquant's default)")
    parser.add_argument("--pause-ms", type=float, default=10.0, help="idle time before each timed call")
    parser.add_argument("--calib-batches", type=int, default=CALIBRATION_BATCHES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-layer", action="store_true", help="print each fxquant config's per-layer table")
    parser.add_argument("--quick", action="store_true", help="smoke run: size 112, 5 rounds, configs w1a1 w4a4")
    parser.add_argument("--out", type=Path, default=None, help="write every result as JSON here")
    args = parser.parse_args(argv)
    size = args.size or (112 if args.quick else 224)
    rounds = args.rounds or (5 if args.quick else 20)
    config_names = [c.lower() for c in (args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS))]
    configs = {name: parse_config(name) for name in config_names}
    thread_counts = list(dict.fromkeys(args.threads or [1, os.cpu_count() or 1]))

    # TVM sizes its pool from TVM_NUM_THREADS when first imported: set it before anything imports TVM.
    tvm_imported_early = "tvm" in sys.modules
    os.environ["TVM_NUM_THREADS"] = str(max(thread_counts))
    import fxquant

    host = _load_host()
    info = host.host_info()
    host.print_host(info)

    torch.manual_seed(args.seed)
    model = _model(size)
    x = torch.randn(args.batch, 3, size, size)
    calib = [torch.randn(args.batch, 3, size, size) for _ in range(args.calib_batches)]
    with torch.inference_mode():
        fp32_out = model(x)

    results: dict[str, Any] = {
        "benchmark": "resnet18_e2e",
        "command": [sys.executable, *sys.argv] if argv is None else ["main", *argv],
        "host": info,
        "settings": {
            "model": "resnet18 (torchvision, num_classes=1000, random weights, real BN statistics)",
            "input_shape": list(x.shape), "rounds": rounds, "warmup": args.warmup, "threads": thread_counts,
            "configs": config_names, "first_last_bits": 8, "quantizer": "dsq", "kernel": args.kernel,
            "cost_model": args.cost_model, "pause_ms": args.pause_ms, "calibration_batches": args.calib_batches,
            "seed": args.seed, "tvm_num_threads_env": os.environ["TVM_NUM_THREADS"],
            "tvm_imported_before_env_set": tvm_imported_early, "order": "round-robin, start rotated per round",
        },
        "peers": {},
        "fxquant": {},
        "tables": [],
    }

    # ---- int8 peers (built once; the thread count only matters at run time)
    ao_model = None
    try:
        ao_model, ao_info = build_torch_ao(model, x, calib)
        with torch.inference_mode():
            ao_info["agreement_with_fp32"] = _agreement(ao_model(x), fp32_out)
        results["peers"]["torch_ao"] = {"status": "ok", **ao_info}
    except Exception as exc:
        results["peers"]["torch_ao"] = {"status": "error", **_error(exc)}
        print(f"torch.ao int8 unavailable: {type(exc).__name__}: {exc}")

    tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_")
    ort_path = None
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        results["peers"]["onnxruntime"] = {"status": "skipped", "reason": "onnxruntime/onnx not installed "
                                           "(pip install onnxruntime onnx, or the 'bench' extra)"}
        print("onnxruntime int8 skipped: onnxruntime/onnx not installed (pip install onnxruntime onnx)")
    else:
        try:
            ort_path, ort_info = build_ort_model(model, x, calib, Path(tmp.name))
            sess = ort_session(ort_path, 1)
            ort_out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
            ort_info["agreement_with_fp32"] = _agreement(ort_out, fp32_out)
            results["peers"]["onnxruntime"] = {"status": "ok", **ort_info}
            del sess
        except Exception as exc:
            results["peers"]["onnxruntime"] = {"status": "error", **_error(exc)}
            print(f"onnxruntime int8 failed: {type(exc).__name__}: {exc}")

    # ---- fxquant: prepare each config once, and its integer-exact torch reference output
    qmodels: dict[str, Any] = {}
    for name, (w, a) in configs.items():
        entry: dict[str, Any] = {"weight_bits": w, "act_bits": a, "first_last_bits": 8, "per_threads": {}}
        results["fxquant"][name] = entry
        try:
            start = time.perf_counter()
            cfg = fxquant.QuantConfig(quantizer="dsq", weight_bits=w, act_bits=a, first_last_bits=8)
            qmodels[name] = fxquant.prepare(model, (x,), cfg).eval()
            entry["prepare_seconds"] = round(time.perf_counter() - start, 2)
            print(f"fxquant {name}: prepared in {entry['prepare_seconds']:.1f} s", flush=True)
            with torch.no_grad():
                entry["reference_output"] = fxquant.convert(qmodels[name], backend="torch")(x)
        except Exception as exc:
            entry.update(status="error", **_error(exc))
            print(f"fxquant {name}: prepare failed: {type(exc).__name__}: {exc}")

    base_options: dict[str, Any] = {"kernel": args.kernel}
    if args.cost_model is not None:
        base_options["cost_model"] = args.cost_model
    reusable: dict[str, Any] = {}  # modules built without num_threads serve every thread count
    layer_tables: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in configs}

    for threads in thread_counts:
        torch.set_num_threads(threads)
        contenders = [Contender(FP32, "fp32", lambda: _torch_call(model, x))]
        skipped_rows: list[dict[str, Any]] = []
        if ao_model is not None:
            contenders.append(Contender(TORCH_AO, "peer", lambda m=ao_model: _torch_call(m, x)))
        else:
            skipped_rows.append({"contender": TORCH_AO, "error": results["peers"]["torch_ao"].get("error")})
        if ort_path is not None:
            sess = ort_session(ort_path, threads)
            feed = {"input": x.numpy()}
            contenders.append(Contender(ORT, "peer", lambda s=sess, f=feed: s.run(None, f)))
        else:
            peer = results["peers"].get("onnxruntime", {})
            skipped_rows.append({"contender": ORT, "skipped": peer.get("reason") or peer.get("error")})

        for name in configs:
            entry = results["fxquant"][name]
            if name not in qmodels:
                skipped_rows.append({"contender": f"fxquant {name}", "error": entry.get("error")})
                continue
            label = f"fxquant {name}"
            try:
                if name in reusable:
                    mod, conv = reusable[name]
                    conv = {**conv, "reused_from_first_thread_count": True}
                else:
                    mod, conv = convert_tvm(qmodels[name], {**base_options, "num_threads": threads})
                    dropped = f" (dropped, not supported yet: {', '.join(conv['options_dropped'])})" \
                        if conv["options_dropped"] else ""
                    print(f"{label}: converted for {threads} thread(s) in {conv['compile_seconds']:.1f} s{dropped}",
                          flush=True)
                    if "num_threads" not in conv["options_passed"]:
                        reusable[name] = (mod, conv)
                got = mod(x)
                rec = {**conv, "exactness": _agreement(got, entry["reference_output"]),
                       "kernel_counts": dict(mod.manifest.get("kernel_counts", {})),
                       "layers": layer_rows(mod.manifest), "build_seconds": mod.manifest.get("build_seconds")}
                entry["per_threads"][str(threads)] = rec
                layer_tables[name][threads] = rec["layers"]
                contenders.append(Contender(label, "fxquant", lambda m=mod: m(x), rec))
            except Exception as exc:
                entry["per_threads"][str(threads)] = {"status": "error", **_error(exc)}
                skipped_rows.append({"contender": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{label}: convert failed at {threads} thread(s): {type(exc).__name__}: {exc}")

        pool: dict[str, Any] = {}

        def settle_pool(threads: int = threads, pool: dict[str, Any] = pool, cs: list = contenders) -> None:
            """After warmup: make sure TVM's pool has ``threads`` workers (fxquant may not set it itself)."""
            if not any(c.kind == "fxquant" for c in cs):
                return
            pool["after_warmup"] = _pool_threads()
            if pool["after_warmup"] is not None and pool["after_warmup"] != threads:
                _set_pool(threads)
                pool["set_by_benchmark"] = True
            pool["timed_with"] = _pool_threads()

        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(f"timing {len(contenders)} contenders at {threads} thread(s): {args.warmup} warmup + {rounds} rounds",
              flush=True)
        start = time.perf_counter()
        interleave(contenders, rounds, args.warmup, args.pause_ms / 1e3, settle_pool)
        wall = time.perf_counter() - start
        if any(c.kind == "fxquant" for c in contenders):
            pool["after_timing"] = _pool_threads()

        medians = {c.name: statistics.median(c.samples) for c in contenders}
        peers = [medians[c.name] for c in contenders if c.kind == "peer"]
        best_peer = min(peers) if peers else None
        rows = []
        for c in contenders:
            med = medians[c.name]
            row: dict[str, Any] = {
                "contender": c.name, "kind": c.kind, "median_ms": med * 1e3, "min_ms": min(c.samples) * 1e3,
                "speedup_vs_best_int8_peer": best_peer / med if best_peer else None,
                "speedup_vs_fp32": medians[FP32] / med, "samples_ms": [s * 1e3 for s in c.samples],
            }
            if c.kind == "fxquant":
                row["kernel_counts"] = c.info["kernel_counts"]
                row["exactness"] = c.info["exactness"]
            rows.append(row)
        rows.extend(skipped_rows)
        best_name = None
        if best_peer is not None:
            best_name = next(c.name for c in contenders if c.kind == "peer" and medians[c.name] == best_peer)
        results["tables"].append({
            "threads": threads, "rows": rows, "best_int8_peer": best_name, "tvm_pool": pool,
            "wall_seconds": round(wall, 1), "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        })
        header = (f"ResNet-18 {tuple(x.shape)}: median/min of {rounds} interleaved rounds after {args.warmup} "
                  f"warmup; best int8 peer: {best_name or 'none'}")
        print_table(threads, rows, header)
        if pool.get("set_by_benchmark"):
            print(f"  note: TVM's pool had {pool['after_warmup']} worker(s) after warmup although convert got "
                  f"num_threads={threads}; the benchmark resized it to {threads} before timing")
        dropped = sorted({k for c in results["fxquant"].values() for k in
                          c["per_threads"].get(str(threads), {}).get("options_dropped", {})})
        if dropped:
            print(f"  note: this fxquant does not take convert option(s) {', '.join(dropped)} yet; converted without")
        del contenders
        gc.collect()

    if args.per_layer:
        for name, per_threads in layer_tables.items():
            if per_threads:
                print_layers(name, per_threads)

    tmp.cleanup()
    for entry in results["fxquant"].values():
        entry.pop("reference_output", None)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
        print(f"\nwrote {args.out}")
    return results


def _torch_call(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


if __name__ == "__main__":
    main()
