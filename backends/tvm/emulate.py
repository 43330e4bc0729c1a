"""Run a ``"tvm-arm"`` artifact on this (x86) machine under ``qemu-aarch64``.

The artifact's own ``run_model.py`` runs in an aarch64 Python 3.11 taken from Debian's arm64 packages
(``sysroot/``) with aarch64 wheels of the TVM runtime and numpy (``site/``). ``.ci/setup-arm`` builds both
under ``<repo>/.cache/aarch64`` (or ``$FXQUANT_AARCH64_CACHE``). Timing under emulation means nothing; this
is for checking that the deployed bits compute what the host build computes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fxquant.backends.tvm.artifact import verify_artifact
from fxquant.errors import BackendError, InputError

__all__ = ["run_under_qemu", "emulation_available", "emulation_missing", "cache_dir", "QEMU"]

QEMU = "qemu-aarch64"
SETUP_HINT = "run `bash .ci/setup-arm` as root"


def cache_dir() -> Path:
    """``$FXQUANT_AARCH64_CACHE`` or ``<repo>/.cache/aarch64``."""
    override = os.environ.get("FXQUANT_AARCH64_CACHE")
    return Path(override) if override else Path(__file__).resolve().parents[2] / ".cache" / "aarch64"


def _python() -> Path:
    return cache_dir() / "sysroot" / "usr" / "bin" / "python3.11"


def emulation_missing() -> list[str]:
    """What is missing for :func:`run_under_qemu` (empty when everything is there)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt package qemu-user)")
    if not _python().is_file():
        missing.append(f"aarch64 Python sysroot at {_python()}")
    if not (cache_dir() / "site" / "tvm").is_dir():
        missing.append(f"aarch64 TVM runtime at {cache_dir() / 'site'}")
    return missing


def emulation_available() -> bool:
    """True when qemu-aarch64, the aarch64 Python and the aarch64 site folder are all present."""
    return not emulation_missing()


def qemu_python_command(script: str | Path, *args: str) -> list[str]:
    """The command line that runs ``script`` with the cached aarch64 Python and TVM runtime under qemu."""
    site, sysroot = cache_dir() / "site", cache_dir() / "sysroot"
    return [QEMU, "-L", str(sysroot), "-E", f"PYTHONPATH={site}", "-E", "TVM_USE_RUNTIME_LIB=1",
            "-E", "PYTHONDONTWRITEBYTECODE=1", str(_python()), str(script), *args]


def run_under_qemu(artifact_dir: str | Path, inputs: Sequence[np.ndarray], timeout: float = 900.0) -> list[np.ndarray]:
    """Run ``run_model.py`` of an artifact under qemu; returns its outputs (then any debug accumulators).

    Example::

        art = fxquant.convert(qmodel, backend="tvm-arm", output_dir="art")
        (logits,) = run_under_qemu(art.path, [x.numpy()])
    """
    artifact_dir = Path(artifact_dir).resolve()
    manifest = verify_artifact(artifact_dir)
    missing = emulation_missing()
    if missing:
        raise BackendError(f"cannot emulate aarch64: missing {'; '.join(missing)} ({SETUP_HINT})")
    specs = manifest["inputs"]
    if len(inputs) != len(specs):
        raise InputError(f"artifact {artifact_dir.name} takes {len(specs)} input(s), got {len(inputs)}")
    for spec, array in zip(specs, inputs, strict=True):
        if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
            raise InputError(
                f"input {spec['name']!r}: expected {spec['shape']} {spec['dtype']}, "
                f"got {list(array.shape)} {array.dtype}"
            )
    with tempfile.TemporaryDirectory(prefix="fxquant-qemu-") as tmp:
        work = Path(tmp)
        paths = []
        for i, array in enumerate(inputs):
            paths.append(work / f"input_{i}.npy")
            np.save(paths[-1], np.ascontiguousarray(array))
        out_dir = work / "out"
        command = qemu_python_command(
            artifact_dir / "run_model.py", "--artifact", str(artifact_dir), "--output-dir", str(out_dir)
        )
        for path in paths:
            command += ["--input", str(path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{artifact_dir.name}: emulated run exceeded {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise BackendError(
                f"{artifact_dir / 'run_model.py'} failed under {QEMU} (exit {done.returncode}):\n{done.stderr[-4000:]}"
            )
        count = len(manifest["outputs"]) + len(manifest.get("debug_accumulators", []))
        return [np.load(out_dir / f"output_{i}.npy") for i in range(count)]
