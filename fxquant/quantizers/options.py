"""Typed quantizer options: each scheme declares a frozen dataclass of its options next to its quantizer.

``QuantConfig.quantizer_options`` holds an instance of the configured scheme's class, given directly or
converted from the plain mapping of a config file, the CLI or a checkpoint; :meth:`QuantizerOptions.to_dict`
is the plain form that reports and checkpoints store. Field types are checked from the annotations (``bool``,
``int``, ``float``, ``str``, ``Literal``), each error naming the option and the allowed values; a scheme adds
its range checks in :meth:`QuantizerOptions.check`.

An instance also reads like the mapping it replaces (``options["alpha"]``, ``dict(options)``), and equals a
mapping that gives the same options, so code written against the untyped dict keeps working.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Literal

from fxquant.errors import ConfigError

__all__ = ["QuantizerOptions", "option_default"]


def option_default(f: Field) -> Any:
    """The default value of an option field (``default`` or ``default_factory()``)."""
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checked(option: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the annotation ``kind`` (ints are accepted, and converted, where floats are)."""
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(
                f"quantizer_options {option}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}"
            )
        return value
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"quantizer_options {option}={value!r} is invalid: expected True or False")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"quantizer_options {option}={value!r} is invalid: expected an integer")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"quantizer_options {option}={value!r} is invalid: expected a number")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"quantizer_options {option}={value!r} is invalid: expected a string")
    return value


@dataclass(frozen=True, eq=False)
class QuantizerOptions(Mapping[str, Any]):
    """Base class of the option dataclasses; subclasses are ``@dataclass(frozen=True, eq=False)``.

    ``eq=False`` keeps this class's equality, which also compares with plain mappings.
    """

    def __post_init__(self) -> None:
        types = _field_types(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), types[f.name]))
        self.check()

    def check(self) -> None:
        """Range and cross-option checks of the scheme (may normalise a field with ``object.__setattr__``)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name -> default value."""
        return {f.name: option_default(f) for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """Every option as plain data (nested options as mappings): the form stored in reports and checkpoints."""
        return {k: v.to_dict() if isinstance(v, QuantizerOptions) else v for k, v in self.items()}

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults, as plain data."""
        defaults = self.defaults()
        return {k: v for k, v in self.to_dict().items() if getattr(self, k) != defaults[k]}

    # -- the mapping view ---------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key not in self.defaults():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self))

    def __len__(self) -> int:
        return len(fields(self))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping) and not isinstance(other, QuantizerOptions):
            try:
                other = type(self)(**other)
            except (ConfigError, TypeError):
                return False
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(getattr(self, k) for k in self)))
