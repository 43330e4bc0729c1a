"""Where a model comes from, as data: ``"package.module:function"`` plus JSON keyword arguments.

Checkpoints store a :class:`ModelSpec` instead of pickled classes, so a fresh process rebuilds the
architecture by calling the function again and then loads the weights; no training script is needed, but
the module must be importable there (installed, on ``PYTHONPATH``, or under the current directory).

Examples::

    ModelSpec("fxquant.models:resnet_small", {"num_classes": 10}).build()
    ModelSpec("torchvision:resnet18", {"num_classes": 10}).build()   # torchvision.models.get_model
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxquant.errors import ConfigError

__all__ = ["ModelSpec", "MODEL_SOURCES"]

Builder = Callable[..., nn.Module]


def _import_function(module_name: str, function: str) -> Builder:
    """``module:function`` imported like ``python -c`` would from the current directory."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"model spec {module_name}:{function}: cannot import module {module_name!r} ({exc}); the module must "
            "be importable: install it, add its folder to PYTHONPATH, or run from the folder that holds it"
        ) from exc
    except Exception as exc:  # a syntax error or an exception while the module runs
        where = f" ({exc.filename}:{exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ConfigError(
            f"model spec {module_name}:{function}: importing module {module_name!r} failed{where}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"model spec {module_name}:{function}: module {module_name!r} has no function {function!r}")
    return fn


def _torchvision_function(name: str) -> Builder:
    from torchvision import models

    if name not in models.list_models():
        raise ConfigError(f"model spec torchvision:{name}: unknown torchvision model; e.g. resnet18, mobilenet_v2")
    return lambda **kwargs: models.get_model(name, weights=None, **kwargs)


#: spec prefix -> resolver of the part after the colon; any other prefix is an importable module
MODEL_SOURCES: dict[str, Callable[[str], Builder]] = {"torchvision": _torchvision_function}


@dataclass(frozen=True)
class ModelSpec:
    """A model builder (``"module:function"`` or ``"torchvision:name"``) and its keyword arguments."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, sep, function = self.target.partition(":")
        if not sep or not module or not function.isidentifier():
            raise ConfigError(
                f"model spec {self.target!r} is invalid: expected 'package.module:function' "
                "(e.g. fxquant.models:resnet20) or 'torchvision:NAME' (e.g. torchvision:resnet18)"
            )
        if not isinstance(self.kwargs, Mapping):
            raise ConfigError(f"model kwargs must be a JSON object, got {self.kwargs!r}")
        try:
            json.dumps(dict(self.kwargs), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model kwargs must be plain JSON values (checkpoints store them): {exc}") from exc
        object.__setattr__(self, "kwargs", dict(sorted(self.kwargs.items())))

    def function(self) -> Builder:
        prefix, _, name = self.target.partition(":")
        resolve = MODEL_SOURCES.get(prefix)
        return resolve(name) if resolve is not None else _import_function(prefix, name)

    def build(self) -> nn.Module:
        """Call the builder; the caller seeds torch first when the initial weights must be reproducible."""
        fn = self.function()
        try:
            model = fn(**self.kwargs)
        except TypeError as exc:
            raise ConfigError(f"model spec {self}: the builder rejected its arguments: {exc}") from exc
        except Exception as exc:  # the user's code failed; say whose
            raise ConfigError(f"model spec {self}: the builder raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model spec {self}: the builder returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(str(data["target"]), dict(data.get("kwargs") or {}))

    def __str__(self) -> str:
        return self.target + (f" {json.dumps(dict(self.kwargs), sort_keys=True)}" if self.kwargs else "")
