"""Run an fxquant TVM artifact on the device: ``python run_model.py --input x.npy --output-dir out/``.

Copied next to ``model.so`` and ``manifest.json`` by the ``"tvm-arm"`` backend. It needs only the TVM
runtime and numpy on the device (no PyTorch, no fxquant): it checks model.so against the manifest's
sha256, checks each input's shape and dtype, runs ``main`` on the CPU and writes ``output_<i>.npy``.
Exit status 2 means a bad artifact or input (unreadable, wrong shape or dtype, NaN or Inf), with the
reason on one line of stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["main", "run"]


def _fail(message: str) -> NoReturn:
    print(f"run_model: {message}", file=sys.stderr)
    raise SystemExit(2)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(artifact: Path, inputs: list[Path], output_dir: Path) -> list[Path]:
    """Load, verify, run; returns the written output files."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone imports much faster
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        expected = manifest["files"]["model.so"]["sha256"]
        specs = [(spec["name"], spec["shape"], spec["dtype"]) for spec in manifest["inputs"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"{artifact / 'manifest.json'} is missing or malformed: {type(exc).__name__}: {exc}")
    library = artifact / "model.so"
    if not library.is_file():
        _fail(f"{library} is missing")
    if _sha256(library) != expected:
        _fail(f"{library} does not match the sha256 in manifest.json (truncated or corrupted)")
    if len(inputs) != len(specs):
        _fail(f"expected {len(specs)} input file(s), got {len(inputs)}")
    arrays = []
    for (name, shape, dtype), path in zip(specs, inputs, strict=True):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # missing, truncated, not .npy, or a pickled object
            _fail(f"input {name}: cannot read {path} as a .npy array: {' '.join(str(exc).split())}")
        if not isinstance(array, np.ndarray):
            _fail(f"input {name}: {path} is an .npz archive, expected one .npy array")
        if list(array.shape) != shape or str(array.dtype) != dtype:
            _fail(f"input {name}: expected {shape} {dtype}, got {list(array.shape)} {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            _fail(f"input {name}: {path} holds NaN or Inf values; the model accepts finite inputs only")
        arrays.append(tvm.runtime.tensor(np.ascontiguousarray(array)))
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    result = vm["main"](*arrays)
    values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, value in enumerate(values):
        path = output_dir / f"output_{i}.npy"
        np.save(path, value.numpy())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", default=[], type=Path, help="an .npy file per model input")
    parser.add_argument("--output-dir", type=Path, default=Path("."), help="where output_<i>.npy are written")
    parser.add_argument("--artifact", type=Path, default=Path(__file__).resolve().parent, help="artifact folder")
    args = parser.parse_args(argv)
    for path in run(args.artifact, args.input, args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
