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
from fxquant.backends.tvm.lower import LoweredGraph
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


def build_manifest(
    backend: str, lowered: LoweredGraph, build: BuildResult, target: tvm.target.Target, options: TvmOptions
) -> dict[str, Any]:
    """Everything a deployment or a reviewer needs to know about one compiled model."""
    layers = []
    for record in lowered.layers:
        layers.append({**record.facts, "name": record.name, "kind": record.kind, "kernel": record.kernel,
                       "reason": record.reason})
    return {
        "format": FORMAT,
        "backend": backend,
        "fxquant_version": __version__,
        "tvm_version": tvm.__version__,
        "target": _target_json(target),
        "target_features": build.features,
        "inputs": [s.to_dict() for s in lowered.inputs],
        "outputs": [s.to_dict() for s in lowered.outputs],
        "output_is_tuple": lowered.output_is_tuple,
        "debug_accumulators": [s.to_dict() for s in lowered.accumulators],
        "options": {
            "bitserial": options.bitserial,
            "bitserial_max_bits": options.bitserial_max_bits,
            "debug_accumulators": options.debug_accumulators,
            "kernel": options.kernel,
            "cost_model": options.cost_model,
            "num_threads": options.num_threads,
        },
        "layers": layers,
        "kernel_counts": dict(sorted(Counter(r.kernel for r in lowered.layers).items())),
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
    if manifest["unscheduled_functions"]:
        lines.append(f"unscheduled (scalar loops): {', '.join(manifest['unscheduled_functions'])}")
    return "\n".join(lines)
