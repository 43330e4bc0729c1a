"""Config files: YAML, TOML and JSON mirror QuantConfig; errors name the file, the key and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fxquant import BitwidthPlan, ConfigError, QuantConfig
from fxquant.io.config_file import load_config_file

YAML = """\
quantizer: dsq
weight_bits: 3
act_bits: 4
first_last_bits: 8
exclude: [fc]
overrides:
  "layer1.*": {weight_bits: 2}
  "type:Linear": {per_channel: false}
quantizer_options: {alpha: 0.3}
"""
TOML = """\
quantizer = "dsq"
weight_bits = 3
act_bits = 4
first_last_bits = 8
exclude = ["fc"]
quantizer_options = { alpha = 0.3 }

[overrides."layer1.*"]
weight_bits = 2

[overrides."type:Linear"]
per_channel = false
"""


def test_yaml_toml_and_json_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text(YAML)
    (tmp_path / "q.toml").write_text(TOML)
    expected = load_config_file(tmp_path / "q.yaml")
    (tmp_path / "q.json").write_text(json.dumps(expected.to_dict()))
    assert expected.weight_bits == 3 and expected.overrides["layer1.*"].weight_bits == 2
    assert expected.exclude == ("fc",)
    assert load_config_file(tmp_path / "q.toml").to_dict() == expected.to_dict()
    assert load_config_file(tmp_path / "q.json").to_dict() == expected.to_dict()
    assert QuantConfig.from_dict(expected.to_dict()).to_dict() == expected.to_dict()


def test_plan_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "plans").mkdir()
    BitwidthPlan({"conv1": (8, 8), "layer1.0.conv1": (2, 3)}).save(tmp_path / "plans" / "p.json")
    (tmp_path / "q.yaml").write_text("weight_bits: 4\nplan: plans/p.json\n")
    assert load_config_file(tmp_path / "q.yaml").plan.bits["layer1.0.conv1"] == (2, 3)


def test_empty_file_is_the_default_config(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("# nothing set\n")
    assert load_config_file(tmp_path / "q.yaml").to_dict() == QuantConfig().to_dict()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("q.ini", "", r"q.ini: unknown config file type '.ini'; allowed: .yaml, .yml, .toml, .json"),
        ("q.yaml", "- 1\n- 2\n", r"q.yaml: expected a mapping of QuantConfig options at top level, got list"),
        ("q.yaml", "per_channel: maybe\n", r"per_channel='maybe' is invalid: expected True or False"),
        ("q.yaml", "fold_bn: never\n", r"fold_bn='never' is invalid; allowed: qat, inference, none"),
        ("q.yaml", "overrides: {conv1: 3}\n", r"overrides\['conv1'\]=3 is invalid: expected a mapping with keys"),
        ("q.yaml", "overrides: {conv1: {bits: 3}}\n", r"overrides\['conv1'\]: unknown key\(s\) \['bits'\]; allowed:"),
        ("q.yaml", "overrides: {conv1: {quantizer: nope}}\n",
         r"overrides\['conv1'\]: LayerOverride.quantizer='nope' is not a known quantizer; allowed: .*dsq"),
        ("q.yaml", "leaf_modules: [1, 2]\n", r"leaf_modules must be a sequence of module names"),
        ("q.toml", "weight_bits = \n", r"q.toml: syntax error: .*line 1"),
        ("q.json", "{", r"q.json: syntax error: .*line 1"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(tmp_path / name)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*q.yaml: No such file"):
        load_config_file(tmp_path / "q.yaml")
