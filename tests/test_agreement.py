"""The train/eval agreement check and batch-norm re-estimation (fxquant.training.agreement)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import ConfigError, InputError
from fxquant.training.agreement import check_agreement, ensure_agreement, reestimate_bn
from tests.conftest import calibrate_bn


def _net() -> nn.Module:
    """conv-bn-relu twice and a linear head on the whole map: outputs that differ from image to image."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5))
    return calibrate_bn(net, (8, 3, 8, 8))


@pytest.fixture(autouse=True)
def _torch_quantizers(monkeypatch):
    monkeypatch.setenv("FXQUANT_TVM_KERNELS", "0")  # the PyTorch reference path: no kernel compilation here


def _prepared():
    x = torch.randn(32, 3, 8, 8)
    q = fxquant.prepare(_net(), (x,), fxquant.QuantConfig(quantizer="dsq", weight_bits=2, act_bits=2))
    batches = [(torch.randn(32, 3, 8, 8), torch.zeros(32, dtype=torch.long)) for _ in range(4)]
    reestimate_bn(q, batches)  # statistics of the quantized model to start from
    with torch.no_grad():  # labels: the eval-mode predictions, so a drift shows as lost eval accuracy
        q.eval()
        batches = [(x, q(x).argmax(1)) for x, _ in batches]
    return q, batches


def test_check_changes_no_state():
    q, batches = _prepared()
    q.eval()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    report = check_agreement(q, batches)
    assert not q.training and not any(m.training for m in q.modules())
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())
    assert report.samples == 128
    assert report.eval_accuracy == 100.0, report
    assert report.gap == abs(report.train_accuracy - report.eval_accuracy)
    assert report.to_dict()["passed"] == report.passed


def test_reestimation_repairs_drifted_statistics():
    q, batches = _prepared()
    bn = q.get_submodule("3").bn
    bn.running_mean.add_(3.0 * bn.running_var.sqrt())  # statistics that lag far behind the batch ones
    drifted = check_agreement(q, batches)
    assert not drifted.passed and drifted.disagreement > 0.2
    report = ensure_agreement(q, batches, tolerance=2.0)
    assert report.reestimated and report.gap_before == drifted.gap
    assert report.eval_accuracy > 85.0 and report.disagreement < drifted.disagreement / 2, report.summary()
    x = batches[0][0]
    with torch.no_grad():  # the deployed integer graph is the re-estimated eval model, exactly
        assert torch.equal(q.eval()(x), fxquant.convert(q, backend="torch")(x))


def test_passing_check_leaves_statistics_alone():
    q, batches = _prepared()
    before = q.get_submodule("3").bn.running_var.clone()
    report = ensure_agreement(q, batches, tolerance=100.0)
    assert report.passed and not report.reestimated
    assert torch.equal(q.get_submodule("3").bn.running_var, before)


def test_bad_arguments():
    q, batches = _prepared()
    with pytest.raises(ConfigError, match="tolerance=-1"):
        check_agreement(q, batches, tolerance=-1)
    with pytest.raises(InputError, match="at least one batch"):
        check_agreement(q, [])
    with pytest.raises(ConfigError, match="max_batches=0"):
        reestimate_bn(q, batches, max_batches=0)
