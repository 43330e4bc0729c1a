"""Where this host keeps what running aarch64 code needs: ``qemu-aarch64``, the cached aarch64 Python and TVM
runtime (``.cache/aarch64``, set up by ``.ci/setup-arm``), and the command line that runs a script with them.

Shared by the emulated runs (:mod:`.emulate`) and the C++ device runner's build (:mod:`.native_runner`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["QEMU", "SETUP_HINT", "cache_dir", "emulation_missing", "emulation_available", "qemu_python_command"]

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
