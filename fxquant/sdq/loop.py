"""The SDQ search loop over a prepared GraphModule whose quantizers are ``"sdq"`` quantizers (see
:mod:`fxquant.sdq`): sampling, the budget penalty, stepping units down, and checkpoints that resume bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from fxquant.data.replay import loader_generator, replay_epoch
from fxquant.errors import CheckpointError, ConfigError, NumericsError
from fxquant.io.output_files import torch_save_atomic
from fxquant.passes.analysis.cost_model import LayerCost
from fxquant.placement import Placement, broadcast_buffers
from fxquant.quantizers.sdq import StochasticBitwidthQuantizer
from fxquant.sdq.budget import Budget
from fxquant.sdq.options import LossFn, SearchOptions
from fxquant.sdq.units import (
    Unit,
    expected_cost,
    lead_quantizer,
    member_quantizer,
    unit_bits,
)

__all__ = ["CHECKPOINT_FORMAT", "SearchResult", "run_search"]


CHECKPOINT_FORMAT = "fxquant.sdq_checkpoint/1"


@dataclass(frozen=True)
class SearchResult:
    """Final bits of every unit and, per searched unit and explored bit-width ``k``, the sensitivity of the
    step from ``k`` to ``k − 1`` and the keep-probability the DBP had there."""

    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    keep_probability: dict[str, dict[int, float]]
    steps: int
    interval: int


class _Batches:
    """Endless batches from a loader, with what is needed to replay the current epoch on resume."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.iterator: Any = None
        self.epoch_rng: torch.Tensor | None = None
        self.loader_rng: torch.Tensor | None = None
        self.consumed = 0

    def _start_epoch(self) -> None:
        self.epoch_rng = torch.get_rng_state()
        gen = loader_generator(self.loader)
        self.loader_rng = gen.get_state() if gen is not None else None
        self.iterator = iter(self.loader)
        self.consumed = 0

    def next(self) -> Any:
        if self.iterator is None:
            self._start_epoch()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self._start_epoch()
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ConfigError("train_loader yields no batches") from None
        self.consumed += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch_rng": self.epoch_rng, "loader_rng": self.loader_rng, "consumed": self.consumed}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replay the saved epoch up to the saved batch (the caller restores the RNG afterwards)."""
        if state["epoch_rng"] is None:
            return
        self.epoch_rng, self.loader_rng = state["epoch_rng"], state["loader_rng"]
        self.iterator = replay_epoch(self.loader, self.loader_rng, state["consumed"], self.epoch_rng)
        self.consumed = state["consumed"]


def _optimizer(gm: fx.GraphModule, options: SearchOptions) -> torch.optim.Optimizer:
    dbps, others = [], []
    for name, param in gm.named_parameters():
        (dbps if name.endswith(".logit") else others).append(param)
    return torch.optim.SGD(
        [
            {"params": others, "lr": options.lr, "momentum": options.momentum},
            {"params": dbps, "lr": options.dbp_lr, "momentum": 0.0},
        ]
    )


def _draw_noise(gm: fx.GraphModule, units: Sequence[Unit]) -> None:
    """One U(0, 1) draw per searched unit, shared by its members (tied layers sample the same choice)."""
    for unit in units:
        if unit.searched:
            u = torch.rand(())
            for name in unit.members:
                member_quantizer(gm, name, unit.role).noise = u


def _unit_sensitivity(gm: fx.GraphModule, unit: Unit) -> float:
    """The unit's measured loss of stepping down from its current bits (sum over members; 0 if unmeasured)."""
    values = [member_quantizer(gm, name, unit.role).sensitivity() for name in unit.members]
    return float(sum(v for v in values if v is not None))


def _step_down(gm: fx.GraphModule, units: Sequence[Unit], threshold: float) -> dict[str, tuple[float, float]]:
    """Units whose keep-probability fell below ``threshold`` lose one bit; returns their
    ``(keep-probability, sensitivity)`` at the bits they left."""
    lowered = {}
    for unit in units:
        if not unit.searched:
            continue
        lead = lead_quantizer(gm, unit)
        if not lead.stochastic:
            continue
        p = float(lead.keep_probability().detach())
        if p < threshold:
            lowered[unit.key] = (p, _unit_sensitivity(gm, unit))
            for name in unit.members:
                member_quantizer(gm, name, unit.role).step_down()
    return lowered


def _fingerprint(units: Sequence[Unit], budget: Budget, options: SearchOptions, steps: int, interval: int) -> dict:
    return {
        "units": [[u.key, u.role, list(u.members), u.fixed_bits] + ([list(u.ladder)] if u.ladder else [])
                  for u in units],
        "budget": budget.to_dict(),
        "options": {k: v for k, v in options.to_dict().items() if k != "checkpoint_every"},
        "steps": steps,
        "interval": interval,
    }


def _load_checkpoint(path: Path, fingerprint: dict) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"cannot read search checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an SDQ search checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if payload["fingerprint"] != fingerprint:
        theirs, ours = payload["fingerprint"], fingerprint
        differ = sorted(k for k in ours if theirs.get(k) != ours.get(k))
        raise CheckpointError(
            f"{path} belongs to another search (different {', '.join(differ)}); delete it or pass another path"
        )
    return payload


def _restore_bits(gm: fx.GraphModule, units: Sequence[Unit], bits: Mapping[str, int]) -> None:
    for unit in units:
        if unit.searched:
            for name in unit.members:
                member_quantizer(gm, name, unit.role).set_bits(int(bits[unit.key]))


def run_search(
    gm: fx.GraphModule,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    units: Sequence[Unit],
    costs: Mapping[str, LayerCost],
    budget: Budget,
    options: SearchOptions | None = None,
    loss_fn: LossFn | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    placement: Placement | None = None,
) -> SearchResult:
    """Train ``gm`` (prepared with ``"sdq"`` quantizers, :func:`attach_dbps` applied) with the budget
    penalty and step bit-widths down; returns the units' final bits and sensitivities.

    ``on_step(step, info)`` runs after each step (and after its checkpoint), with the loss, the expected
    cost ratio and the number of units stepped down. With ``checkpoint_path`` an existing checkpoint of
    the same search is resumed; a checkpoint of another search raises :class:`CheckpointError`.
    ``placement`` puts the search on a device and, under torchrun, splits each batch over the ranks (see
    :mod:`fxquant.placement`): every rank draws the same noise and steps down the same units; rank 0 saves.
    """
    placement = placement if placement is not None else Placement(next(gm.parameters()).device)
    options = options if options is not None else SearchOptions()
    steps = options.steps
    if steps is None:
        if not hasattr(loader, "__len__"):
            raise ConfigError("SearchOptions.steps is required when train_loader has no len()")
        steps = len(loader)  # type: ignore[arg-type]
    searched = [u for u in units if u.searched]
    interval = options.interval or max(1, steps // max(1, 2 * (budget.max_bits - budget.min_bits)))
    every = options.checkpoint_every or interval
    fingerprint = _fingerprint(units, budget, options, steps, interval)
    path = Path(checkpoint_path) if checkpoint_path is not None else None

    gm.to(placement.device).train()
    # a unit stepped down to its floor stops using its logits: DDP must allow unused parameters
    trained = placement.wrap(gm, find_unused_parameters=True)
    optimizer = _optimizer(gm, options)
    batches = _Batches(loader)
    history: dict[str, dict[int, float]] = {u.key: {} for u in searched}  # sensitivity per bits left
    keep: dict[str, dict[int, float]] = {u.key: {} for u in searched}  # keep-probability per bits left
    start = 0
    if path is not None and path.exists():
        payload = _load_checkpoint(path, fingerprint)
        _restore_bits(gm, units, payload["unit_bits"])
        gm.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        history = {k: {int(b): float(p) for b, p in v.items()} for k, v in payload["history"].items()}
        keep = {k: {int(b): float(p) for b, p in v.items()} for k, v in payload["keep"].items()}
        start = int(payload["step"])
        batches.restore(payload["batches"])
        torch.set_rng_state(payload["rng"])
    else:
        torch.manual_seed(options.seed)

    def save(done: int) -> None:
        if path is None or not placement.writes_files:
            return
        torch_save_atomic(path, {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "step": done,
            "unit_bits": unit_bits(gm, units),
            "history": {k: dict(v) for k, v in history.items()},
            "keep": {k: dict(v) for k, v in keep.items()},
            "model": gm.state_dict(),
            "optimizer": optimizer.state_dict(),
            "batches": batches.state(),
            "rng": torch.get_rng_state(),
        })

    target = budget.bound
    bar = tqdm(total=steps, initial=start, desc="SDQ search", disable=not progress, leave=False, dynamic_ncols=True)
    for step in range(start, steps):
        x, y, share = placement.shard(*batches.next())
        _draw_noise(gm, units)
        with placement.autocast():
            logits = trained(x).float()
        task = loss_fn(logits, y, x) if loss_fn is not None else F.cross_entropy(logits, y)
        ratio = expected_cost(gm, units, costs, budget.metric) / target
        loss = task * share + options.penalty * torch.relu(ratio - 1.0)  # DDP averages: the global mean task loss
        if not math.isfinite(float(loss.detach())):
            raise NumericsError(f"SDQ search loss became {float(loss.detach())} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if placement.distributed:
            broadcast_buffers(gm)
        lowered: dict[str, tuple[float, float]] = {}
        if (step + 1) % interval == 0:
            bits_left = unit_bits(gm, units)
            lowered = _step_down(gm, units, options.threshold)
            for key, (p, sens) in lowered.items():
                keep[key][bits_left[key]] = p
                history[key][bits_left[key]] = sens
        if (step + 1) % every == 0 or step + 1 == steps:
            save(step + 1)
        info = {"loss": float(task.detach()), "cost_ratio": float(ratio.detach()), "lowered": float(len(lowered))}
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss']:.3f}", cost=f"{info['cost_ratio']:.2f}")
        if on_step is not None:
            on_step(step, info)
    bar.close()
    for unit in units:
        for name in unit.members:
            q = member_quantizer(gm, name, unit.role)
            if isinstance(q, StochasticBitwidthQuantizer):
                q.noise = None

    final = unit_bits(gm, units)
    sensitivity = {k: dict(v) for k, v in history.items()}
    keep_final = {k: dict(v) for k, v in keep.items()}
    for unit in searched:
        lead = lead_quantizer(gm, unit)
        if lead.stochastic:
            sensitivity[unit.key][final[unit.key]] = _unit_sensitivity(gm, unit)
            keep_final[unit.key][final[unit.key]] = float(lead.keep_probability().detach())
    return SearchResult(final, sensitivity, keep_final, steps, interval)
