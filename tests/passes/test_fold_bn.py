import copy

import torch
from torch import nn

from fxquant.layers import FusedBn
from fxquant.passes import fold_bn, fuse_bn_for_qat, trace


def _bn_nodes(gm):
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d)]


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_inference_fold_is_exact_and_removes_every_bn(tiny_net):
    model = _randomize_bn(tiny_net)
    x = torch.randn(4, 3, 12, 12)
    gm = fold_bn(trace(copy.deepcopy(model)))
    assert _bn_nodes(gm) == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"]
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_resnet18_fold():
    import torchvision

    model = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    gm = fold_bn(trace(copy.deepcopy(model)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-4)


class SharedConv(nn.Module):
    """The conv output feeds the batch norm and something else: folding would change the other user."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_bn_with_shared_input_is_skipped_and_reported():
    model = _randomize_bn(SharedConv())
    gm = fold_bn(trace(copy.deepcopy(model)))
    assert len(_bn_nodes(gm)) == 1
    assert gm.meta["fxquant.skipped_bn"] == ["bn: conv has other users"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_linear_bn1d_fold():
    model = _randomize_bn(LinearBn())
    gm = fold_bn(trace(copy.deepcopy(model)))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in gm.modules())
    x = torch.randn(4, 6)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_qat_fusion_keeps_bn_training():
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    gm = fuse_bn_for_qat(trace(copy.deepcopy(model)))
    fused = [m for m in gm.modules() if isinstance(m, FusedBn)]
    assert len(fused) == 1 and _bn_nodes(gm) == []
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(gm.eval()(x), model(x))
    before = fused[0].bn.running_mean.clone()
    gm.train()(x)
    assert not torch.equal(before, fused[0].bn.running_mean)  # statistics keep updating in training
