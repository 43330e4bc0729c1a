"""The ``"torch"`` backend: the frozen integer graph itself, evaluated with PyTorch ops.

Integer accumulators are computed exactly (int64 results of float64 sums of integers); the float
rescale follows the order fixed in :mod:`fxquant.integer`. It is the reference the TVM backends match.
"""

from __future__ import annotations

from torch import fx

from fxquant.backends.registry import BackendCapabilities, register_backend

__all__ = ["lower_torch", "CAPABILITIES"]

#: the graph runs as it is: every node torch runs, both layer kinds, every bit-width and encoding prepare makes
CAPABILITIES = BackendCapabilities()


@register_backend("torch", CAPABILITIES)
def lower_torch(frozen: fx.GraphModule) -> fx.GraphModule:
    """Return the frozen graph in eval mode: calling it runs the integer reference."""
    return frozen.eval()
