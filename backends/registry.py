"""Backend name → lowering function and declared capabilities. Backends register both with :func:`register_backend`.

A backend declares what it can lower (:class:`BackendCapabilities`, as torch.ao's ``BackendConfig`` declares
what a backend supports): the frozen-layer kinds, bit ranges and weight encodings it takes, and its op table
as a per-node check. :func:`fxquant.convert` checks the frozen graph against the declaration before lowering
starts (:func:`check_supported`), so every unsupported node is reported in one
:class:`~fxquant.UnsupportedOpError` before any compilation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from fxquant.bits import MAX_BITS, MIN_BITS
from fxquant.errors import BackendError, UnsupportedOpError
from fxquant.integer import FrozenConv2d, FrozenLayer, FrozenLinear, IntegerLayer
from fxquant.quantizers.grid import ENCODINGS

__all__ = [
    "BackendCapabilities", "register_backend", "get_backend", "backend_capabilities", "available_backends",
    "unsupported_nodes", "check_supported", "node_label",
]

Lowering = Callable[..., Any]
#: why a node cannot be lowered (None: it can), given the graph's modules by name
NodeCheck = Callable[[fx.Node, dict[str, nn.Module]], str | None]


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend lowers. ``layer_kinds``: the :class:`~fxquant.integer.FrozenLayer` kinds; ``weight_bits``
    and ``act_bits``: inclusive ranges; ``weight_encodings``: accepted weight encodings; ``node_problem``: the
    backend's op table as a check of every node (None: it runs any node the graph runs); ``stage``: how the
    error names the check (default ``backend '<name>'``)."""

    layer_kinds: tuple[type[FrozenLayer], ...] = (FrozenConv2d, FrozenLinear)
    weight_bits: tuple[int, int] = (MIN_BITS, MAX_BITS)
    act_bits: tuple[int, int] = (MIN_BITS, MAX_BITS)
    weight_encodings: tuple[str, ...] = ENCODINGS
    node_problem: NodeCheck | None = None
    stage: str | None = None

    def layer_problem(self, layer: FrozenLayer) -> str | None:
        """Why a frozen layer is outside this declaration, or None."""
        if type(layer) not in self.layer_kinds:
            return f"{type(layer).__name__} layers are not supported"
        for what, bits, (low, high) in (("weight_bits", layer.weight_bits, self.weight_bits),
                                         ("act_bits", layer.act_bits, self.act_bits)):
            if not low <= bits <= high:
                return f"{what}={bits} outside {low}..{high}"
        if layer.weight_encoding not in self.weight_encodings:
            return f"weight_encoding={layer.weight_encoding!r} is not one of {', '.join(self.weight_encodings)}"
        return None


_REGISTRY: dict[str, tuple[Lowering, BackendCapabilities]] = {}
#: backends that live in modules with heavy imports (TVM) are imported on first use
_LAZY = {"tvm-llvm": "fxquant.backends.tvm", "tvm-arm": "fxquant.backends.tvm"}


def register_backend(name: str, capabilities: BackendCapabilities | None = None) -> Callable[[Lowering], Lowering]:
    """Register the decorated lowering function as backend ``name``, with what it supports."""

    def decorate(fn: Lowering) -> Lowering:
        _REGISTRY[name] = (fn, capabilities if capabilities is not None else BackendCapabilities())
        return fn

    return decorate


def available_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def _entry(name: str) -> tuple[Lowering, BackendCapabilities]:
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


def get_backend(name: str) -> Callable[[fx.GraphModule], Any]:
    """The lowering function of backend ``name``: ``fn(frozen_graph, **options)``."""
    return _entry(name)[0]


def backend_capabilities(name: str) -> BackendCapabilities:
    """What backend ``name`` declared it lowers."""
    return _entry(name)[1]


def node_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``name (op target)`` with the module type for call_module: how errors name a node."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        what = f"{type(module).__module__}.{type(module).__name__}" if module is not None else "missing module"
        return f"{node.name} (call_module {node.target}: {what})"
    if node.op == "call_function":
        target = node.target
        what = f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', repr(target))}".lstrip(".")
        return f"{node.name} (call_function {what})"
    return f"{node.name} ({node.op} {node.target})"


def unsupported_nodes(capabilities: BackendCapabilities, gm: fx.GraphModule) -> list[str]:
    """Every node of a frozen graph outside ``capabilities``, each as ``label: reason``, in graph order."""
    modules = dict(gm.named_modules())
    problems: list[str] = []
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        reason = capabilities.layer_problem(module.frozen) if isinstance(module, IntegerLayer) else None
        if reason is None and capabilities.node_problem is not None:
            reason = capabilities.node_problem(node, modules)
        if reason is not None:
            problems.append(f"{node_label(node, modules)}: {reason}")
    return problems


def check_supported(name: str, frozen: fx.GraphModule) -> None:
    """Raise one :class:`~fxquant.UnsupportedOpError` listing every node backend ``name`` cannot lower."""
    capabilities = backend_capabilities(name)
    problems = unsupported_nodes(capabilities, frozen)
    if problems:
        raise UnsupportedOpError(capabilities.stage or f"backend {name!r}", problems)
