"""Quantization schemes, one per module; importing this package registers them all."""

from fxquant.quantizers import dsq, lcq, lsq, qn, sdq, ste  # noqa: E402,F401  (registration; sdq wraps the others)
from fxquant.quantizers.base import Quantizer, search_clip_range
from fxquant.quantizers.dsq import DSQOptions
from fxquant.quantizers.grid import QuantGrid, threshold_codes, uniform_codes
from fxquant.quantizers.lcq import LCQOptions
from fxquant.quantizers.lsq import LSQOptions
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.qn import QNOptions
from fxquant.quantizers.registry import available_quantizers, get_quantizer, register_quantizer
from fxquant.quantizers.sdq import SDQOptions
from fxquant.quantizers.ste import STEOptions

__all__ = [
    "DSQOptions",
    "LCQOptions",
    "LSQOptions",
    "QNOptions",
    "Quantizer",
    "QuantizerOptions",
    "SDQOptions",
    "STEOptions",
    "QuantGrid",
    "available_quantizers",
    "get_quantizer",
    "register_quantizer",
    "search_clip_range",
    "threshold_codes",
    "uniform_codes",
]
