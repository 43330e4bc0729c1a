"""Converters of float elementwise ops: activations and arithmetic (modules, functions and methods).

Activations whose PyTorch kernel is a fixed sequence of IEEE operations (ReLU, ReLU6, Hardswish,
Hardsigmoid) are written in that same order so the next layer's codes match the reference exactly;
the exp-based ones (SiLU, Sigmoid) agree to float32 rounding. Arithmetic on Python values (shape sizes
in ``x.view(b, c // 2, ...)``) is evaluated at translation time.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tvm import relax, te, tirx

from fxquant.backends.tvm.context import Converter, LoweringContext
from fxquant.backends.tvm.integer_ops import fence

__all__ = ["MODULE_CONVERTERS", "FUNCTION_CONVERTERS", "METHOD_CONVERTERS"]

_F32 = "float32"


def _c(value: float) -> tirx.PrimExpr:
    return tirx.const(value, _F32)


def _hardswish(x: te.Tensor) -> te.Tensor:
    """``x * clamp(x + 3, 0, 6) / 6``, PyTorch's order."""
    return te.compute(
        x.shape, lambda *i: fence(x(*i) * tirx.max(tirx.min(x(*i) + _c(3), _c(6)), _c(0))) / _c(6), name="hardswish"
    )


def _hardsigmoid(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: tirx.max(tirx.min(x(*i) + _c(3), _c(6)), _c(0)) / _c(6), name="hardsigmoid")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: _c(1) / (_c(1) + tirx.exp(-x(*i))), name="sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: x(*i) / (_c(1) + tirx.exp(-x(*i))), name="silu")


def _relu6(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: tirx.min(tirx.max(x(*i), _c(0)), _c(6)), name="relu6")


def _unary_te(fn: Callable[[te.Tensor], te.Tensor], name: str) -> Callable[[LoweringContext, fx.Node], Any]:
    def emit(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
        return ctx.bb.emit_te(fn, ctx.value(node.args[0]), primfunc_name_hint=name)

    return emit


def _relu(ctx: LoweringContext, node: fx.Node) -> relax.Expr:
    return ctx.bb.emit(relax.op.nn.relu(ctx.value(node.args[0])))


def _is_tensor(value: Any) -> bool:
    return isinstance(value, relax.Expr)


def _operand(value: Any) -> relax.Expr:
    return value if _is_tensor(value) else relax.const(float(value), _F32)


def _fenced_multiply(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """Broadcasting multiply whose product is never fused into a following add."""
    shape = [a.shape[d] if int(a.shape[d]) != 1 else b.shape[d] for d in range(len(a.shape))]

    def at(t: te.Tensor, idx: tuple[tirx.Var, ...]) -> tirx.PrimExpr:
        offset = len(idx) - len(t.shape)
        return t(*[0 if int(t.shape[d]) == 1 else idx[offset + d] for d in range(len(t.shape))])

    return te.compute(shape, lambda *i: fence(at(a, i) * at(b, i)), name="multiply")


def _binary(relax_op: Callable[[relax.Expr, relax.Expr], relax.Expr], py_op: Callable[[Any, Any], Any]) -> Converter:
    def emit(ctx: LoweringContext, node: fx.Node) -> Any:
        lhs, rhs = ctx.value(node.args[0]), ctx.value(node.args[1])
        if not _is_tensor(lhs) and not _is_tensor(rhs):
            return py_op(lhs, rhs)
        return ctx.bb.emit(relax_op(_operand(lhs), _operand(rhs)))

    return Converter(emit, _no_alpha)


def _multiply(ctx: LoweringContext, node: fx.Node) -> Any:
    lhs, rhs = ctx.value(node.args[0]), ctx.value(node.args[1])
    if not _is_tensor(lhs) and not _is_tensor(rhs):
        return lhs * rhs
    lhs, rhs = _operand(lhs), _operand(rhs)
    if len(ctx.shape(lhs)) != len(ctx.shape(rhs)):
        return ctx.bb.emit(relax.op.multiply(lhs, rhs))
    return ctx.bb.emit_te(_fenced_multiply, lhs, rhs, primfunc_name_hint="multiply")


def _no_alpha(node: fx.Node, _: nn.Module | None) -> str | None:
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        return f"alpha={alpha!r} (only 1 is supported)"
    if node.kwargs.get("rounding_mode") is not None:
        return f"rounding_mode={node.kwargs['rounding_mode']!r}"
    if node.kwargs.get("out") is not None:
        return "out= argument"
    return None


def _static_only(py_op: Callable[[Any, Any], Any]) -> Converter:
    """Integer arithmetic on shape values; a tensor operand is not lowered."""

    def emit(ctx: LoweringContext, node: fx.Node) -> Any:
        lhs, rhs = ctx.value(node.args[0]), ctx.value(node.args[1])
        if _is_tensor(lhs) or _is_tensor(rhs):
            raise NotImplementedError(f"{py_op.__name__} of tensors")
        return py_op(lhs, rhs)

    return Converter(emit)


def _inplace_problem(node: fx.Node, module: nn.Module | None) -> str | None:
    """In place is the same as out of place unless another node still reads the overwritten input."""
    inplace = getattr(module, "inplace", False) if module is not None else node.kwargs.get("inplace", False)
    source = node.args[0] if node.args else None
    if inplace and isinstance(source, fx.Node) and len(source.users) > 1:
        return f"in-place op overwrites {source.name}, which other nodes still read"
    return None


_RELU = Converter(_relu, _inplace_problem)
_RELU6 = Converter(_unary_te(_relu6, "relu6"), _inplace_problem)
_HARDSWISH = Converter(_unary_te(_hardswish, "hardswish"), _inplace_problem)
_HARDSIGMOID = Converter(_unary_te(_hardsigmoid, "hardsigmoid"), _inplace_problem)
_SIGMOID = Converter(_unary_te(_sigmoid, "sigmoid"))
_SILU = Converter(_unary_te(_silu, "silu"), _inplace_problem)
_ADD = _binary(relax.op.add, operator.add)
_SUB = _binary(relax.op.subtract, operator.sub)
_MUL = Converter(_multiply, _no_alpha)
_DIV = _binary(relax.op.divide, operator.truediv)

MODULE_CONVERTERS: dict[type, Converter] = {
    nn.ReLU: _RELU,
    nn.ReLU6: _RELU6,
    nn.Hardswish: _HARDSWISH,
    nn.Hardsigmoid: _HARDSIGMOID,
    nn.Sigmoid: _SIGMOID,
    nn.SiLU: _SILU,
}

FUNCTION_CONVERTERS: dict[Callable[..., Any], Converter] = {
    torch.relu: _RELU,
    F.relu: _RELU,
    F.relu6: _RELU6,
    F.hardswish: _HARDSWISH,
    F.hardsigmoid: _HARDSIGMOID,
    torch.sigmoid: _SIGMOID,
    F.sigmoid: _SIGMOID,
    F.silu: _SILU,
    operator.add: _ADD,
    torch.add: _ADD,
    operator.iadd: _ADD,
    operator.sub: _SUB,
    torch.sub: _SUB,
    operator.mul: _MUL,
    torch.mul: _MUL,
    operator.imul: _MUL,
    operator.truediv: _DIV,
    torch.div: _DIV,
    operator.floordiv: _static_only(operator.floordiv),
}

METHOD_CONVERTERS: dict[str, Converter] = {
    "relu": _RELU,
    "sigmoid": _SIGMOID,
    "add": _ADD,
    "sub": _SUB,
    "mul": _MUL,
    "div": _DIV,
}
