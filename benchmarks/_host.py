"""What machine a benchmark ran on: CPU model, LLVM cpu name, the ISA flags that matter, cores, library versions.

    from _host import host_info, print_host
    info = host_info()      # a JSON-ready dict; put it in the benchmark's results
    print_host(info)        # one or two lines at the top of the printed output

Import this only after setting ``TVM_NUM_THREADS``: :func:`host_info` imports TVM (for LLVM's cpu name), and
TVM sizes its thread pool from that variable when it is first imported.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

__all__ = ["host_info", "print_host", "ISA_FLAGS"]

#: flag reported -> the /proc/cpuinfo spellings that mean it (x86 "flags", aarch64 "Features")
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "popcnt": ("popcnt",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx512_vpopcntdq": ("avx512_vpopcntdq",),
    "avx512_bitalg": ("avx512_bitalg",),
    "avx_vnni": ("avx_vnni",),
}
AARCH64_FLAGS: dict[str, tuple[str, ...]] = {"asimd": ("asimd",), "asimddp": ("asimddp",)}


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU model name and its feature flags from /proc/cpuinfo (empty where the file does not exist)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _version(module: str, dist: str | None = None) -> str | None:
    """The installed version of ``dist`` (default ``module``), or None when it is not installed."""
    try:
        return metadata.version(dist or module)
    except metadata.PackageNotFoundError:
        try:
            return str(__import__(module).__version__)
        except Exception:
            return None


def host_info() -> dict[str, Any]:
    """The host as a JSON-ready dict: ``cpu``, ``llvm_cpu``, ``isa`` (flag -> bool), cores, versions."""
    model, flags = _cpuinfo()
    names = dict(ISA_FLAGS)
    if platform.machine().lower() in ("aarch64", "arm64"):
        names.update(AARCH64_FLAGS)
    isa = {name: any(s in flags for s in spellings) for name, spellings in names.items()}
    try:
        from fxquant.backends.tvm.build import host_target_dict

        llvm_cpu = str(host_target_dict()["mcpu"])
    except Exception as exc:  # TVM missing or the backend not importable: say so rather than fail the benchmark
        llvm_cpu = f"unknown ({type(exc).__name__}: {exc})"
    try:
        import tvm

        tvm_version = str(tvm.__version__)
    except Exception:
        tvm_version = None
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": model,
        "machine": platform.machine(),
        "llvm_cpu": llvm_cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "tvm": tvm_version,
        "onnxruntime": _version("onnxruntime"),
    }


def print_host(info: dict[str, Any]) -> None:
    """Two lines: the CPU, its LLVM name, cores and ISA flags; then the library versions."""
    present = [name for name, ok in info["isa"].items() if ok]
    absent = [name for name, ok in info["isa"].items() if not ok]
    print(f"host: {info['cpu']} (llvm cpu {info['llvm_cpu']}, {info['machine']}), {info['cores']} core(s); "
          f"ISA: {' '.join(present) or '-'}; lacks: {' '.join(absent) or '-'}")
    print(f"      python {info['python']}, torch {info['torch']}, tvm {info['tvm']}, "
          f"onnxruntime {info['onnxruntime'] or 'not installed'}")
