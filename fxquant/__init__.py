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
from fxquant.input_guard import InputGuard
from fxquant.io.checkpoint import Checkpoint, load_prepared, load_reference, read_checkpoint, save_checkpoint
from fxquant.io.config_file import load_config_file
from fxquant.io.model_spec import ModelSpec, ModelTrust
from fxquant.plan import BitwidthPlan
from fxquant.sdq.budget import Budget
from fxquant.sdq.search import SearchOptions, search, search_report
from fxquant.version import __version__

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
    "search",
    "search_report",
    "SearchOptions",
    "Budget",
    "FxQuantError",
    "ConfigError",
    "TracingError",
    "UnsupportedOpError",
    "BudgetError",
    "CheckpointError",
    "BackendError",
    "InputError",
    "NumericsError",
    "Checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "load_prepared",
    "load_reference",
    "load_config_file",
    "ModelSpec",
    "ModelTrust",
    "InputGuard",
    "__version__",
]
