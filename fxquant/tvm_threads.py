"""The one TVM thread pool of the process, sized on demand by whoever calls into TVM next.

The training kernels size it to ``torch.get_num_threads()`` and a compiled ``"tvm-llvm"`` module to its
``num_threads``; both go through :func:`ensure_pool_size`, so the pool is resized only when the size changes.
"""

from __future__ import annotations

import os

from fxquant.errors import ConfigError

__all__ = ["ensure_pool_size", "default_threads", "check_threads", "pool_size"]

_pool_threads: list[int] = []  # the size last set


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
