"""Name → quantizer class. Schemes register themselves with :func:`register_quantizer`."""

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


def _load_builtin() -> None:
    import fxquant.quantizers  # noqa: F401  (importing the package registers the built-in schemes)


def available_quantizers() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_quantizer(name: str) -> type:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"quantizer={name!r} is not a known quantizer; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
