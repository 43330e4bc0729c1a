"""This host as TVM sees it: its LLVM target, and the one TVM thread pool of the process.

Both the training kernels of the soft quantizers and the ``"tvm-llvm"`` backend compile for and run on the
host; this leaf module is what they share, so neither imports the other.

The thread pool is sized on demand by whoever calls into TVM next.

The training kernels size it to ``torch.get_num_threads()`` and a compiled ``"tvm-llvm"`` module to its
``num_threads``; both go through :func:`ensure_pool_size`, so the pool is resized only when the size changes.
"""

from __future__ import annotations

import os
from typing import Any

from fxquant.errors import ConfigError

__all__ = ["host_target_dict", "ensure_pool_size", "default_threads", "check_threads", "pool_size"]

_pool_threads: list[int] = []  # the size last set


def host_target_dict() -> dict[str, Any]:
    """The machine we run on: its LLVM cpu name (so AVX2/FMA/POPCNT are used when present) and core count."""
    from tvm.target.codegen import llvm_get_system_cpu, llvm_get_system_triple

    return {
        "kind": "llvm",
        "mtriple": llvm_get_system_triple(),
        "mcpu": llvm_get_system_cpu(),
        "num-cores": os.cpu_count() or 1,
    }


def default_threads() -> int:
    """Every CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(threads: object) -> int | None:
    """``threads`` if it is a positive integer or None, else a :class:`ConfigError` naming ``num_threads``."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"num_threads={threads!r} is invalid: expected a positive integer or None")
    return threads


def pool_size() -> int | None:
    """The size of the TVM pool this process last set, or None when nothing has called into TVM yet."""
    return _pool_threads[0] if _pool_threads else None


def ensure_pool_size(threads: int) -> None:
    """``threads`` TVM workers sharing the process's CPUs, leaving the calling thread's affinity as it was.

    TVM's default modes pin the calling thread to one core (the whole training process would then run on
    it); mode -3 (threads share the given cores) does not, and the affinity is restored in any case.
    """
    if _pool_threads == [threads]:
        return
    import tvm

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpus = sorted(affinity) if affinity else range(os.cpu_count() or 1)
    tvm.get_global_func("runtime.config_threadpool")(-3, threads, [str(c) for c in cpus])
    if affinity and os.sched_getaffinity(0) != affinity:
        os.sched_setaffinity(0, affinity)
    _pool_threads[:] = [threads]
