"""Run an fxquant TVM artifact on the device: ``python run_model.py --input x.npy --output-dir out/``.

Copied next to ``model.so`` and ``manifest.json`` by the ``"tvm-arm"`` backend. It needs only the TVM
runtime and numpy on the device (no PyTorch, no fxquant): it checks model.so against the manifest's
sha256, checks each input's shape and dtype, runs ``main`` on the CPU and writes ``output_<i>.npy``. An
artifact built with several batch sizes runs the function compiled for the inputs' batch (``main_b<N>``).
``--num-threads N`` sizes TVM's thread pool; ``--runs K`` takes K groups of inputs and writes
``run_<j>/output_<i>.npy`` (loading the runtime once). The native runner ``fxquant_run`` takes the same
options. Exit status 2 means a bad artifact, input or option (unreadable, wrong shape or dtype, NaN or Inf),
with the reason on one line of stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["main", "run", "set_num_threads"]


def _fail(message: str) -> NoReturn:
    print(f"run_model: {message}", file=sys.stderr)
    raise SystemExit(2)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_num_threads(threads: int) -> None:
    """``threads`` TVM workers sharing this process's cores (mode -3); the caller's affinity is kept."""
    import tvm

    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    tvm.get_global_func("runtime.config_threadpool")(-3, int(threads), [str(c) for c in affinity])
    if affinity and sorted(os.sched_getaffinity(0)) != affinity:
        os.sched_setaffinity(0, affinity)


def run(artifact: Path, inputs: list[Path], output_dir: Path, num_threads: int | None = None,
        runs: int = 1) -> list[Path]:
    """Load, verify, run ``runs`` times (inputs grouped per run); returns the written output files."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone imports much faster
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        expected = manifest["files"]["model.so"]["sha256"]
        functions = {"main": [(spec["name"], spec["shape"], spec["dtype"]) for spec in manifest["inputs"]]}
        for variant in manifest.get("batch_variants", []):
            functions[variant["function"]] = [(s["name"], s["shape"], s["dtype"]) for s in variant["inputs"]]
        specs = functions["main"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"{artifact / 'manifest.json'} is missing or malformed: {type(exc).__name__}: {exc}")
    library = artifact / "model.so"
    if not library.is_file():
        _fail(f"{library} is missing")
    if _sha256(library) != expected:
        _fail(f"{library} does not match the sha256 in manifest.json (truncated or corrupted)")
    if len(inputs) != len(specs) * runs:
        _fail(f"expected {len(specs) * runs} input file(s) ({len(specs)} per run), got {len(inputs)}")
    groups = []
    for start in range(0, len(inputs), len(specs)):
        tensors, candidates = [], set(functions)
        for index, ((name, _, dtype), path) in enumerate(zip(specs, inputs[start:start + len(specs)], strict=True)):
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:  # missing, truncated, not .npy, or a pickled object
                _fail(f"input {name}: cannot read {path} as a .npy array: {' '.join(str(exc).split())}")
            if not isinstance(array, np.ndarray):
                _fail(f"input {name}: {path} is an .npz archive, expected one .npy array")
            matching = {f for f, f_specs in functions.items() if list(array.shape) == f_specs[index][1]}
            if not matching or str(array.dtype) != dtype:
                wanted = " or ".join(str(f_specs[index][1]) for f_specs in functions.values())
                _fail(f"input {name}: expected {wanted} {dtype}, got {list(array.shape)} {array.dtype}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                _fail(f"input {name}: {path} holds NaN or Inf values; the model accepts finite inputs only")
            tensors.append(tvm.runtime.tensor(np.ascontiguousarray(array)))
            candidates &= matching
        if not candidates:
            _fail("the inputs' batch sizes match no single compiled function; give every input the same batch")
        groups.append((next(f for f in functions if f in candidates), tensors))
    if num_threads is not None:
        set_num_threads(num_threads)
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    written = []
    for index, (function, tensors) in enumerate(groups):
        result = vm[function](*tensors)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        folder = output_dir / f"run_{index}" if runs > 1 else output_dir
        folder.mkdir(parents=True, exist_ok=True)
        for i, value in enumerate(values):
            written.append(folder / f"output_{i}.npy")
            np.save(written[-1], value.numpy())
    return written


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", default=[], type=Path, help="an .npy file per model input")
    parser.add_argument("--output-dir", type=Path, default=Path("."), help="where output_<i>.npy are written")
    parser.add_argument("--artifact", type=Path, default=Path(__file__).resolve().parent, help="artifact folder")
    parser.add_argument("--num-threads", type=_positive, default=None, help="TVM thread pool size (default: all)")
    parser.add_argument("--runs", type=_positive, default=1, help="groups of inputs to run, one after another")
    args = parser.parse_args(argv)
    for path in run(args.artifact, args.input, args.output_dir, args.num_threads, args.runs):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
