"""Where a model comes from, as data: ``"package.module:function"`` plus JSON keyword arguments.

Checkpoints store a :class:`ModelSpec` instead of pickled classes, so a fresh process rebuilds the
architecture by calling the function again and then loads the weights; no training script is needed, but
the module must be importable there (installed, on ``PYTHONPATH``, or under the current directory).

A checkpoint is data, so a spec read from one is not trusted: loading imports and calls it only when the
caller passes :class:`ModelTrust` that allows its target (``trust_model_code=True``, or a pattern of
:data:`DEFAULT_TRUSTED_MODELS`, ``$FXQUANT_TRUSTED_MODELS`` or ``allow``); otherwise nothing is imported.
Whether trusted or named by the caller, a target must be an ``nn.Module`` class or a Python function
annotated to return one, so ``os:system`` or ``builtins:exec`` are refused before anything is called.

Examples::

    ModelSpec("fxquant.models:resnet_small", {"num_classes": 10}).build()
    ModelSpec("torchvision:resnet18", {"num_classes": 10}).build()   # torchvision.models.get_model
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxquant.errors import CheckpointError, ConfigError

__all__ = ["ModelSpec", "MODEL_SOURCES", "ModelTrust", "DEFAULT_TRUSTED_MODELS", "TRUSTED_MODELS_ENV"]

#: targets (``fnmatch`` patterns over ``module:function``) that checkpoints may name without further opt-in
DEFAULT_TRUSTED_MODELS = ("fxquant.models:*", "torchvision:*", "torchvision.models:*")
#: comma-separated extra patterns, e.g. ``mypkg.nets:*,mypkg.*``
TRUSTED_MODELS_ENV = "FXQUANT_TRUSTED_MODELS"

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
    if fn is None:
        raise ConfigError(f"model spec {module_name}:{function}: module {module_name!r} has no function {function!r}")
    _check_builder(f"{module_name}:{function}", fn)
    return fn


def _returns_module(fn: Callable[..., Any]) -> bool:
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve says nothing reliable
        return False
    return isinstance(returned, type) and issubclass(returned, nn.Module)


def _check_builder(target: str, fn: Any) -> None:
    """Refuse, before any call, whatever is not an ``nn.Module`` class or a function declared to return one."""
    if inspect.isclass(fn) and issubclass(fn, nn.Module):
        return
    if inspect.isfunction(fn) and _returns_module(fn):
        return
    kind = "class" if inspect.isclass(fn) else "Python function" if inspect.isfunction(fn) else type(fn).__name__
    raise ConfigError(
        f"model spec {target}: the target is a {kind} that is not declared to build a torch.nn.Module; a spec "
        "must name an nn.Module subclass or a Python function annotated '-> nn.Module' (or a subclass)"
    )


def _torchvision_function(name: str) -> Builder:
    from torchvision import models

    if name not in models.list_models():
        raise ConfigError(f"model spec torchvision:{name}: unknown torchvision model; e.g. resnet18, mobilenet_v2")
    return lambda **kwargs: models.get_model(name, weights=None, **kwargs)


#: spec prefix -> resolver of the part after the colon; any other prefix is an importable module
MODEL_SOURCES: dict[str, Callable[[str], Builder]] = {"torchvision": _torchvision_function}


@dataclass(frozen=True)
class ModelTrust:
    """Which model specs read from a checkpoint may be imported and called.

    ``trust_model_code=True`` trusts every spec (as ``trust_remote_code`` does elsewhere); otherwise a target
    must match a pattern of :data:`DEFAULT_TRUSTED_MODELS`, of ``$FXQUANT_TRUSTED_MODELS`` or of ``allow``.
    """

    trust_model_code: bool = False
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))

    def patterns(self) -> tuple[str, ...]:
        from_env = os.environ.get(TRUSTED_MODELS_ENV, "").split(",")
        return DEFAULT_TRUSTED_MODELS + tuple(p.strip() for p in from_env if p.strip()) + self.allow

    def allows(self, target: str) -> bool:
        return self.trust_model_code or any(fnmatch.fnmatchcase(target, p) for p in self.patterns())

    def check(self, spec: ModelSpec, source: str) -> None:
        """Raise :class:`CheckpointError` naming the target and the ways to trust it, before importing anything."""
        if not self.allows(spec.target):
            raise CheckpointError(
                f"{source}: its model spec {spec.target} is not trusted, so it was neither imported nor called; "
                f"pass the float model, or trust it: trust_model_code=True (--trust-model-code), "
                f"trusted_models=[{spec.target!r}] (--trust-model {spec.target}), or add a pattern to "
                f"${TRUSTED_MODELS_ENV} (trusted by default: {', '.join(DEFAULT_TRUSTED_MODELS)})"
            )


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

    def build(self, trust: ModelTrust | None = None, source: str = "<memory>") -> nn.Module:
        """Call the builder; the caller seeds torch first when the initial weights must be reproducible.

        ``trust=None`` means the caller named this spec itself; a spec read from a file passes the caller's
        :class:`ModelTrust`, which is checked before the module is imported.
        """
        if trust is not None:
            trust.check(self, source)
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
