"""Typed quantizer options: the dataclass and the mapping form configure the same model, bad values name the
option, and the plain form that configs, reports and checkpoints store round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant import ConfigError, QuantConfig
from fxquant.io.config_file import config_from_data
from fxquant.quantizers import available_quantizers, get_quantizer
from fxquant.quantizers.dsq import DSQOptions
from fxquant.quantizers.lcq import LCQOptions
from fxquant.quantizers.lsq import LSQOptions
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.qn import QNOptions
from fxquant.quantizers.sdq import SDQOptions
from fxquant.quantizers.ste import STEOptions

#: scheme -> (options as a mapping, the same options as the scheme's dataclass); every value differs from its default
FORMS = {
    "dsq": ({"alpha": 0.3, "learn_alpha": False}, DSQOptions(alpha=0.3, learn_alpha=False)),
    "qn": ({"levels": "kmeans", "temperature_end": 50}, QNOptions(levels="kmeans", temperature_end=50.0)),
    "lcq": ({"segments": 8, "weight_norm": False}, LCQOptions(segments=8, weight_norm=False)),
    "lsq": ({"grad_scale": False}, LSQOptions(grad_scale=False)),
    "ste": ({"momentum": 0.5}, STEOptions(momentum=0.5)),
    "sdq": (
        {"base": "lsq", "base_options": {"grad_scale": False}, "min_bits": 2, "init_logit": 1},
        SDQOptions(base="lsq", base_options=LSQOptions(grad_scale=False), min_bits=2, init_logit=1.0),
    ),
}


def test_every_registered_scheme_declares_options():
    assert set(FORMS) == set(available_quantizers())
    for scheme, (_, typed) in FORMS.items():
        assert get_quantizer(scheme).options_class is type(typed)


@pytest.mark.parametrize("scheme", sorted(FORMS))
def test_dataclass_and_mapping_prepare_the_same_model(tiny_net, scheme):
    mapping, typed = FORMS[scheme]
    x = torch.randn(8, 3, 12, 12)
    models = []
    for options in (mapping, typed):
        config = QuantConfig(quantizer=scheme, weight_bits=3, act_bits=3, quantizer_options=options)
        assert config.quantizer_options == typed and type(config.quantizer_options) is type(typed)
        torch.manual_seed(0)
        models.append(fxquant.prepare(copy.deepcopy(tiny_net), (x,), config))
    a, b = models
    assert a.code == b.code
    assert str(a) == str(b)  # the quantizers' reprs show options such as levels and segments
    state_a, state_b = a.state_dict(), b.state_dict()
    assert set(state_a) == set(state_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert {n for n, _ in a.named_parameters()} == {n for n, _ in b.named_parameters()}  # learn_alpha, say
    quantizer = a.get_submodule("conv2").weight_quant
    assert quantizer.options == typed
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_options_change_the_model(tiny_net):
    """The comparison above is not vacuous: other options give another model."""
    default = fxquant.prepare(tiny_net, None, QuantConfig(quantizer="lcq"))
    fewer = fxquant.prepare(tiny_net, None, QuantConfig(quantizer="lcq", quantizer_options={"segments": 4}))
    assert default.get_submodule("conv2").weight_quant.theta.numel() == 16
    assert fewer.get_submodule("conv2").weight_quant.theta.numel() == 4


@pytest.mark.parametrize(
    ("scheme", "options", "message"),
    [
        ("dsq", {"alpha": 0.7}, r"alpha=0.7 is invalid: DSQ needs 0 < alpha < 0.5"),
        ("dsq", {"alpha": "0.3"}, r"alpha='0.3' is invalid: expected a number"),
        ("dsq", {"learn_alpha": "no"}, r"learn_alpha='no' is invalid: expected True or False"),
        ("lsq", {"binary_scale": "median"}, r"binary_scale='median' is invalid; allowed: mean, learned"),
        ("qn", {"levels": "median"}, r"levels='median' is invalid; allowed: uniform, kmeans"),
        ("qn", {"temperature_end": 0}, r"temperature_end=0.0 is invalid: QN temperatures must be positive"),
        ("qn", {"outlier_sigmas": -1}, r"outlier_sigmas=-1.0 is invalid"),
        ("lcq", {"segments": 2.5}, r"segments=2.5 is invalid: expected an integer"),
        ("lcq", {"segments": 0}, r"segments=0 is invalid: expected a positive integer"),
        ("ste", {"momentum": 2}, r"momentum=2.0 is invalid: expected 0 <= momentum <= 1"),
        ("sdq", {"min_bits": 9}, r"min_bits=9 is invalid: expected an integer from 1 to 8"),
        ("sdq", {"base_options": {"alpha": 0.9}}, r"alpha=0.9 is invalid: DSQ needs"),
        ("sdq", {"base": "lsq", "base_options": {"alpha": 0.3}}, r"\['alpha'\] are not options of 'lsq'"),
    ],
)
def test_bad_value_names_the_option(scheme, options, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(quantizer=scheme, quantizer_options=options)
    typed = get_quantizer(scheme).options_class
    with pytest.raises(ConfigError, match=message):
        typed(**options)


def test_dataclass_of_another_scheme_is_refused():
    with pytest.raises(ConfigError, match="quantizer_options is a DSQOptions, but quantizer 'lsq' takes LSQOptions"):
        QuantConfig(quantizer="lsq", quantizer_options=DSQOptions())
    with pytest.raises(ConfigError, match="expected a mapping or DSQOptions"):
        QuantConfig(quantizer_options=[("alpha", 0.3)])


def test_plain_form_round_trips():
    config = QuantConfig(quantizer="sdq", quantizer_options=FORMS["sdq"][1])
    plain = config.to_dict()["quantizer_options"]
    assert plain == {"base": "lsq", "base_options": {"grad_scale": False, "binary_scale": "mean"}, "min_bits": 2,
                     "temperature": 1.0, "init_logit": 1.0}
    assert type(plain) is dict and type(plain["base_options"]) is dict
    assert QuantConfig.from_dict(config.to_dict()) == config
    from_file = config_from_data({"quantizer": "sdq", "quantizer_options": FORMS["sdq"][0]})
    assert from_file == config


def test_mapping_view_and_replace():
    options = QuantConfig(quantizer_options={"alpha": 0.3}).quantizer_options
    assert isinstance(options, QuantizerOptions)
    assert options["alpha"] == options.alpha == 0.3 and dict(options)["learn_alpha"] is True
    assert options.changed() == {"alpha": 0.3}
    with pytest.raises(KeyError):
        options["beta"]
    # a new scheme keeps the options set away from their defaults, validated against it
    learned = QuantConfig(quantizer_options={"binary_scale": "learned"}).replace(quantizer="lsq")
    assert learned.quantizer_options == LSQOptions(binary_scale="learned")
    with pytest.raises(ConfigError, match=r"\['alpha'\] are not options of 'lsq'"):
        QuantConfig(quantizer_options={"alpha": 0.3}).replace(quantizer="lsq")
