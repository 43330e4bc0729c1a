"""A checkpoint is data: loading one imports and calls its model spec only when the caller trusts it.

Hostile specs (``os:system``, ``subprocess:check_call``, ``builtins:exec``, a module with an import-time side
effect) must run nothing, through the API and through every CLI command that loads a checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant import CheckpointError, ConfigError
from fxquant.cli.main import main
from fxquant.io.checkpoint import Checkpoint, load_prepared, load_reference, save_checkpoint
from fxquant.io.model_spec import ModelSpec, ModelTrust
from tests.conftest import TinyNet

SHAPE = (1, 28, 28)  # fashion-mnist, so commands that read data get as far as the model
SIDE_EFFECT_MODULE = "fxq_side_effect_nets"
TINY_KWARGS = {"in_channels": 1, "classes": 3}


def hostile_specs(marker: Path) -> dict[str, ModelSpec]:
    return {
        "os:system": ModelSpec("os:system", {"command": f"touch {marker}"}),
        "subprocess:check_call": ModelSpec("subprocess:check_call", {"args": ["touch", str(marker)]}),
        "builtins:exec": ModelSpec("builtins:exec", {"source": f"open({str(marker)!r}, 'w')"}),
    }


@pytest.fixture(scope="module")
def tiny_checkpoint() -> Checkpoint:
    torch.manual_seed(0)
    qmodel = fxquant.prepare(TinyNet(1, classes=3), (torch.randn(4, *SHAPE),), fxquant.QuantConfig())
    return Checkpoint.from_prepared(qmodel, SHAPE, ModelSpec("tests.conftest:TinyNet", TINY_KWARGS))


@pytest.fixture(scope="module")
def tiny_reference(tiny_checkpoint) -> Checkpoint:
    return tiny_checkpoint.to_reference(fxquant.convert(tiny_checkpoint.build_prepared().eval(), backend="torch"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory, holding a module that writes a marker file when imported."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading appends the current directory
    importlib.invalidate_caches()
    (tmp_path / f"{SIDE_EFFECT_MODULE}.py").write_text(textwrap.dedent(f"""\
        open({str(tmp_path / 'imported.marker')!r}, "w").close()
        from tests.conftest import TinyNet
        """))
    monkeypatch.delitem(sys.modules, SIDE_EFFECT_MODULE, raising=False)
    return tmp_path


def write(checkpoint: Checkpoint, spec: ModelSpec, path: Path) -> Path:
    save_checkpoint(dataclasses.replace(checkpoint, model=spec), path)
    return path


@pytest.mark.parametrize("target", ["os:system", "subprocess:check_call", "builtins:exec"])
def test_hostile_spec_runs_nothing(tiny_reference, workdir: Path, target: str) -> None:
    marker = workdir / "pwned"
    path = write(tiny_reference, hostile_specs(marker)[target], workdir / "evil.ckpt")
    with pytest.raises(CheckpointError, match=rf"model spec {target} is not trusted.*trust_model_code=True"):
        load_prepared(path)
    with pytest.raises(CheckpointError, match=rf"model spec {target} is not trusted"):
        load_reference(path)
    # trusting the code does not make a non-model callable: it is refused before the call
    with pytest.raises(CheckpointError, match=r"not declared to build a torch.nn.Module"):
        load_prepared(path, trust_model_code=True)
    assert not marker.exists()


def test_module_with_import_side_effect_is_not_imported_unless_trusted(tiny_checkpoint, workdir: Path) -> None:
    spec = ModelSpec(f"{SIDE_EFFECT_MODULE}:TinyNet", TINY_KWARGS)
    path = write(tiny_checkpoint, spec, workdir / "side.ckpt")
    with pytest.raises(CheckpointError, match=rf"{SIDE_EFFECT_MODULE}:TinyNet is not trusted, so it was neither"):
        load_prepared(path)
    assert not (workdir / "imported.marker").exists() and SIDE_EFFECT_MODULE not in sys.modules
    assert isinstance(load_prepared(path, trusted_models=[f"{SIDE_EFFECT_MODULE}:*"]), torch.fx.GraphModule)
    assert (workdir / "imported.marker").exists()  # trusted: imported as any Python module is


def test_trust_sources(tiny_checkpoint, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(f"{SIDE_EFFECT_MODULE}:TinyNet", TINY_KWARGS)
    assert not ModelTrust().allows(spec.target)
    assert ModelTrust(trust_model_code=True).allows(spec.target)
    assert ModelTrust(allow=("fxq_side_*",)).allows(spec.target)
    assert ModelTrust().allows("fxquant.models:resnet20") and ModelTrust().allows("torchvision:resnet18")
    assert not ModelTrust().allows("fxquant.api:prepare") and not ModelTrust().allows("torchvision.io:read_file")
    monkeypatch.setenv("FXQUANT_TRUSTED_MODELS", f"other.*, {SIDE_EFFECT_MODULE}:*")
    assert ModelTrust().allows(spec.target)
    path = write(tiny_checkpoint, spec, workdir / "side.ckpt")
    assert isinstance(load_prepared(path), torch.fx.GraphModule)


def test_passing_the_model_needs_no_trust(tiny_checkpoint, workdir: Path) -> None:
    marker = workdir / "pwned"
    path = write(tiny_checkpoint, hostile_specs(marker)["os:system"], workdir / "evil.ckpt")
    model = load_prepared(path, TinyNet(1, classes=3))
    assert isinstance(model, torch.fx.GraphModule) and not marker.exists()


def test_named_spec_must_be_a_model_builder() -> None:
    for target in ("os:system", "builtins:exec", "subprocess:check_call", "fxquant.io.model_spec:ModelSpec"):
        with pytest.raises(ConfigError, match=rf"{target}: the target is .* not declared to build a torch.nn"):
            ModelSpec(target).build()


@pytest.mark.parametrize("command", [
    ["train", "evil.ckpt", "--epochs", "1", "--train-subset", "8", "-o", "out.ckpt"],
    ["convert", "evil.ckpt", "-o", "out.ckpt"],
    ["inspect", "evil.ckpt"],
    ["verify", "evil.ckpt", "--reference", "evil.ckpt", "--test-subset", "8"],
    ["verify", "--backend", "torch", "--reference", "evil.ckpt", "--test-subset", "8"],
])
def test_every_cli_command_checks_trust(tiny_checkpoint, workdir: Path, capsys, command: list[str]) -> None:
    marker = workdir / "pwned"
    for spec in hostile_specs(marker).values():
        write(tiny_checkpoint, spec, workdir / "evil.ckpt")
        assert main(command) == 1
        err = capsys.readouterr().err.strip()
        assert f"model spec {spec.target} is not trusted" in err and "--trust-model-code" in err, err
        assert len(err.splitlines()) == 1
        assert main([*command, "--trust-model-code", "--force"]) == 1
        assert "not declared to build a torch.nn.Module" in capsys.readouterr().err
        assert not marker.exists() and not (workdir / "out.ckpt").exists()
        (workdir / "evil.ckpt").unlink()


def test_cli_trust_model_pattern_loads(tiny_checkpoint, workdir: Path, capsys) -> None:
    write(tiny_checkpoint, ModelSpec(f"{SIDE_EFFECT_MODULE}:TinyNet", TINY_KWARGS), workdir / "side.ckpt")
    assert main(["inspect", "side.ckpt"]) == 1
    assert not (workdir / "imported.marker").exists()
    assert main(["inspect", "side.ckpt", "--trust-model", f"{SIDE_EFFECT_MODULE}:*", "--force"]) == 0
    assert "conv1" in capsys.readouterr().out
