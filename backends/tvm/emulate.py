"""Run a ``"tvm-arm"`` artifact on this (x86) machine under ``qemu-aarch64``.

The artifact's own ``run_model.py`` runs in an aarch64 Python 3.11 taken from Debian's arm64 packages
(``sysroot/``) with aarch64 wheels of the TVM runtime and numpy (``site/``); the native runner
(:mod:`~fxquant.backends.tvm.native_runner`) needs only the sysroot's C++ library and starts in seconds
instead of a minute. ``.ci/setup-arm`` builds both folders under ``<repo>/.cache/aarch64`` (or
``$FXQUANT_AARCH64_CACHE``). Timing under emulation means nothing; this
is for checking that the deployed bits compute what the host build computes.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fxquant.backends.tvm.aarch64_env import (
    QEMU,
    SETUP_HINT,
    cache_dir,
    emulation_available,
    emulation_missing,
    qemu_python_command,
)
from fxquant.backends.tvm.artifact import verify_artifact
from fxquant.backends.tvm.native_runner import cached_runner, runner_missing
from fxquant.errors import BackendError, InputError

__all__ = [
    "run_under_qemu",
    "run_batches_under_qemu",
    "emulation_available",
    "emulation_missing",
    "default_runner",
    "cache_dir",
    "RUNNERS",
    "QEMU",
]

def _python_runner(artifact_dir: Path) -> list[str]:
    return qemu_python_command(artifact_dir / "run_model.py")


def _native_runner(artifact_dir: Path) -> list[str]:
    return [QEMU, "-L", str(cache_dir() / "sysroot"), str(cached_runner())]


#: runner -> the emulated command line that runs an artifact; both take the same options after it
RUNNERS: dict[str, Callable[[Path], list[str]]] = {"python": _python_runner, "native": _native_runner}


def default_runner() -> str:
    """``"native"`` (starts in seconds under qemu) when it can be built here, else ``"python"`` (minutes)."""
    return "python" if runner_missing() else "native"


def _check_inputs(name: str, manifest: dict, inputs: Sequence[np.ndarray]) -> None:
    """The inputs have the shapes of one compiled function (``main`` or a further batch size's)."""
    functions = [manifest["inputs"]] + [v["inputs"] for v in manifest.get("batch_variants", [])]
    specs = functions[0]
    if len(inputs) != len(specs):
        raise InputError(f"artifact {name} takes {len(specs)} input(s), got {len(inputs)}")
    def fits(spec: dict, array: np.ndarray) -> bool:
        return list(array.shape) == spec["shape"] and str(array.dtype) == spec["dtype"]

    if any(all(map(fits, function, inputs)) for function in functions):
        return
    spec, array = next((s, a) for s, a in zip(specs, inputs, strict=True) if not fits(s, a))
    sizes = ", ".join(str(f[0]["shape"][0]) for f in functions)
    raise InputError(f"input {spec['name']!r}: expected {spec['shape']} {spec['dtype']} (compiled batch sizes: "
                     f"{sizes}), got {list(array.shape)} {array.dtype}")


def run_batches_under_qemu(
    artifact_dir: str | Path,
    batches: Sequence[Sequence[np.ndarray]],
    runner: str | None = None,
    num_threads: int | None = None,
    timeout: float = 900.0,
) -> list[list[np.ndarray]]:
    """Run an artifact on every batch of inputs in one emulated process (starting one costs the most).

    Returns each batch's outputs (then any debug accumulators). ``runner`` is ``"python"`` (the artifact's
    ``run_model.py``), ``"native"`` (``fxquant_run``, built on first use) or ``None`` (:func:`default_runner`).
    """
    artifact_dir = Path(artifact_dir).resolve()
    manifest = verify_artifact(artifact_dir)
    runner = default_runner() if runner is None else runner
    if runner not in RUNNERS:
        raise BackendError(f"runner={runner!r} is invalid; allowed: {', '.join(RUNNERS)}")
    missing = emulation_missing()
    if missing:
        raise BackendError(f"cannot emulate aarch64: missing {'; '.join(missing)} ({SETUP_HINT})")
    if not batches:
        return []
    for inputs in batches:
        _check_inputs(artifact_dir.name, manifest, inputs)
    with tempfile.TemporaryDirectory(prefix="fxquant-qemu-") as tmp:
        work = Path(tmp)
        command = [*RUNNERS[runner](artifact_dir), "--artifact", str(artifact_dir), "--output-dir", str(work / "out"),
                   "--runs", str(len(batches))]
        if num_threads is not None:
            command += ["--num-threads", str(num_threads)]
        for j, inputs in enumerate(batches):
            for i, array in enumerate(inputs):
                np.save(work / f"input_{j}_{i}.npy", np.ascontiguousarray(array))
                command += ["--input", str(work / f"input_{j}_{i}.npy")]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{artifact_dir.name}: emulated run exceeded {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise BackendError(
                f"{artifact_dir.name}: the {runner} runner failed under {QEMU} (exit {done.returncode}):\n"
                f"{done.stderr[-4000:]}"
            )
        count = len(manifest["outputs"]) + len(manifest.get("debug_accumulators", []))
        folders = [work / "out"] if len(batches) == 1 else [work / "out" / f"run_{j}" for j in range(len(batches))]
        return [[np.load(folder / f"output_{i}.npy") for i in range(count)] for folder in folders]


def run_under_qemu(
    artifact_dir: str | Path, inputs: Sequence[np.ndarray], timeout: float = 900.0, runner: str | None = None
) -> list[np.ndarray]:
    """Run an artifact once under qemu; returns its outputs (then any debug accumulators).

    Example::

        art = fxquant.convert(qmodel, backend="tvm-arm", output_dir="art")
        (logits,) = run_under_qemu(art.path, [x.numpy()])
    """
    return run_batches_under_qemu(artifact_dir, [inputs], runner, timeout=timeout)[0]
