"""Training losses of SDQ's second phase: Entropy-aware Bin Regularization (EBR) and knowledge distillation.

The paper names both (EBR is its Eq. 10, KD its Eq. 9) but the formulas were not available; these are our
designs (docs/design.md, section "EBR and KD"):

- **EBR**, per quantized layer, on the weight its quantizer sees (batch norm folded) and the quantizer's
  hard grid (held fixed: EBR moves weights, not the grid). Positions are measured in steps,
  ``t = (w − low)/step``, so the terms do not depend on the weight scale:

  - *bin centre*: ``mean_i (t_i − c_i)²`` with ``c_i`` the level ``w_i`` rounds to (``≤ ¼`` inside the
    clip range; clipped weights are pulled to the end level);
  - *entropy*: soft assignments ``a_ik = softmax_k(−(t_i − k)²/τ_E)`` over the levels within ``window``
    steps of ``c_i`` (all levels with ``window=None``; beyond 2 steps the weights are below ``e^-12`` at
    ``τ_E = ½``), bin occupancy ``o_k = mean_i a_ik``, and the term ``1 − H(o)/log K`` with ``K = 2^b``
    levels: 0 when every level is used equally, 1 when all weights sit in one bin.

  ``EBR = mean over layers of (centre + entropy)``, added with weight ``λ_E = 0.1`` (the value the
  secondary summary reports as best). Codebook (non-uniform) grids use their levels, in units of their
  mean spacing, with all levels as candidates.
- **KD**: Hinton et al.'s ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (batch mean) against a float teacher,
  mixed as ``(1 − β)·CE + β·KD``.

:func:`sdq_loss` bundles them as ``loss_fn(logits, y, x)`` for :func:`fxquant.training.loop.train_epoch` and
:func:`fxquant.search`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import ConfigError, FxQuantError
from fxquant.layers import QuantLayer
from fxquant.quantizers.grid import QuantGrid, channel_view

__all__ = ["ebr_terms", "ebr_loss", "kd_loss", "SDQLoss", "sdq_loss"]


def _positions(weight: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``t`` (weights in steps from the lowest level), the level positions for codebooks, and ``K``."""
    levels_count = 2**grid.bits
    if grid.encoding != "codebook":
        low = channel_view(grid.low.detach(), weight, 0)
        step = channel_view(grid.step.detach(), weight, 0)
        return (weight - low) / step, None, levels_count
    assert grid.levels is not None
    levels = grid.levels.detach()
    rows = levels if levels.dim() == 2 else levels.unsqueeze(0)
    spacing = ((rows[:, -1] - rows[:, 0]) / (levels_count - 1)).clamp_min(1e-12)
    origin = rows[:, 0]
    positions = (rows - origin.unsqueeze(1)) / spacing.unsqueeze(1)
    if levels.dim() == 1:
        t = (weight - origin[0]) / spacing[0]
        return t, positions[0], levels_count
    return (weight - channel_view(origin, weight, 0)) / channel_view(spacing, weight, 0), positions, levels_count


def ebr_terms(
    weight: torch.Tensor, grid: QuantGrid, temperature: float = 0.5, window: int | None = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bin-centre term, entropy term)`` of one weight tensor under ``grid`` (see the module docstring)."""
    if temperature <= 0:
        raise ConfigError(f"EBR temperature={temperature!r} is invalid: expected a number > 0")
    t, positions, k = _positions(weight, grid)
    t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    if positions is None:
        nearest = torch.clamp(torch.floor(t.detach() + 0.5), 0, k - 1)
        centre = (t - nearest).pow(2).mean()
        if window is None or 2 * window + 1 >= k:
            candidates = torch.arange(k, dtype=t.dtype, device=t.device).expand(*t.shape, k)
        else:
            offsets = torch.arange(-window, window + 1, dtype=t.dtype, device=t.device)
            candidates = nearest.unsqueeze(-1) + offsets
        valid = (candidates >= 0) & (candidates <= k - 1)
        index = candidates.clamp(0, k - 1)
    else:
        pos = positions.unsqueeze(1) if positions.dim() == 2 else positions.reshape(1, 1, -1)
        pos = pos.expand(t.shape[0], 1, k)
        nearest_idx = (t.detach().unsqueeze(-1) - pos).abs().argmin(dim=-1, keepdim=True)
        centre = (t - torch.gather(pos.expand(*t.shape, k), -1, nearest_idx).squeeze(-1)).pow(2).mean()
        candidates = pos.expand(*t.shape, k)
        valid = torch.ones_like(candidates, dtype=torch.bool)
        index = torch.arange(k, device=t.device).expand(*t.shape, k).to(t.dtype)
    logits = -(t.unsqueeze(-1) - candidates).pow(2) / temperature
    logits = logits.masked_fill(~valid, float("-inf"))
    assign = torch.softmax(logits, dim=-1)
    occupancy = torch.zeros(k, dtype=t.dtype, device=t.device).index_add(
        0, index.long().reshape(-1), assign.reshape(-1)
    ) / t.numel()
    entropy = -(occupancy * torch.log(occupancy.clamp_min(1e-12))).sum()
    return centre, 1.0 - entropy / math.log(k)


def ebr_loss(model: nn.Module, temperature: float = 0.5, window: int | None = 2) -> torch.Tensor:
    """Mean EBR (bin centre + entropy) over the quantized layers of a prepared model.

    Example::

        loss = F.cross_entropy(qmodel(x), y) + 0.1 * ebr_loss(qmodel)
    """
    terms = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLayer):
            continue
        if not bool(layer.weight_quant.initialized):
            raise FxQuantError(
                f"EBR: the weight quantizer of {name!r} has not seen data; pass example_inputs to prepare()"
            )
        weight = layer.folded_weight_bias()[0]
        centre, entropy = ebr_terms(weight, layer.weight_quant.grid(), temperature, window)
        terms.append(centre + entropy)
    if not terms:
        raise FxQuantError("EBR: the model has no quantized layer")
    return torch.stack(terms).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's distillation loss ``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch."""
    if temperature <= 0:
        raise ConfigError(f"KD temperature={temperature!r} is invalid: expected a number > 0")
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@dataclass(frozen=True, eq=False)
class SDQLoss:
    """``(1 − β)·CE + β·KD + λ_E·EBR`` as a ``loss_fn(logits, y, x)``; without a teacher, ``CE + λ_E·EBR``.

    The teacher runs in eval mode without gradients on the same ``x``.
    """

    student: nn.Module
    teacher: nn.Module | None = None
    kd_weight: float = 0.5
    temperature: float = 4.0
    ebr_weight: float = 0.1
    ebr_temperature: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"kd_weight={self.kd_weight!r} is invalid: expected 0 <= kd_weight <= 1")
        if self.ebr_weight < 0:
            raise ConfigError(f"ebr_weight={self.ebr_weight!r} is invalid: expected a number >= 0")
        if self.temperature <= 0 or self.ebr_temperature <= 0:
            raise ConfigError("temperature and ebr_temperature must be > 0")
        if self.teacher is not None:
            self.teacher.eval()

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        if self.teacher is not None and self.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            loss = (1.0 - self.kd_weight) * loss + self.kd_weight * kd_loss(logits, teacher_logits, self.temperature)
        if self.ebr_weight > 0:
            loss = loss + self.ebr_weight * ebr_loss(self.student, self.ebr_temperature)
        return loss


def sdq_loss(
    student: nn.Module,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.5,
    temperature: float = 4.0,
    ebr_weight: float = 0.1,
) -> SDQLoss:
    """The SDQ training loss for ``student`` (a prepared model), optionally distilled from a float ``teacher``.

    Example::

        loss_fn = fxquant.training.losses.sdq_loss(qmodel, teacher=float_model)
        train_epoch(qmodel, loader, optimizer, loss_fn=loss_fn)
    """
    return SDQLoss(student, teacher, kd_weight, temperature, ebr_weight)
