"""Model specs: ``module:function`` and ``torchvision:name`` builders with JSON keyword arguments."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from torch import nn

from fxquant import ConfigError
from fxquant.io.model_spec import ModelSpec


def test_builds_with_kwargs_and_round_trips() -> None:
    spec = ModelSpec("fxquant.models:resnet_small", {"num_classes": 7, "in_channels": 3})
    model = spec.build()
    assert model.fc.out_features == 7 and model.conv1.in_channels == 3
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert list(spec.kwargs) == ["in_channels", "num_classes"]  # sorted: the same spec is stored the same way


def test_torchvision_models_are_built_without_weights() -> None:
    model = ModelSpec("torchvision:resnet18", {"num_classes": 4}).build()
    assert model.fc.out_features == 4
    with pytest.raises(ConfigError, match="torchvision:resnet999: unknown torchvision model"):
        ModelSpec("torchvision:resnet999").build()


def test_module_in_the_current_directory_is_importable(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_local_nets.py").write_text(textwrap.dedent("""\
        from torch import nn
        def build(width=3) -> nn.Module:
            return nn.Linear(width, 2)
        def not_a_model() -> nn.Module:
            return 42
        def unannotated():
            return nn.Linear(1, 1)
        """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert ModelSpec("my_local_nets:build", {"width": 5}).build().in_features == 5
    with pytest.raises(ConfigError, match="returned int, not a torch.nn.Module"):
        ModelSpec("my_local_nets:not_a_model").build()
    with pytest.raises(ConfigError, match="unannotated: the target is a Python function that is not declared to build"):
        ModelSpec("my_local_nets:unannotated").build()
    with pytest.raises(ConfigError, match="module 'my_local_nets' has no function 'missing'"):
        ModelSpec("my_local_nets:missing").build()
    with pytest.raises(ConfigError, match=r"the builder rejected its arguments: .*unexpected keyword argument 'depth'"):
        ModelSpec("my_local_nets:build", {"depth": 2}).build()


@pytest.mark.parametrize("target", ["resnet20", "fxquant.models:", ":resnet20", "a:b:c", "fxquant.models:res-net"])
def test_malformed_spec_says_what_is_expected(target: str) -> None:
    with pytest.raises(ConfigError, match=r"is invalid: expected 'package.module:function'"):
        ModelSpec(target)


def test_kwargs_must_be_plain_json() -> None:
    with pytest.raises(ConfigError, match="model kwargs must be plain JSON values"):
        ModelSpec("fxquant.models:resnet20", {"act": nn.ReLU()})
    with pytest.raises(ConfigError, match="model kwargs must be a JSON object"):
        ModelSpec("fxquant.models:resnet20", [1, 2])  # type: ignore[arg-type]


def test_unimportable_module_explains_what_is_needed() -> None:
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_package_x'.*PYTHONPATH"):
        ModelSpec("no_such_package_x:build").build()
