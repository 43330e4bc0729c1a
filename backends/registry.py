"""Backend name → lowering function. Backends register themselves with :func:`register_backend`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import fx

from fxquant.errors import BackendError

__all__ = ["register_backend", "get_backend", "available_backends"]

Lowering = Callable[..., Any]
_REGISTRY: dict[str, Lowering] = {}
#: backends that live in modules with heavy imports (TVM) are imported on first use
_LAZY = {"tvm-llvm": "fxquant.backends.tvm", "tvm-arm": "fxquant.backends.tvm"}


def register_backend(name: str) -> Callable[[Lowering], Lowering]:
    def decorate(fn: Lowering) -> Lowering:
        _REGISTRY[name] = fn
        return fn

    return decorate


def available_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def get_backend(name: str) -> Callable[[fx.GraphModule], Any]:
    """The lowering function of backend ``name``: ``fn(frozen_graph, **options)``."""
    known = available_backends()
    if name not in known:
        raise BackendError(f"backend={name!r} is unknown; available: {', '.join(known)}")
    if name not in _REGISTRY:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise BackendError(f"backend {name!r} cannot be loaded: {exc}") from exc
    if name not in _REGISTRY:
        raise BackendError(f"backend {name!r} is not available in this installation")
    return _REGISTRY[name]
