"""The resumable trainer: stopping anywhere (mid-epoch or at an epoch end) and continuing from a checkpoint
gives exactly the uninterrupted run."""

from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant import CheckpointError
from fxquant.data.fashion_mnist import TensorBatches
from fxquant.io.checkpoint import Checkpoint
from fxquant.training.trainer import QATTrainer, TrainSettings
from tests.conftest import TinyNet, calibrate_bn

SETTINGS = TrainSettings(data="random", epochs=2, batch_size=4, lr=0.05)


@pytest.fixture(scope="module")
def prepared() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = calibrate_bn(TinyNet(), (8, 3, 8, 8))
    return fxquant.prepare(model, (torch.randn(8, 3, 8, 8),), fxquant.QuantConfig(weight_bits=3, act_bits=3))


def batches() -> TensorBatches:
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 3, 8, 8, generator=generator), torch.randint(0, 5, (12,), generator=generator)
    return TensorBatches(images, labels, SETTINGS.batch_size, shuffle=True, seed=SETTINGS.seed)  # 3 steps/epoch


def trainer_for(prepared: torch.fx.GraphModule) -> QATTrainer:
    torch.manual_seed(SETTINGS.seed)
    return QATTrainer(copy.deepcopy(prepared), batches(), SETTINGS)


@pytest.mark.parametrize("stop_after", [2, 3])  # mid-epoch, and exactly at the end of the first epoch
def test_resumed_run_equals_the_uninterrupted_one(prepared, stop_after: int) -> None:
    straight = trainer_for(prepared)
    straight.run()
    assert (straight.global_step, straight.epoch, straight.finished) == (6, 2, True)
    assert straight.agreement is not None and straight.agreement.samples > 0  # the end-of-schedule check ran

    first = trainer_for(prepared)
    first.run(max_steps=stop_after)
    assert (first.global_step, first.finished) == (stop_after, False) and first.agreement is None
    saved = Checkpoint.from_prepared(first.model, (3, 8, 8), training=first.state_dict()).to_bytes()
    torch.manual_seed(999)  # a new process starts from some other RNG state

    loaded = Checkpoint.from_bytes(saved)
    resumed = QATTrainer(loaded.build_prepared(TinyNet()), batches(), SETTINGS)
    resumed.load_state_dict(loaded.training)
    resumed.run()
    final = resumed.model.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in straight.model.state_dict().items())
    assert Checkpoint.from_prepared(resumed.model, (3, 8, 8), training=resumed.state_dict()).to_bytes() == (
        Checkpoint.from_prepared(straight.model, (3, 8, 8), training=straight.state_dict()).to_bytes()
    )


def test_quantizer_schedules_follow_the_global_step(prepared, monkeypatch) -> None:
    trainer = trainer_for(prepared)
    seen = []
    monkeypatch.setattr("fxquant.training.trainer.update_schedules", lambda model, progress: seen.append(progress))
    trainer.run(max_steps=4)
    assert seen == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6])


def test_state_from_other_settings_is_refused(prepared) -> None:
    trainer = trainer_for(prepared)
    trainer.run(max_steps=1)
    other = QATTrainer(copy.deepcopy(prepared), batches(), TrainSettings(data="random", epochs=2, batch_size=4, lr=1.0))
    with pytest.raises(CheckpointError, match="training state was made with other settings"):
        other.load_state_dict(trainer.state_dict())


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": -1}, {"lr": -0.1}, {"epochs": 1.5},
                                 {"agreement_tolerance": -1.0}])
def test_invalid_settings_name_the_option(bad) -> None:
    with pytest.raises(fxquant.ConfigError, match=f"{next(iter(bad))}=.* is invalid"):
        TrainSettings(**bad)


def test_settings_round_trip_and_unknown_keys_are_named() -> None:
    assert TrainSettings.from_dict(SETTINGS.to_dict()) == SETTINGS
    with pytest.raises(fxquant.ConfigError, match=r"unknown training setting\(s\) \['epoch'\]; allowed: .*epochs"):
        TrainSettings.from_dict({**SETTINGS.to_dict(), "epoch": 3})
