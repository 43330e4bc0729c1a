"""Typed, validated configuration. Every option is checked in ``__post_init__`` with a precise error."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from fxquant.bits import check_bits
from fxquant.errors import ConfigError
from fxquant.plan import BitwidthPlan
from fxquant.quantizers.registry import available_quantizers, get_quantizer
from fxquant.validate import check_bool, reject_unknown_fields

__all__ = ["LayerOverride", "QuantConfig", "LayerQuantSpec", "BN_MODES"]

if TYPE_CHECKING:
    from fxquant.quantizers.options import QuantizerOptions


BN_MODES = ("qat", "inference", "none")


def _check_quantizer(option: str, name: Any, allow_none: bool = False) -> None:
    if name is None and allow_none:
        return
    known = available_quantizers()
    if name not in known:
        raise ConfigError(f"{option}={name!r} is not a known quantizer; allowed: {', '.join(known)}")


@dataclass(frozen=True)
class LayerOverride:
    """Settings for the layers an override key selects; ``None`` keeps the global value.

    Example: ``QuantConfig(overrides={"layer4.*": LayerOverride(weight_bits=2)})``.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    quantizer: str | None = None
    per_channel: bool | None = None
    exclude: bool = False

    def __post_init__(self) -> None:
        check_bits("LayerOverride.weight_bits", self.weight_bits, allow_none=True)
        check_bits("LayerOverride.act_bits", self.act_bits, allow_none=True)
        _check_quantizer("LayerOverride.quantizer", self.quantizer, allow_none=True)
        check_bool("LayerOverride.per_channel", self.per_channel, allow_none=True)
        check_bool("LayerOverride.exclude", self.exclude)


@dataclass(frozen=True)
class LayerQuantSpec:
    """The resolved settings of one quantized layer."""

    weight_bits: int
    act_bits: int
    quantizer: str
    per_channel: bool


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`fxquant.prepare` quantizes a model.

    Override keys select layers by qualified module name (``"layer1.0.conv1"``), by glob pattern
    (``"layer4.*"``) or by module type (``"type:Linear"``). Precedence: name, then pattern, then type,
    then the first/last-layer rule, then the global values.

    ``quantizer_options`` takes the scheme's options dataclass (``DSQOptions(alpha=0.3)``) or the same options
    as a mapping (``{"alpha": 0.3}``, as in a config file); either way it holds the dataclass after validation.

    Example::

        cfg = QuantConfig(quantizer="dsq", weight_bits=4, act_bits=4, exclude=("fc",))
    """

    quantizer: str = "dsq"
    weight_bits: int = 4
    act_bits: int = 4
    per_channel: bool = True
    first_last_bits: int | None = 8
    overrides: Mapping[str, LayerOverride] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    leaf_modules: tuple[str, ...] = ()
    fold_bn: Literal["qat", "inference", "none"] = "qat"
    quantizer_options: QuantizerOptions | Mapping[str, Any] = field(default_factory=dict)
    plan: Any = None  # a fxquant.BitwidthPlan: per-layer bits from the SDQ search

    def __post_init__(self) -> None:
        _check_quantizer("quantizer", self.quantizer)
        check_bits("weight_bits", self.weight_bits)
        check_bits("act_bits", self.act_bits)
        check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        check_bool("per_channel", self.per_channel)
        if self.fold_bn not in BN_MODES:
            raise ConfigError(f"fold_bn={self.fold_bn!r} is invalid; allowed: {', '.join(BN_MODES)}")
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"overrides must be a mapping of layer key to LayerOverride, got {self.overrides!r}")
        for key, value in self.overrides.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(
                    f"overrides key {key!r} is invalid: expected a layer name, a glob pattern or 'type:ClassName' "
                    "(quote numbers in YAML)"
                )
            if not isinstance(value, LayerOverride):
                raise ConfigError(f"overrides[{key!r}] must be a LayerOverride, got {type(value).__name__}")
        for option in ("exclude", "leaf_modules"):
            value = getattr(self, option)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{option} must be a sequence of module names or patterns, got {value!r}")
            object.__setattr__(self, option, tuple(value))
        object.__setattr__(self, "overrides", dict(self.overrides))
        options = get_quantizer(self.quantizer).parse_options(self.quantizer_options)
        object.__setattr__(self, "quantizer_options", options)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again).

        A new ``quantizer`` without new ``quantizer_options`` keeps the options set to non-default values
        (as a mapping, validated against the new scheme: an option it does not have is an error).
        """
        if changes.get("quantizer", self.quantizer) != self.quantizer and "quantizer_options" not in changes:
            changes["quantizer_options"] = self.quantizer_options.changed()
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the config (used by reports and checkpoints)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "overrides":
                value = {k: {g.name: getattr(v, g.name) for g in fields(v)} for k, v in value.items()}
            elif f.name == "quantizer_options":
                value = value.to_dict()
            elif f.name == "plan":
                value = None if value is None else value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build a config from plain data (a parsed YAML/TOML/JSON file); unknown keys are errors."""
        reject_unknown_fields(cls, data, "unknown config key(s)")
        kwargs = dict(data)
        if "overrides" in kwargs:
            override_keys = {f.name for f in fields(LayerOverride)}
            overrides = {}
            for key, value in dict(kwargs["overrides"]).items():
                if not isinstance(value, Mapping):
                    raise ConfigError(f"overrides[{key!r}]={value!r} is invalid: expected a mapping with keys from "
                                      f"{', '.join(sorted(override_keys))}")
                bad = sorted(set(value) - override_keys)
                if bad:
                    raise ConfigError(
                        f"overrides[{key!r}]: unknown key(s) {bad}; allowed: {', '.join(sorted(override_keys))}"
                    )
                overrides[key] = LayerOverride(**value)
            kwargs["overrides"] = overrides
        for option in ("exclude", "leaf_modules"):
            if option in kwargs:
                kwargs[option] = tuple(kwargs[option])
        if kwargs.get("plan") is not None and not hasattr(kwargs["plan"], "bits"):
            kwargs["plan"] = BitwidthPlan.from_dict(kwargs["plan"])
        return cls(**kwargs)

    # -- resolution -------------------------------------------------------------------------------------

    def is_excluded(self, name: str, module_type: str) -> bool:
        if any(_key_matches(p, name, module_type) for p in self.exclude):
            return True
        override = self.override_for(name, module_type)
        return override is not None and override.exclude

    def override_for(self, name: str, module_type: str) -> LayerOverride | None:
        """The override that applies to layer ``name`` of type ``module_type``: by name, pattern, then type."""
        if name in self.overrides:
            return self.overrides[name]
        for key, value in self.overrides.items():
            if not key.startswith("type:") and key != name and fnmatch.fnmatchcase(name, key):
                return value
        return self.overrides.get(f"type:{module_type}")

    def resolve(self, name: str, module_type: str, is_first_or_last: bool) -> LayerQuantSpec:
        """The settings of layer ``name`` after overrides, the SDQ plan and the first/last rule."""
        weight_bits, act_bits = self.weight_bits, self.act_bits
        if is_first_or_last and self.first_last_bits is not None:
            weight_bits = act_bits = self.first_last_bits
        if self.plan is not None and name in self.plan.bits:
            weight_bits, act_bits = self.plan.bits[name]
        spec = LayerQuantSpec(weight_bits, act_bits, self.quantizer, self.per_channel)
        override = self.override_for(name, module_type)
        if override is not None:
            spec = LayerQuantSpec(
                override.weight_bits or spec.weight_bits,
                override.act_bits or spec.act_bits,
                override.quantizer or spec.quantizer,
                spec.per_channel if override.per_channel is None else override.per_channel,
            )
        return spec

    def check_keys_match(self, layers: Mapping[str, str]) -> None:
        """Fail when an override or exclude key selects no quantizable layer (a typo would be silent)."""
        for key in list(self.overrides) + list(self.exclude):
            if not any(_key_matches(key, name, typ) for name, typ in layers.items()):
                raise ConfigError(
                    f"config key {key!r} matches no quantizable layer; layers are: {', '.join(layers) or '(none)'}"
                )


def _key_matches(key: str, name: str, module_type: str) -> bool:
    if key.startswith("type:"):
        return key[5:] == module_type
    return key == name or fnmatch.fnmatchcase(name, key)
