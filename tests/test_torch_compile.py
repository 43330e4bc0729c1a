"""``torch.compile`` of a prepared model in training: forward and backward equal to eager.

One small net holds a layer of every scheme (per-layer quantizer overrides), with batch-norm folding in QAT,
so that one compile covers every scheme. ``aot_eager`` runs dynamo capture, AOT autograd and its
forward/backward partition (where compiled QAT batch-norm folding used to fail); inductor adds C++ code
generation on top, which takes minutes on the 2-core CI host, so it runs where ``FXQUANT_TEST_INDUCTOR=1``
(``benchmarks/gpu_check.sh`` sets it) and the CI runs ``aot_eager``.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from torch import nn

import fxquant

SCHEMES = ("dsq", "lcq", "lsq", "qn", "ste")


class EverySchemeNet(nn.Module):
    """conv-bn-relu per scheme (the first with a signed input), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4 if i else 3, 4, 3, padding=1, bias=False) for i in range(len(SCHEMES)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in SCHEMES)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = torch.relu(bn(conv(x)))
        return self.fc(torch.flatten(x, 1))


def _prepared() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 4, 4)
    overrides = {f"convs.{i}": fxquant.LayerOverride(quantizer=s) for i, s in enumerate(SCHEMES)}
    config = fxquant.QuantConfig(quantizer="lsq", weight_bits=3, act_bits=3, first_last_bits=None, overrides=overrides)
    qmodel = fxquant.prepare(EverySchemeNet(), (x,), config).train()
    fxquant.update_schedules(qmodel, 0.5)
    return qmodel, x


def test_every_scheme_is_in_the_net():
    qmodel, _ = _prepared()
    kinds = {type(m.weight_quant).__name__.lower() for m in qmodel.modules() if hasattr(m, "weight_quant")}
    assert len(kinds) >= len(SCHEMES), kinds


BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("FXQUANT_TEST_INDUCTOR") == "1" else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_steps_match_eager(backend):
    """Two steps (forward, backward, SGD): outputs, every gradient and the batch-norm statistics agree."""
    torch._dynamo.reset()
    eager, x = _prepared()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, dynamic=False)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, compiled_model)]
    start = time.perf_counter()
    for _ in range(2):
        outputs = []
        for model, opt in zip((eager, compiled), optimizers, strict=True):
            y = model(x)
            opt.zero_grad()
            y.square().mean().backward()
            outputs.append(y)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        for opt in optimizers:
            opt.step()
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
    print(f"{backend}: two compiled steps (compile included) in {time.perf_counter() - start:.1f} s")
    torch._dynamo.reset()


def test_calibrated_quantizers_do_not_break_the_graph():
    """``initialized`` is read as a Python attribute once it is True: a tensor branch in every quantizer split
    the graph per layer, and the per-layer recompiles with dynamic shapes failed in inductor's backward."""
    torch._dynamo.reset()
    qmodel, x = _prepared()
    explanation = torch._dynamo.explain(qmodel)(x)
    frames = [f"{frame.filename}:{frame.lineno} {frame.name}" for r in explanation.break_reasons
              for frame in r.user_stack[-1:]]
    assert not [f for f in frames if f.endswith("ensure_initialized")], frames
    for quantizer in [m for m in qmodel.modules() if isinstance(m, fxquant.quantizers.Quantizer)]:
        quantizer.reset_initialized()  # after a bit-width change the buffer decides again, and calibration runs
        assert not bool(quantizer.initialized)
    qmodel(x)
    assert all(bool(m.initialized) for m in qmodel.modules() if isinstance(m, fxquant.quantizers.Quantizer))
    torch._dynamo.reset()
