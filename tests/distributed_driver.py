"""A tiny QAT run through the Python API, one process or one per torchrun rank (used by test_distributed.py).

    python tests/distributed_driver.py OUT_DIR STEPS
    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_driver.py OUT_DIR STEPS

Each process saves its model's state dict after every step to ``OUT_DIR/rank{RANK}.pt``. The net has no batch
norm (whose training statistics are per process under DDP) and a DSQ, an LCQ and an LSQ layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def tiny_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """conv-relu, conv-relu, linear on 8x8 inputs (28x28 give 7x7 after the strides, see ``pool``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes),
    )


def main(out: Path, steps: int) -> None:
    import fxquant
    from fxquant.data.fashion_mnist import TensorBatches
    from fxquant.placement import init_distributed
    from fxquant.training.trainer import QATTrainer, TrainSettings

    torch.set_num_threads(1)
    placement = init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    images, labels = torch.randn(45, 1, 8, 8), torch.randint(0, 10, (45,))  # batches of 10, 10, 10, 10, 5
    overrides = {"0": fxquant.LayerOverride(quantizer="dsq"), "2": fxquant.LayerOverride(quantizer="lcq")}
    config = fxquant.QuantConfig(quantizer="lsq", weight_bits=3, act_bits=3, first_last_bits=None, overrides=overrides)
    model = fxquant.prepare(tiny_net(), (images[:8],), config)
    settings = TrainSettings(epochs=2, batch_size=10, lr=0.05)
    trainer = QATTrainer(model, TensorBatches(images, labels, 10, shuffle=True, seed=0), settings, placement)
    states = []
    for _ in range(steps):
        trainer.run(1)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.save(states, out / f"rank{placement.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
