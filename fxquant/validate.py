"""Checks shared by every typed config (``QuantConfig``, ``Budget``, ``TrainSettings``, backend options).

A leaf module: it imports nothing of fxquant but its errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from fxquant.errors import ConfigError

__all__ = ["reject_unknown_fields", "check_bool"]


def reject_unknown_fields(cls: type, data: Mapping[str, Any], message: str) -> None:
    """Raise ``ConfigError("<message> [keys]; allowed: ...")`` for keys of ``data`` that are not fields of
    the dataclass ``cls``: every config-like ``from_dict``/``parse`` names what it does accept."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{message} {unknown}; allowed: {', '.join(sorted(known))}")


def check_bool(option: str, value: Any, allow_none: bool = False) -> None:
    """Booleans only: a string such as ``"false"`` or ``"no"`` would otherwise count as true."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ConfigError(f"{option}={value!r} is invalid: expected {allowed}")
