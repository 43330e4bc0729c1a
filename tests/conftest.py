"""Shared fixtures: small models with calibrated batch-norm statistics, deterministic seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cost_cache(tmp_path_factory: pytest.TempPathFactory):
    """One kernel-timing cache for the whole run, never the user's (a test must not depend on an old cache)."""
    import os

    old = os.environ.get("FXQUANT_CACHE_DIR")
    os.environ["FXQUANT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fxquant-cache"))
    yield
    if old is None:
        os.environ.pop("FXQUANT_CACHE_DIR", None)
    else:
        os.environ["FXQUANT_CACHE_DIR"] = old


@pytest.fixture(autouse=True, scope="session")
def _trust_test_models():
    """Checkpoints written by tests name builders in ``tests.*``; loading them needs that package trusted."""
    import os

    from fxquant.io.model_spec import TRUSTED_MODELS_ENV

    old = os.environ.get(TRUSTED_MODELS_ENV)
    os.environ[TRUSTED_MODELS_ENV] = "tests.*"
    yield
    if old is None:
        os.environ.pop(TRUSTED_MODELS_ENV, None)
    else:
        os.environ[TRUSTED_MODELS_ENV] = old


def calibrate_bn(model: nn.Module, shape: tuple[int, ...], batches: int = 2) -> nn.Module:
    """Give batch norms realistic running statistics (random-init nets otherwise collapse in eval)."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape))
    return model.eval()


class TinyNet(nn.Module):
    """conv-bn-relu, a residual add, a depthwise conv, pooling, a linear head."""

    def __init__(self, in_channels: int = 3, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def tiny_net():
    return calibrate_bn(TinyNet(), (8, 3, 12, 12))
