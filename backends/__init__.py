"""Backends that turn a frozen integer graph into something that runs (one per module, registered)."""

from fxquant.backends import torch_ref  # noqa: F401  (registers the "torch" backend; TVM ones load on first use)
from fxquant.backends.registry import available_backends, get_backend, register_backend

__all__ = ["available_backends", "get_backend", "register_backend"]
