"""State shared by the converters while one frozen graph is translated to Relax, and the converter type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import tvm
from torch import fx, nn
from tvm import relax, tirx

from fxquant.backends.registry import node_label
from fxquant.backends.tvm.options import TvmOptions
from fxquant.errors import BackendError

__all__ = ["Converter", "LayerRecord", "LoweringContext", "node_label"]

T = TypeVar("T")


@dataclass(frozen=True)
class LayerRecord:
    """One compute layer as the manifest reports it: which kernel it got and why."""

    name: str
    kind: str
    kernel: str
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)



#: expressions that are values of their own (tensor and prim constants, shapes, strings, callees)
_LEAVES = (tvm.ir.expr.Constant, tvm.ir.expr.StringImm, relax.ShapeExpr, relax.ExternFunc, tvm.ir.GlobalVar, tvm.ir.Op)


@dataclass
class LoweringContext:
    """The BlockBuilder, the fx-node -> value environment and what the manifest will report."""

    bb: relax.BlockBuilder
    modules: dict[str, nn.Module]
    target: tvm.target.Target
    options: TvmOptions
    bitserial: ModuleType | None
    cost: Any = None  # a cost model from fxquant.backends.tvm.cost (HostTimer or StaticModel)
    prior: Any = None  # the static model that orders (and prunes) what ``cost`` times, or None
    env: dict[fx.Node, Any] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    accumulators: list[tuple[str, relax.Expr]] = field(default_factory=list)
    _cache: dict[Any, Any] = field(default_factory=dict)
    _kernels: dict[Any, tvm.ir.GlobalVar] = field(default_factory=dict)
    _constants: dict[relax.Expr, bool] = field(default_factory=dict)

    def value(self, arg: Any) -> Any:
        """An fx argument with every node replaced by its translated value (Relax expr or Python value)."""
        return fx.node.map_aggregate(arg, lambda a: self.env[a] if isinstance(a, fx.Node) else a)

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[str(node.target)]

    @staticmethod
    def shape(expr: relax.Expr) -> tuple[int, ...]:
        """Static shape of a tensor-valued Relax expression."""
        info = expr.ty
        if not isinstance(info, relax.TensorType) or info.shape is None:
            raise BackendError(f"expected a tensor with a static shape, got {info}")
        return tuple(int(d) for d in info.shape.values)

    @staticmethod
    def dtype(expr: relax.Expr) -> str:
        return str(expr.ty.dtype)

    def is_constant(self, expr: relax.Expr) -> bool:
        """Whether ``expr`` reads no function parameter. TVM's ``FoldConstant`` then evaluates it while
        building, compiled for a generic ``llvm`` CPU whatever the target (so: no target instructions there)."""
        memo, stack = self._constants, [expr]
        while stack:
            top = stack[-1]
            if top in memo:
                stack.pop()
                continue
            parts = self._operands(top)
            if parts is None or any(memo.get(part) is False for part in parts):
                memo[stack.pop()] = False
                continue
            pending = [part for part in parts if part not in memo]
            if pending:
                stack.extend(pending)
                continue
            memo[stack.pop()] = True
        return memo[expr]

    def _operands(self, expr: relax.Expr) -> list[relax.Expr] | None:
        """What ``expr`` is computed from (one level), or None where it may read a parameter."""
        if isinstance(expr, _LEAVES):
            return []
        if isinstance(expr, relax.Var):  # a parameter has no binding in the function being built
            bound = self.bb.lookup_binding(expr)
            return None if bound is None else [bound]
        if isinstance(expr, relax.Call):
            return list(expr.args)
        if isinstance(expr, relax.Tuple):
            return list(expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return [expr.tuple_value]
        return None

    def cached(self, key: Any, build: Callable[[], T]) -> T:
        """Build a kernel once per key (same shapes and dtypes): TE plus scheduling is the slow part."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def once(self, key: Any, build: Callable[[], T]) -> Callable[[], T]:
        """``build`` made lazy and run at most once (a candidate is built only if timed or chosen)."""
        return lambda: self.cached(key, build)

    def add_kernel(self, func: tirx.PrimFunc, name: str, key: Any = None) -> tvm.ir.GlobalVar:
        """Add a scheduled PrimFunc once (by ``key``); opaque so fusion leaves its schedule alone."""
        if key is not None and key in self._kernels:
            return self._kernels[key]
        if func.attrs is not None and "global_symbol" in func.attrs:
            func = func.without_attr("global_symbol")
        func = func.with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})
        gv = self.bb.add_func(func, name)
        if key is not None:
            self._kernels[key] = gv
        return gv


@dataclass(frozen=True)
class Converter:
    """How one kind of fx node becomes Relax: ``emit`` translates, ``check`` (static) says why it cannot."""

    emit: Callable[[LoweringContext, fx.Node], Any]
    check: Callable[[fx.Node, nn.Module | None], str | None] | None = None

    def unsupported_reason(self, node: fx.Node, module: nn.Module | None) -> str | None:
        return None if self.check is None else self.check(node, module)
