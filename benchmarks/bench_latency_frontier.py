"""Accuracy vs latency on Fashion-MNIST ResNet-8: SDQ under latency budgets, uniform bit-widths, int8 peers.

One trained float model; every quantized row gets the same number of quantized training steps
(``--qat-steps``; SDQ spends ``--search-steps`` of them on the search, warm-starting the QAT from the search's
weights, as ``bench_sdq.py`` does). Rows:

- uniform W1/W2/W3/W4/W8 at A``--act-bits`` and W8A8 (DSQ, first and last layers at 8 bits everywhere);
- SDQ plans at ``--fractions`` of the way from the lowest achievable to the W8 kernel latency of the host
  table (``fxquant.Budget(latency_ms=..., target="host")``, kernels timed on this machine, one thread, batch 1);
- torch.ao (x86 qconfig) and onnxruntime (QDQ, per-channel) int8 post-training quantization of the float model.

Every fxquant row is converted with ``tvm-llvm`` (``num_threads=1``, batch 1) and timed end to end on one
input (fastest and median of ``--runs``); the table's estimate (sum of the chosen kernels' timed costs) is
reported next to the measured latency of the integer kernels and of the whole module. Accuracy is that of the
integer path (eval mode), which the TVM module reproduces exactly.

    nice .venv/bin/python benchmarks/bench_latency_frontier.py --out-dir runs/frontier     # small default run

Writes ``frontier.json`` and ``frontier.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx.passes.shape_prop import ShapeProp

import fxquant
from fxquant.data.fashion_mnist import fashion_mnist_loaders
from fxquant.sdq.search import _sdq_config, fixed_bits, latency_table
from fxquant.training.loop import evaluate


def _load(name: str) -> Any:
    """A sibling benchmark module, whether this file runs as a script or is imported."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fxquant_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench_sdq = _load("bench_sdq")
e2e = _load("bench_resnet18_e2e")
host = _load("_host")


@dataclass(frozen=True)
class FrontierSettings:
    float_epochs: int = 2
    qat_steps: int = 80
    search_steps: int = 30
    batch_size: int = 128
    train_subset: int | None = 10000
    test_subset: int | None = 2000
    lr: float = 0.1
    qat_lr: float = 0.01
    act_bits: int = 4
    min_bits: int = 1
    uniform: tuple[int, ...] = (1, 2, 3, 4, 8)
    fractions: tuple[float, ...] = (0.15, 0.4, 0.7)
    runs: int = 200
    seed: int = 0


def time_ms(fn: Any, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Fastest and median of ``runs`` single-input calls (after a warm-up)."""
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(x)
            samples.append((time.perf_counter() - start) * 1e3)
    return {"min_ms": round(min(samples), 4), "median_ms": round(statistics.median(samples), 4)}


def measure_fxquant(qmodel: torch.nn.Module, x1: torch.Tensor, runs: int) -> dict[str, Any]:
    """Convert at batch 1, one thread; the whole module's latency and the manifest's per-layer kernel choice."""
    qmodel = copy.deepcopy(qmodel).eval()
    ShapeProp(qmodel).propagate(x1)  # the compiled module's shapes: one sample
    module = fxquant.convert(qmodel, backend="tvm-llvm", num_threads=1)
    layers = [row for row in module.manifest["layers"] if "estimate_us" in row]
    return {**time_ms(module, x1, runs),
            "manifest_kernel_ms": round(sum(r["estimate_us"] for r in layers) / 1e3, 4),
            "kernels": {r["name"]: r["kernel"] for r in layers}}


def run(s: FrontierSettings, out_dir: Path, progress: bool) -> dict[str, Any]:
    train, test = fashion_mnist_loaders(s.batch_size, s.train_subset, s.test_subset, s.seed)
    bs = bench_sdq.BenchSettings(float_epochs=s.float_epochs, qat_steps=s.qat_steps, search_steps=s.search_steps,
                                 batch_size=s.batch_size, lr=s.lr, qat_lr=s.qat_lr, act_bits=s.act_bits, seed=s.seed)
    example = next(iter(train))[0]
    x1 = example[:1]
    float_model = bench_sdq.train_float(bs, train, progress)
    rows: list[dict[str, Any]] = [{"method": "float", "accuracy": evaluate(float_model, test),
                                   **time_ms(float_model, x1, s.runs)}]
    print(f"float: {rows[0]['accuracy']:.2f}%", flush=True)

    # the host table (also what every SDQ search below prices): built once, its timings cached on disk
    probe = fxquant.Budget(latency_ms=1.0, target="host", act_bits=s.act_bits, min_bits=s.min_bits)
    config = _sdq_config(fxquant.QuantConfig(quantizer="dsq"), probe, fxquant.SearchOptions())
    gm = fxquant.prepare(copy.deepcopy(float_model), (x1,), config)
    fixed_w, fixed_a = fixed_bits(gm, fxquant.QuantConfig(quantizer="dsq"), probe)
    t0 = time.perf_counter()
    table = latency_table(gm, probe, fixed_w, fixed_a, progress)
    table_s = time.perf_counter() - t0
    layers = list(table.latency_ms)

    def estimate(w: int, a: int) -> float:
        return table.total_ms({n: (fixed_w.get(n, w), fixed_a.get(n, a)) for n in layers})

    for w, a in [(w, s.act_bits) for w in s.uniform] + [(8, 8)]:
        name = f"uniform W{w}A{a}"
        cfg = fxquant.QuantConfig(quantizer="dsq", weight_bits=w, act_bits=a)
        qmodel = bench_sdq.qat(float_model, cfg, train, s.qat_steps, bs, progress, name)
        row = {"method": name, "accuracy": evaluate(qmodel, test)}
        if (w, a) != (8, 8) or a == s.act_bits:
            row["estimate_ms"] = estimate(w, a)
        row.update(measure_fxquant(qmodel, x1, s.runs))
        rows.append(row)
        print(f"{name}: {row['accuracy']:.2f}%  {row['min_ms']:.3f} ms", flush=True)

    lowest = table.total_ms({n: (fixed_w.get(n, s.min_bits), fixed_a.get(n, s.act_bits)) for n in layers})
    top = estimate(8, s.act_bits)
    for f in s.fractions:
        bound = round(lowest + f * (top - lowest), 5)
        budget = fxquant.Budget(latency_ms=bound, target="host", act_bits=s.act_bits, min_bits=s.min_bits)
        start_model = copy.deepcopy(float_model)
        try:
            plan = fxquant.search(start_model, (example,), train, budget, fxquant.QuantConfig(quantizer="dsq"),
                                  options=fxquant.SearchOptions(steps=s.search_steps, seed=s.seed),
                                  progress=progress, update_weights=True)
        except fxquant.BudgetError as exc:
            rows.append({"method": f"SDQ <= {bound:.4f} ms", "error": str(exc)})
            continue
        plan.save(out_dir / f"plan_{f:g}.json")
        qmodel = bench_sdq.qat(start_model, fxquant.QuantConfig(quantizer="dsq", plan=plan), train,
                               s.qat_steps - s.search_steps, bs, progress, f"sdq {f:g}")
        row = {"method": f"SDQ <= {bound:.4f} ms", "budget_ms": bound, "accuracy": evaluate(qmodel, test),
               "estimate_ms": plan.metadata["latency"]["estimate_ms"],
               "bits": {k: list(v) for k, v in plan.bits.items()}}
        row.update(measure_fxquant(qmodel, x1, s.runs))
        rows.append(row)
        print(f"{row['method']}: {row['accuracy']:.2f}%  est {row['estimate_ms']:.4f} ms  measured "
              f"{row['min_ms']:.3f} ms", flush=True)

    calib = [b[0][i:i + 1] for _, b in zip(range(2), train, strict=False) for i in range(8)]  # batch-1 models
    try:
        ao, info = e2e.build_torch_ao(float_model, x1, calib)
        rows.append({"method": "torch.ao int8", "accuracy": evaluate(ao, test), **time_ms(ao, x1, s.runs),
                     "info": info})
    except Exception as exc:  # a peer that cannot be built is reported, not fatal
        rows.append({"method": "torch.ao int8", "error": f"{type(exc).__name__}: {exc}"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path, info = e2e.build_ort_model(float_model.eval(), x1, calib, Path(tmp))
            session = e2e.ort_session(path, 1)
            name = session.get_inputs()[0].name
            rows.append({"method": "onnxruntime int8", **time_ms(lambda x: session.run(None, {name: x.numpy()}), x1,
                                                                 s.runs), "info": info})
    except Exception as exc:
        rows.append({"method": "onnxruntime int8", "error": f"{type(exc).__name__}: {exc}"})

    result = {"settings": asdict(s), "host": host.host_info(), "table": table.to_dict(), "table_seconds": table_s,
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "frontier.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    plot(rows, out_dir / "frontier.png")
    print_rows(rows)
    return result


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'method':<24}{'accuracy':>9}{'estimate':>10}{'kernels*':>10}{'min ms':>9}{'median':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<24} failed: {r['error'][:90]}")
            continue
        acc = f"{r['accuracy']:.2f}" if "accuracy" in r else "-"
        est = f"{r['estimate_ms']:.4f}" if "estimate_ms" in r else "-"
        ker = f"{r['manifest_kernel_ms']:.4f}" if "manifest_kernel_ms" in r else "-"
        print(f"{r['method']:<24}{acc:>9}{est:>10}{ker:>10}{r['min_ms']:>9.3f}{r['median_ms']:>9.3f}")
    print("* kernels: the converted module's own kernel estimates (manifest), for the estimate's cross-check")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"uniform": ("o", "tab:blue"), "SDQ": ("*", "tab:red"), "float": ("s", "black")}
    for r in rows:
        if "error" in r or "accuracy" not in r:
            if "min_ms" in r:
                ax.axvline(r["min_ms"], ls="--", color="gray")
                ax.annotate(r["method"], (r["min_ms"], 0.02), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=7, color="gray")
            continue
        kind = r["method"].split()[0]
        marker, color = styles.get(kind, ("^", "tab:green"))
        ax.scatter(r["min_ms"], r["accuracy"], marker=marker, color=color, s=60 if kind == "SDQ" else 30)
        ax.annotate(r["method"].replace("uniform ", ""), (r["min_ms"], r["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("latency, batch 1, one thread (ms, fastest of runs)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("ResNet-8: SDQ under latency budgets vs uniform bit-widths vs int8 peers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = FrontierSettings()
    p.add_argument("--float-epochs", type=int, default=d.float_epochs)
    p.add_argument("--qat-steps", type=int, default=d.qat_steps)
    p.add_argument("--search-steps", type=int, default=d.search_steps)
    p.add_argument("--train-subset", type=int, default=d.train_subset)
    p.add_argument("--test-subset", type=int, default=d.test_subset)
    p.add_argument("--fractions", type=float, nargs="+", default=list(d.fractions))
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and the peers")
    p.add_argument("--out-dir", type=Path, default=Path("runs/frontier"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = FrontierSettings(float_epochs=args.float_epochs, qat_steps=args.qat_steps, search_steps=args.search_steps,
                         train_subset=args.train_subset, test_subset=args.test_subset,
                         fractions=tuple(args.fractions), runs=args.runs, seed=args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    run(s, args.out_dir, not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
