import pytest

import fxquant
from fxquant import ConfigError, LayerOverride, QuantConfig


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, "4"])
def test_invalid_weight_bits_names_option_and_range(bits):
    with pytest.raises(ConfigError, match=r"weight_bits=.* is invalid: expected an integer from 1 to 8"):
        QuantConfig(weight_bits=bits)


def test_invalid_act_bits():
    with pytest.raises(ConfigError, match=r"act_bits=0 is invalid"):
        QuantConfig(act_bits=0)


def test_unknown_quantizer_lists_allowed():
    with pytest.raises(ConfigError, match=r"quantizer='foo' is not a known quantizer; allowed: .*dsq"):
        QuantConfig(quantizer="foo")


def test_unknown_quantizer_option_lists_allowed():
    allowed = "alpha, binary_scale, learn_alpha"
    with pytest.raises(ConfigError, match=rf"\['beta'\] are not options of 'dsq'; allowed: {allowed}"):
        QuantConfig(quantizer_options={"beta": 1})


def test_dsq_alpha_out_of_range_on_prepare(tiny_net):
    with pytest.raises(ConfigError, match="0 < alpha < 0.5"):
        fxquant.prepare(tiny_net, config=QuantConfig(quantizer_options={"alpha": 0.7}))


def test_bad_bn_mode():
    with pytest.raises(ConfigError, match=r"fold_bn='maybe' is invalid; allowed: qat, inference, none"):
        QuantConfig(fold_bn="maybe")


def test_override_validation():
    with pytest.raises(ConfigError, match=r"LayerOverride.weight_bits=12"):
        LayerOverride(weight_bits=12)
    with pytest.raises(ConfigError, match=r"overrides\['fc'\] must be a LayerOverride"):
        QuantConfig(overrides={"fc": {"weight_bits": 2}})


def test_from_dict_unknown_keys_and_nested():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['wieght_bits'\]"):
        QuantConfig.from_dict({"wieght_bits": 2})
    with pytest.raises(ConfigError, match=r"overrides\['fc'\]: unknown key\(s\) \['bitz'\]"):
        QuantConfig.from_dict({"overrides": {"fc": {"bitz": 2}}})
    cfg = QuantConfig.from_dict({"weight_bits": 2, "overrides": {"fc": {"weight_bits": 8}}, "exclude": ["dw"]})
    assert cfg.overrides["fc"] == LayerOverride(weight_bits=8) and cfg.exclude == ("dw",)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_resolution_precedence():
    cfg = QuantConfig(
        weight_bits=4,
        act_bits=4,
        overrides={
            "layer1.0.conv1": LayerOverride(weight_bits=2),
            "layer1.*": LayerOverride(weight_bits=3, act_bits=3),
            "type:Linear": LayerOverride(act_bits=6),
        },
    )
    assert cfg.resolve("layer1.0.conv1", "Conv2d", False).weight_bits == 2  # exact name wins
    assert cfg.resolve("layer1.0.conv1", "Conv2d", False).act_bits == 4
    assert cfg.resolve("layer1.1.conv2", "Conv2d", False).weight_bits == 3  # pattern
    assert cfg.resolve("fc", "Linear", True).weight_bits == 8  # first/last rule, then type override
    assert cfg.resolve("fc", "Linear", True).act_bits == 6
    assert cfg.resolve("stem", "Conv2d", True).act_bits == 8
    assert QuantConfig(first_last_bits=None).resolve("stem", "Conv2d", True).weight_bits == 4


def test_override_key_matching_no_layer_is_an_error(tiny_net):
    with pytest.raises(ConfigError, match=r"config key 'conv9' matches no quantizable layer; layers are: conv1, conv2"):
        fxquant.prepare(tiny_net, config=QuantConfig(overrides={"conv9": LayerOverride(weight_bits=2)}))


def test_config_is_frozen():
    cfg = QuantConfig()
    with pytest.raises(AttributeError):
        cfg.weight_bits = 2  # type: ignore[misc]
    assert cfg.replace(weight_bits=2).weight_bits == 2
