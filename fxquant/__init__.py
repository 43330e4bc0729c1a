"""fxquant: a torch.fx quantization compiler for low-bit networks on ARM.

    qmodel = fxquant.prepare(model, (x,), fxquant.QuantConfig(quantizer="dsq", weight_bits=4, act_bits=4))
    ...train qmodel...
    ref = fxquant.convert(qmodel, backend="torch")
"""

from fxquant.api import convert, freeze_bn_stats, prepare, quantized_layer_names, quantizers_of, update_schedules
from fxquant.config import LayerOverride, QuantConfig
from fxquant.errors import (
    BackendError,
    BudgetError,
    CheckpointError,
    ConfigError,
    FxQuantError,
    InputError,
    NumericsError,
    TracingError,
    UnsupportedOpError,
)
from fxquant.plan import BitwidthPlan

__version__ = "0.1.0"

__all__ = [
    "prepare",
    "convert",
    "update_schedules",
    "freeze_bn_stats",
    "quantizers_of",
    "quantized_layer_names",
    "QuantConfig",
    "LayerOverride",
    "BitwidthPlan",
    "FxQuantError",
    "ConfigError",
    "TracingError",
    "UnsupportedOpError",
    "BudgetError",
    "CheckpointError",
    "BackendError",
    "InputError",
    "NumericsError",
    "__version__",
]
