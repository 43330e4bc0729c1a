"""QuantConfig from a YAML, TOML or JSON file; every error names the file, the key and the allowed values.

The file mirrors :class:`fxquant.QuantConfig` field for field::

    # quant.yaml
    quantizer: dsq
    weight_bits: 4
    act_bits: 4
    first_last_bits: 8
    exclude: [fc]
    overrides:
      "layer3.*": {weight_bits: 2}
    quantizer_options: {alpha: 0.3}   # the scheme's options (fields of DSQOptions for dsq)
    plan: plan.json          # optional: a BitwidthPlan file, relative to this file

TOML cannot write ``null``: leave a key out to keep its default.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from fxquant.config import LayerOverride, QuantConfig
from fxquant.errors import ConfigError
from fxquant.plan import BitwidthPlan

__all__ = ["load_config_file", "read_config_data", "config_from_data", "CONFIG_READERS"]


def _yaml(text: str) -> Any:
    return yaml.safe_load(text)


#: file suffix -> parser of the file's text
CONFIG_READERS: dict[str, Callable[[str], Any]] = {
    ".yaml": _yaml,
    ".yml": _yaml,
    ".toml": tomllib.loads,
    ".json": json.loads,
}
_PARSE_ERRORS = (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError)


def read_config_data(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed mapping in a config file (syntax errors carry the parser's line and column)."""
    path = Path(path)
    reader = CONFIG_READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"{path}: unknown config file type {path.suffix!r}; allowed: {', '.join(CONFIG_READERS)}")
    try:
        data = reader(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except _PARSE_ERRORS as exc:
        raise ConfigError(f"{path}: syntax error: {' '.join(str(exc).split())}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of QuantConfig options at top level, got {type(data).__name__}")
    return dict(data)


def _check_shapes(data: Mapping[str, Any]) -> None:
    """Type checks ``QuantConfig.from_dict`` leaves to Python (a string where a list belongs, say)."""
    for option in ("exclude", "leaf_modules"):
        value = data.get(option)
        if value is not None and (isinstance(value, str) or not isinstance(value, list)):
            raise ConfigError(f"{option}={value!r} is invalid: expected a list of layer names or patterns")
    for option in ("overrides", "quantizer_options"):
        value = data.get(option)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{option}={value!r} is invalid: expected a mapping")
    override_keys = [f.name for f in fields(LayerOverride)]
    for key, value in (data.get("overrides") or {}).items():
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"overrides[{key!r}]={value!r} is invalid: expected a mapping with keys from {', '.join(override_keys)}"
            )
        try:  # unknown keys are reported by QuantConfig.from_dict; here the values get the override's name
            LayerOverride(**{k: v for k, v in value.items() if k in override_keys})
        except ConfigError as exc:
            raise ConfigError(f"overrides[{key!r}]: {exc}") from exc


def config_from_data(data: Mapping[str, Any], base_dir: Path | None = None) -> QuantConfig:
    """Validate plain data into a QuantConfig; ``plan`` may be a path to a plan file (relative to ``base_dir``)."""
    data = dict(data)
    _check_shapes(data)
    if isinstance(data.get("plan"), str):
        plan_path = Path(data["plan"])
        data["plan"] = BitwidthPlan.load(plan_path if plan_path.is_absolute() else (base_dir or Path()) / plan_path)
    return QuantConfig.from_dict(data)


def load_config_file(path: str | os.PathLike) -> QuantConfig:
    """Read and validate a config file.

    Example::

        cfg = load_config_file("quant.yaml")   # ConfigError: "quant.yaml: weight_bits=0 is invalid: ..."
    """
    path = Path(path)
    data = read_config_data(path)
    try:
        return config_from_data(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except TypeError as exc:  # a value of a type no check anticipated
        raise ConfigError(f"{path}: invalid value: {exc}") from exc
