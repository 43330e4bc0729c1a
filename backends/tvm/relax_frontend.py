"""Float ops converted by TVM's own PyTorch FX importer (``tvm.relax.frontend.torch``).

fxquant's converter table keeps its own entries for the integer layers, the integer ops and the float ops
whose rounding must follow PyTorch's (they feed the next layer's quantizer). Every other float op that
TVM's importer knows (LayerNorm, GELU, softmax, matmul, attention, roll, pad, stack, ...) is translated by
that importer, bound to fxquant's BlockBuilder and node environment so that both write the same function.

Functions are matched by identity, not by name alone: ``torch.roll`` or ``F.gelu`` use TVM's ``"roll"`` or
``"gelu"`` entry, a user's own function that happens to be called ``gelu`` does not.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tvm import relax
from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

from fxquant.backends.tvm.context import Converter, LoweringContext

__all__ = ["tvm_converter", "TVM_ENTRIES"]

#: namespaces whose functions may take TVM's entry of the same name
_NAMESPACES: tuple[Any, ...] = (torch, F, torch.Tensor, torch.special, torch.linalg, operator, math)


def _entries() -> dict[Any, Callable[..., Any]]:
    """TVM's table (module types and op names) from an importer that is never run itself."""
    return TorchFXImporter().convert_map


TVM_ENTRIES: dict[Any, Callable[..., Any]] = _entries()


class _Constants(dict):
    """The importer's parameter table: each module weight becomes a Relax constant when first read."""

    def __missing__(self, tensor: torch.Tensor) -> relax.Expr:
        value = relax.const(tensor.detach().cpu().float().numpy())
        self[tensor] = value
        return value


def _importer(ctx: LoweringContext) -> TorchFXImporter:
    """One importer per lowering, writing into ``ctx``'s BlockBuilder and reading ``ctx``'s environment."""

    def build() -> TorchFXImporter:
        importer = TorchFXImporter()
        importer.block_builder = ctx.bb
        importer.env = ctx.env
        importer.named_modules = ctx.modules
        importer.params = _Constants()
        return importer

    return ctx.cached(("tvm-fx-importer",), build)


def _key(node: fx.Node, module: nn.Module | None) -> Any:
    """TVM's table key of ``node`` (a module type or an op name), or None where TVM has no entry."""
    if node.op == "call_module":
        return next((cls for cls in type(module).__mro__ if cls in TVM_ENTRIES), None)
    if node.op == "call_method":
        return node.target if node.target in TVM_ENTRIES else None
    name = getattr(node.target, "__name__", None)
    if name not in TVM_ENTRIES:
        return None
    return name if any(getattr(ns, name, None) is node.target for ns in _NAMESPACES) else None


def _positional(node: fx.Node) -> Any:
    """``node`` with keyword arguments moved to their positions where the signature allows.

    Several of TVM's converters read only ``node.args`` (``F.layer_norm``'s ``eps=``, ``weight=`` given by
    keyword would be dropped silently); the importer sees a stand-in whose ``args`` hold them in order.
    """
    if node.op != "call_function" or not node.kwargs:
        return node
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or a call this signature rejects
        return node
    return SimpleNamespace(op=node.op, name=node.name, target=node.target, meta=node.meta, users=node.users,
                           args=bound.args, kwargs=bound.kwargs)


def _emit(ctx: LoweringContext, node: fx.Node) -> Any:
    module = ctx.modules.get(str(node.target)) if node.op == "call_module" else None
    importer = _importer(ctx)
    return importer.convert_map[_key(node, module)](_positional(node))


_TVM = Converter(_emit)


def tvm_converter(node: fx.Node, module: nn.Module | None) -> Converter | None:
    """The converter through TVM's importer for ``node``, or None where TVM has no entry either."""
    return _TVM if _key(node, module) is not None else None
