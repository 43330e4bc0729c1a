"""QAT step time of every quantizer and of two peers (torch.ao QAT, Brevitas) against the float step, same run.

One training step (forward, cross-entropy, backward, SGD) of ResNet-8 (``fxquant.models.resnet_small``) on a
batch of 1×28×28 inputs: the float model, the model prepared by each fxquant scheme at ``--bits`` (first/last
layer 8-bit), torch.ao's ``prepare_qat_fx`` (default x86 QAT qconfig: 8-bit fake quant, conv-BN fused) and
Brevitas' ``quantize`` (its default int8 fake quant; skipped where Brevitas is not installed). Steps go round
robin over all the models and the medians are compared, so a noisy host slows all alike. Schedules sit at
mid-training (``update_schedules(model, 0.5)``: QN's temperature, DSQ's α).

    .venv/bin/python benchmarks/bench_step_time.py --threads 1
    .venv/bin/python benchmarks/bench_step_time.py --device cuda --batch 256 --steps 50

Prints a table and writes ``step_time.json`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _host import host_info, print_host
from torch import nn

import fxquant
from fxquant.models import resnet_small
from fxquant.placement import resolve_device

SCHEMES = ("ste", "dsq", "lsq", "qn", "lcq")


def _torch_ao(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def _brevitas(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Brevitas' documented graph flow: ``preprocess_for_quantize`` (traces, merges batch norm into the
    convolutions as fxquant folds it) then ``quantize``. ``quantize`` on a traced model with batch norms
    left in does not finish on this residual net (its residual handler loops)."""
    from brevitas.graph.quantize import preprocess_for_quantize, quantize  # ImportError: the peer is skipped

    return quantize(preprocess_for_quantize(copy.deepcopy(model).eval(), trace_model=True)).train()


#: peer name -> builder of its QAT model from the float model and an example batch
PEERS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {"torch.ao": _torch_ao, "brevitas": _brevitas}


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sync()
    return time.perf_counter() - t0


def build(args: argparse.Namespace, x: torch.Tensor) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    float_model = resnet_small(num_classes=10, in_channels=1).to(args.device)
    models: dict[str, nn.Module] = {"float": float_model}
    for scheme in args.schemes:
        config = fxquant.QuantConfig(quantizer=scheme, weight_bits=args.bits, act_bits=args.bits)
        quant = fxquant.prepare(float_model.cpu(), (x.cpu(),), config).to(args.device)
        fxquant.update_schedules(quant, 0.5)
        models[scheme] = quant
    float_model.to(args.device)
    for name in args.peers:
        try:
            models[name] = PEERS[name](float_model, x).to(args.device)
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
    if args.compile:
        # every compiled model runs the same QuantLayer/quantizer code objects, so their frames share one
        # recompile budget; past it dynamo runs them eagerly and the comparison would be meaningless
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
        for name in [n for n in models if n == "float" or n in args.schemes]:
            # static shapes: the default re-traces with dynamic shapes on a recompile, and inductor then fails
            # to compile the quantizers' backward ("Cannot convert expression to float", torch 2.14)
            models[f"{name}+compile"] = torch.compile(copy.deepcopy(models[name]), backend=args.compile,
                                                      dynamic=False)
    return models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--compile", metavar="BACKEND", help="also time torch.compile(model, backend=BACKEND) of the "
                   "float and fxquant models (compile time is reported apart)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    info = host_info()
    print_host(info)
    models = build(args, x)
    for m in models.values():
        m.train()
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    first: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        print(f"round {i + 1}/{args.warmup + args.steps}" + (" (warm-up)" if i < args.warmup else ""), flush=True)
        for name, model in models.items():
            t = _step(model, opts[name], x, y)
            if i == 0:
                first[name] = t  # includes compilation for the compiled models
            if i >= args.warmup:
                times[name].append(t)
    base = statistics.median(times["float"])
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        rows.append({"model": name, "ms": ms, "ratio": ms / (base * 1e3), "first_step_s": first[name]})
    where = f"{args.device}" + (f", {torch.get_num_threads()} thread(s)" if args.device.type == "cpu" else "")
    print(f"ResNet-8, batch {args.batch}, fxquant W{args.bits}A{args.bits}, {where}, median of {args.steps} steps")
    print(f"{'model':18} {'step ms':>9} {'vs float':>9}")
    for r in rows:
        print(f"{r['model']:18} {r['ms']:9.1f} {r['ratio']:8.2f}x"
              + (f"   (first step {r['first_step_s']:.1f} s)" if "+compile" in r["model"] else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
    out = {"settings": settings, "results": rows, "host": info, "torch_threads": torch.get_num_threads(),
           "torch_version": torch.__version__,
           "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"}
    (args.out_dir / "step_time.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out_dir / 'step_time.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
