"""Editing helpers the rewriting passes share (``fold_bn``, ``insert_quant``, ``freeze``)."""

from __future__ import annotations

from torch import fx, nn

__all__ = ["replace_submodule"]


def replace_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted name ``target`` of ``gm``: the ``call_module`` nodes of that name now call it.

    Example::

        replace_submodule(gm, "layer1.0.conv1", QuantLayer(...))
    """
    parent, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)
