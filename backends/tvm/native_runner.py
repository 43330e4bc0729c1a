"""``fxquant_run``: the C++ device runner of ``"tvm-arm"`` artifacts, for devices without Python.

It takes the options of ``run_model.py`` (``--artifact``, ``--input``, ``--output-dir``, ``--num-threads``,
``--runs``) and checks the same things. :func:`build_runner` cross-compiles ``runner/fxquant_run.cc`` with
``aarch64-linux-gnu-g++`` against the TVM runtime of the aarch64 wheels (``.ci/setup-arm``) and puts
``libtvm_ffi.so`` and ``libtvm_runtime.so`` next to it (it finds them through ``$ORIGIN``), so the folder
can be copied to a device as it is::

    python -m fxquant.backends.tvm.native_runner build/runner     # then on the device:
    ./runner/fxquant_run --artifact art --input x.npy --output-dir out
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fxquant.backends.tvm.aarch64_env import SETUP_HINT, cache_dir
from fxquant.backends.tvm.artifact import cross_compiler_name
from fxquant.backends.tvm.cost import cost_cache_path
from fxquant.errors import BackendError

__all__ = ["RUNNER_NAME", "RUNNER_SOURCE", "RUNTIME_LIBRARIES", "build_runner", "cached_runner", "runner_missing"]

RUNNER_NAME = "fxquant_run"
RUNNER_SOURCE = Path(__file__).with_name("runner") / "fxquant_run.cc"
#: the aarch64 wheel's libraries the runner links, relative to the site folder
RUNTIME_LIBRARIES = ("tvm_ffi/lib/libtvm_ffi.so", "tvm/lib/libtvm_runtime.so")


def _site() -> Path:
    return cache_dir() / "site"


def runner_missing() -> list[str]:
    """What :func:`build_runner` needs and lacks (empty when it can build)."""
    missing = [] if shutil.which(cross_compiler_name()) else [f"{cross_compiler_name()} (g++-aarch64-linux-gnu)"]
    missing += [f"aarch64 {lib} under {_site()}" for lib in RUNTIME_LIBRARIES if not (_site() / lib).is_file()]
    if not (_site() / "tvm_ffi" / "include" / "tvm" / "ffi" / "tvm_ffi.h").is_file():
        missing.append(f"TVM FFI headers under {_site() / 'tvm_ffi' / 'include'}")
    return missing


def build_runner(output_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write ``output_dir`` (``fxquant_run`` and its two runtime libraries) atomically; returns the binary."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise BackendError(f"output_dir {output_dir} already exists; pass force=True to replace it")
    missing = runner_missing()
    if missing:
        raise BackendError(f"cannot build {RUNNER_NAME}: missing {'; '.join(missing)} ({SETUP_HINT})")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)
    try:
        site = _site()
        command = [
            cross_compiler_name(), "-std=c++17", "-O2", "-Wall", f"-I{site / 'tvm_ffi' / 'include'}",
            str(RUNNER_SOURCE), "-o", str(staging / RUNNER_NAME),
            *(f"-L{(site / lib).parent}" for lib in RUNTIME_LIBRARIES),
            "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime",  # the runtime registers the Relax VM loader
            f"-Wl,-rpath-link,{(site / RUNTIME_LIBRARIES[0]).parent}", "-Wl,-rpath,$ORIGIN",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BackendError(
                f"compiling {RUNNER_SOURCE.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
            )
        for lib in RUNTIME_LIBRARIES:
            shutil.copyfile(site / lib, staging / Path(lib).name)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir / RUNNER_NAME


def _build_key() -> str:
    """Changes with the runner's source and the runtime it links, so a stale cached build is never used."""
    digest = hashlib.sha256(RUNNER_SOURCE.read_bytes())
    for lib in RUNTIME_LIBRARIES:
        stat = (_site() / lib).stat()
        digest.update(f"{lib}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_runner() -> Path:
    """The runner built once per source and runtime in fxquant's cache folder (for emulated runs)."""
    missing = runner_missing()
    if missing:
        raise BackendError(f"cannot build {RUNNER_NAME}: missing {'; '.join(missing)} ({SETUP_HINT})")
    folder = cost_cache_path().parent / "aarch64-runner" / _build_key()  # $FXQUANT_CACHE_DIR or ~/.cache/fxquant
    binary = folder / RUNNER_NAME
    if not binary.is_file():
        try:
            build_runner(folder)
        except (BackendError, OSError):
            if not binary.is_file():  # another process may have finished the same build first
                raise
    return binary


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'native_runner'} OUTPUT_DIR")
    try:
        print(build_runner(sys.argv[1]))
    except BackendError as exc:
        sys.exit(f"native_runner: {exc}")
