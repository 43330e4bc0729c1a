"""Every failure fxquant reports is a subclass of :class:`FxQuantError`, so pipelines can catch one type."""

from __future__ import annotations

__all__ = [
    "FxQuantError",
    "ConfigError",
    "TracingError",
    "UnsupportedOpError",
    "BudgetError",
    "CheckpointError",
    "BackendError",
    "InputError",
    "NumericsError",
]


class FxQuantError(Exception):
    """Base class of every error raised by fxquant."""


class ConfigError(FxQuantError, ValueError):
    """A configuration value is invalid; the message names the option and the allowed values."""


class TracingError(FxQuantError):
    """Symbolic tracing failed; the message names the module and the source line that broke it."""


class UnsupportedOpError(FxQuantError):
    """One or more graph nodes cannot be handled; the message lists every one of them."""

    def __init__(self, stage: str, nodes: list[str]):
        self.stage = stage
        self.nodes = list(nodes)
        listing = "\n".join(f"  - {n}" for n in self.nodes)
        super().__init__(f"{stage}: {len(self.nodes)} unsupported op(s):\n{listing}")


class BudgetError(FxQuantError):
    """A bitwidth budget cannot be met."""


class CheckpointError(FxQuantError):
    """A checkpoint is corrupted, from another version, or from another architecture."""


class BackendError(FxQuantError):
    """A backend could not lower, build or run a model."""


class InputError(FxQuantError, ValueError):
    """A converted model was called with an input of the wrong shape or dtype."""


class NumericsError(FxQuantError, FloatingPointError):
    """A NaN or Inf appeared; the message names the layer where it first showed up."""
