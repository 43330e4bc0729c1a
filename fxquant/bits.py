"""The bit-widths fxquant quantizes to, and the one check every option that names a bit-width goes through.

A leaf module: it imports nothing of fxquant but its errors, so configs, plans, budgets and quantizers can all
use it without importing each other.
"""

from __future__ import annotations

from typing import Any

from fxquant.errors import ConfigError

__all__ = ["MIN_BITS", "MAX_BITS", "check_bits"]

MIN_BITS = 1
MAX_BITS = 8


def check_bits(option: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ConfigError("<option>=<value> is invalid: ...")`` unless ``value`` is an int in the range."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{option}={value!r} is invalid: expected an integer from {MIN_BITS} to {MAX_BITS}")
