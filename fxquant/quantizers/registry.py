"""Name → quantizer class. Schemes register themselves with :func:`register_quantizer`.

Importing this module imports its package first, and the package imports every built-in scheme: the
registry is complete whenever it can be called.
"""

from __future__ import annotations

from collections.abc import Callable

from fxquant.errors import ConfigError

__all__ = ["register_quantizer", "get_quantizer", "available_quantizers"]

_REGISTRY: dict[str, type] = {}


def register_quantizer(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"quantizer {name!r} is registered twice")
        cls.scheme = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_quantizers() -> list[str]:
    return sorted(_REGISTRY)


def get_quantizer(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"quantizer={name!r} is not a known quantizer; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
