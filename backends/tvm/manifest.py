"""The manifest: what was compiled, for which target, and which kernel each layer got (and why).

It is plain JSON data, deterministic for a given model and build (sorted keys, no timestamps), written
next to ``model.so`` by ``"tvm-arm"`` and attached as ``.manifest`` to the ``"tvm-llvm"`` module.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import tvm

from fxquant.backends.tvm.build import BuildResult
from fxquant.backends.tvm.lower import LoweredFunction, LoweredGraph
from fxquant.backends.tvm.options import TvmOptions
from fxquant.version import __version__

__all__ = ["FORMAT", "build_manifest", "manifest_json", "report", "sha256_file"]

FORMAT = "fxquant-tvm-artifact/1"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _target_json(target: tvm.target.Target) -> dict[str, Any]:
    spec = json.loads(json.dumps(dict(target.export()), default=str))
    return {k: v for k, v in spec.items() if k not in ("host",)}


def _function_facts(function: LoweredFunction) -> dict[str, Any]:
    """One compiled function's signature and the kernel each layer got in it (the choice depends on the batch)."""
    layers = [{**r.facts, "name": r.name, "kind": r.kind, "kernel": r.kernel, "reason": r.reason}
              for r in function.layers]
    return {
        "inputs": [s.to_dict() for s in function.inputs],
        "outputs": [s.to_dict() for s in function.outputs],
        "output_is_tuple": function.output_is_tuple,
        "debug_accumulators": [s.to_dict() for s in function.accumulators],
        "layers": layers,
        "kernel_counts": dict(sorted(Counter(r.kernel for r in function.layers).items())),
    }


def build_manifest(
    backend: str, lowered: LoweredGraph, build: BuildResult, target: tvm.target.Target, options: TvmOptions
) -> dict[str, Any]:
    """Everything a deployment or a reviewer needs to know about one compiled model.

    The top level describes ``main``; ``batch_variants`` describes each further compiled batch size's
    function the same way, plus its ``batch`` and ``function`` name; ``batch_sizes`` lists them all.
    """
    return {
        "format": FORMAT,
        "backend": backend,
        "fxquant_version": __version__,
        "tvm_version": tvm.__version__,
        "target": _target_json(target),
        "target_features": build.features,
        **_function_facts(lowered.main),
        "batch_sizes": [f.batch for f in lowered.functions],
        "batch_variants": [{"batch": f.batch, "function": f.name, **_function_facts(f)}
                           for f in lowered.functions[1:]],
        "options": {
            "bitserial": options.bitserial,
            "bitserial_max_bits": options.bitserial_max_bits,
            "debug_accumulators": options.debug_accumulators,
            "kernel": options.kernel,
            "cost_model": options.cost_model,
            "num_threads": options.num_threads,
            "batch_sizes": list(options.batch_sizes) if options.batch_sizes else None,
        },
        "unscheduled_functions": build.unscheduled,
        "files": {},
    }


def manifest_json(manifest: dict[str, Any]) -> str:
    """Canonical text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(manifest, sort_keys=True, indent=2) + "\n"


def report(manifest: dict[str, Any]) -> str:
    """A table of layers, bitwidths, kernels and reasons, plus anything that ran unscheduled."""
    rows = [("layer", "type", "W/A bits", "kernel", "why")]
    for layer in manifest["layers"]:
        bits = f"{layer['weight_bits']}/{layer['act_bits']}" if "weight_bits" in layer else "32/32"
        rows.append((layer["name"], layer["kind"], bits, layer["kernel"], layer["reason"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = [
        f"{manifest['backend']} for {manifest['target'].get('mtriple', '?')} "
        f"({', '.join(f'{k}={v}' for k, v in manifest['kernel_counts'].items())})"
    ]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    for variant in manifest.get("batch_variants", []):
        counts = ", ".join(f"{k}={v}" for k, v in variant["kernel_counts"].items())
        lines.append(f"batch {variant['batch']} ({variant['function']}): {counts}")
    if manifest["unscheduled_functions"]:
        lines.append(f"unscheduled (scalar loops): {', '.join(manifest['unscheduled_functions'])}")
    return "\n".join(lines)
