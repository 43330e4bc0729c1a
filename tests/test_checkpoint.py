"""Checkpoints: exact round trips (in this process and a fresh one), byte-identical files, and refusals
(damaged files, another architecture, a tampered reference) instead of silently wrong models."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant import CheckpointError, InputError
from fxquant.io.checkpoint import Checkpoint, load_prepared, load_reference, read_checkpoint, save_checkpoint
from fxquant.io.model_spec import ModelSpec
from fxquant.io.output_files import OutputExistsError
from tests.conftest import TinyNet, calibrate_bn

SPEC = ModelSpec("tests.conftest:TinyNet", {"classes": 5})
SHAPE = (3, 12, 12)


@pytest.fixture(scope="module")
def prepared() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = calibrate_bn(SPEC.build(), (8, *SHAPE))
    config = fxquant.QuantConfig(weight_bits=3, act_bits=4, plan=fxquant.BitwidthPlan({"conv2": (2, 4)}))
    return fxquant.prepare(model, (torch.randn(8, *SHAPE),), config)


@pytest.fixture
def qmodel(prepared) -> torch.fx.GraphModule:
    return copy.deepcopy(prepared)


@pytest.fixture
def checkpoint(qmodel) -> Checkpoint:
    return Checkpoint.from_prepared(qmodel, SHAPE, SPEC)


def test_round_trip_rebuilds_the_same_model(qmodel, checkpoint, tmp_path: Path) -> None:
    save_checkpoint(checkpoint, tmp_path / "q.ckpt")
    loaded = read_checkpoint(tmp_path / "q.ckpt")
    assert (loaded.kind, loaded.input_shape, loaded.model, loaded.fxquant_version) == (
        "prepared", SHAPE, SPEC, fxquant.__version__)
    assert loaded.config.to_dict() == checkpoint.config.to_dict()
    assert loaded.plan.bits == {"conv2": (2, 4)}
    rebuilt = loaded.build_prepared()
    assert rebuilt.get_submodule("conv2").weight_quant.bits == 2  # the plan is applied on rebuild
    original = qmodel.state_dict()
    assert set(rebuilt.state_dict()) == set(original)
    assert all(torch.equal(v, original[k]) for k, v in rebuilt.state_dict().items())
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), qmodel.eval()(x))


def test_fresh_process_reloads_without_the_training_code(qmodel, checkpoint, tmp_path: Path) -> None:
    """Only the model spec must be importable: the new process rebuilds, loads and matches bit for bit."""
    save_checkpoint(checkpoint, tmp_path / "q.ckpt")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.save({"x": x, "y": qmodel.eval()(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch, fxquant
        io = torch.load({str(tmp_path / 'io.pt')!r})
        model = fxquant.load_prepared({str(tmp_path / 'q.ckpt')!r}).eval()
        with torch.no_grad():
            sys.exit(0 if torch.equal(model(io["x"]), io["y"]) else 3)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_same_model_gives_identical_bytes_even_after_a_reload(checkpoint) -> None:
    first = checkpoint.to_bytes()
    assert checkpoint.to_bytes() == first
    assert Checkpoint.from_bytes(first).to_bytes() == first


def test_training_state_survives_exactly(qmodel, checkpoint) -> None:
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1, momentum=0.9)
    qmodel.train()(torch.randn(4, *SHAPE)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "step": 1, "pair": (1, 2.5), "rng": torch.get_rng_state()}
    raw = dataclasses.replace(checkpoint, training=state).to_bytes()
    loaded = Checkpoint.from_bytes(raw).training
    assert (loaded["step"], loaded["pair"]) == (1, (1, 2.5))
    assert torch.equal(loaded["rng"], state["rng"])
    momentum = {k: v["momentum_buffer"] for k, v in loaded["optimizer"]["state"].items()}
    assert set(momentum) == set(state["optimizer"]["state"])  # integer keys stay integers
    assert all(torch.equal(m, state["optimizer"]["state"][k]["momentum_buffer"]) for k, m in momentum.items())
    assert Checkpoint.from_bytes(raw).to_bytes() == raw


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-1], "is truncated"),
        (lambda raw: raw + b"x", "of the wrong length"),
        (lambda raw: raw[:-5] + b"\0\0\0\0\0", "is corrupted"),
        (lambda raw: raw.replace(b'"format": "fxquant.io.checkpoint/1"', b'"format": "fxquant.io.checkpoint/0"'),
         "format 'fxquant.io.checkpoint/0'"),
        (lambda raw: b"hello", "not an fxquant checkpoint"),
    ],
)
def test_damaged_file_raises_checkpoint_error(checkpoint, tmp_path: Path, damage, message) -> None:
    path = tmp_path / "q.ckpt"
    path.write_bytes(damage(checkpoint.to_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_other_architecture_lists_keys_and_shapes(checkpoint) -> None:
    with pytest.raises(CheckpointError) as exc:
        checkpoint.build_prepared(TinyNet(classes=7))
    message = str(exc.value)
    assert "does not match the given TinyNet" in message
    assert "fc.layer.weight: checkpoint (5, 8) vs model (7, 8)" in message
    assert "fc.layer.bias: checkpoint (5,) vs model (7,)" in message


def test_config_that_does_not_fit_the_model_is_a_checkpoint_error(checkpoint) -> None:
    """The plan names layers of TinyNet; a model without them cannot take this checkpoint."""
    with pytest.raises(CheckpointError, match="does not fit the given Sequential: plan names layers"):
        checkpoint.build_prepared(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))


def test_missing_spec_needs_a_model(qmodel) -> None:
    with pytest.raises(CheckpointError, match="records no model spec; pass the float model"):
        Checkpoint.from_prepared(qmodel, SHAPE).build_prepared()
    assert isinstance(Checkpoint.from_prepared(qmodel, SHAPE).build_prepared(SPEC.build()), torch.fx.GraphModule)


def test_reference_round_trip_checks_its_input(qmodel, checkpoint, tmp_path: Path) -> None:
    frozen = fxquant.convert(qmodel, backend="torch")
    save_checkpoint(checkpoint.to_reference(frozen), tmp_path / "ref.ckpt")
    reference = load_reference(tmp_path / "ref.ckpt")
    x = torch.randn(3, *SHAPE)
    assert torch.equal(reference(x), frozen(x))
    with pytest.raises(InputError, match=r"expected input of shape \(N, 3, 12, 12\) float32, got shape \(3, 3, 10,"):
        reference(torch.randn(3, 3, 10, 12))
    with pytest.raises(InputError, match="got dtype float64"):
        reference(x.double())
    with pytest.raises(InputError, match=r"got shape \(3, 12, 12\)"):
        reference(x[0])
    with pytest.raises(CheckpointError, match="is a prepared checkpoint; convert it first"):
        checkpoint.build_reference()
    assert isinstance(load_prepared(tmp_path / "ref.ckpt"), torch.fx.GraphModule)  # its prepared state is inside


def test_tampered_reference_is_refused(qmodel, checkpoint) -> None:
    frozen_state = fxquant.convert(qmodel, backend="torch").state_dict()
    frozen_state["conv2.weight_int"] = frozen_state["conv2.weight_int"] + 1
    tampered = dataclasses.replace(checkpoint, kind="reference", frozen_state_dict=frozen_state)
    with pytest.raises(CheckpointError, match="frozen integer state does not match .*conv2.weight_int"):
        Checkpoint.from_bytes(tampered.to_bytes()).build_reference()


def test_rebuilding_leaves_the_global_rng_alone(checkpoint) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checkpoint.build_prepared()
    assert torch.equal(torch.rand(3), expected)


def test_save_keeps_an_existing_file_unless_forced(checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "q.ckpt"
    path.write_text("earlier")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        save_checkpoint(checkpoint, path)
    assert path.read_text() == "earlier"
    save_checkpoint(checkpoint, path, force=True)
    assert read_checkpoint(path).kind == "prepared"
    assert [p.name for p in tmp_path.iterdir()] == ["q.ckpt"]  # no temporary files left behind


def test_checkpoint_with_options_in_the_old_mapping_form_loads(monkeypatch) -> None:
    """Checkpoints written before the typed options stored only the options given, as a plain mapping."""
    torch.manual_seed(0)
    model = calibrate_bn(SPEC.build(), (8, *SHAPE))
    config = fxquant.QuantConfig(quantizer="lcq", weight_bits=3, quantizer_options={"segments": 8})
    qmodel = fxquant.prepare(model, (torch.randn(8, *SHAPE),), config)
    checkpoint = Checkpoint.from_prepared(qmodel, SHAPE, SPEC)
    current_meta = Checkpoint.meta

    def old_meta(self: Checkpoint) -> dict:
        meta = current_meta(self)
        meta["config"]["quantizer_options"] = {"segments": 8}  # what QuantConfig.to_dict wrote then
        return meta

    monkeypatch.setattr(Checkpoint, "meta", old_meta)
    raw = checkpoint.to_bytes()
    monkeypatch.undo()
    assert b'"quantizer_options": {"segments": 8}' in raw  # the old form is what was written
    loaded = Checkpoint.from_bytes(raw)
    assert loaded.config == config
    assert loaded.config.to_dict()["quantizer_options"] == {"segments": 8, "weight_norm": True, "grad_scale": True}
    rebuilt = loaded.build_prepared()
    assert rebuilt.get_submodule("conv2").weight_quant.theta.numel() == 8
    original = qmodel.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in rebuilt.state_dict().items())
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), qmodel.eval()(x))
