"""Symbolic tracing with errors that name the module and source line that cannot be traced."""

from __future__ import annotations

import linecache
import os
import traceback

import torch
from torch import fx, nn

from fxquant.errors import TracingError

__all__ = ["trace", "QuantTracer"]

_TORCH_DIR = os.path.dirname(torch.__file__)


class QuantTracer(fx.Tracer):
    """``fx.Tracer`` that also treats the modules the user named (by qualified name or type) as leaves."""

    def __init__(self, leaf_modules: tuple[str, ...] = (), leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(tb) -> str:
    """The innermost frame of the traceback outside torch itself: the user's offending line."""
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return "unknown location"
    f = frames[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{f.filename}:{f.lineno} in {f.name}(): `{code}`"


def trace(
    model: nn.Module, leaf_modules: tuple[str, ...] = (), leaf_types: tuple[type, ...] = ()
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule; modules in ``leaf_modules`` are kept opaque.

    Example::

        gm = trace(torchvision.models.resnet18())
    """
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TracingError(f"expected a torch.nn.Module, got {type(model).__name__}")
    names = dict(model.named_modules())
    missing = [n for n in leaf_modules if n not in names]
    if missing:
        raise TracingError(f"leaf_modules {missing} are not submodules of {type(model).__name__}")
    tracer = QuantTracer(tuple(leaf_modules), tuple(leaf_types))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises several types (TraceError, TypeError, RuntimeError, ...)
        raise TracingError(
            f"cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            f"  at {_user_frame(exc.__traceback__)}\n"
            "  Control flow that depends on tensor values cannot be traced symbolically: make it static, or "
            "list the module that contains it in QuantConfig(leaf_modules=[...]) so it is kept as one opaque "
            "(unquantized) call."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["fxquant.leaf_modules"] = tuple(leaf_modules)
    return gm
