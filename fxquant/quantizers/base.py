"""The quantizer contract shared by every scheme.

A quantizer is an ``nn.Module`` that in training applies its soft (differentiable) function and in eval
applies its hard form; :meth:`Quantizer.grid` and :meth:`Quantizer.codes` expose that hard form so that
``freeze`` can build the integer graph. Parameters are created at construction (shapes are known from the
layer), and data-dependent initialisation happens at the first forward, so an optimizer can be built
right after :func:`fxquant.prepare`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import is_dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from fxquant.errors import ConfigError
from fxquant.placement import autocast_dtype
from fxquant.quantizers.grid import QuantGrid, channel_view
from fxquant.quantizers.options import QuantizerOptions

__all__ = [
    "add_flag", "read_flag", "write_flag", "refresh_flags",
    "Quantizer", "Role", "search_clip_range", "elementwise_blocks", "split_blocks", "block_scratch", "BLOCK_ELEMENTS",
    "BINARY_SCALES", "BinaryScale", "mean_abs_scale",
]

Role = Literal["weight", "activation"]

#: how a 1-bit weight quantizer scales ``±1``: ``"mean"`` recomputes ``mean|w|`` per channel of the weight it
#: quantizes (XNOR-Net), ``"learned"`` keeps the scheme's own learned scale
BinaryScale = Literal["mean", "learned"]
BINARY_SCALES = get_args(BinaryScale)

#: elements per block of a fused quantizer pass: its few temporaries (512 KiB each in float32) stay in cache
BLOCK_ELEMENTS = 1 << 17


def elementwise_blocks(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a fused elementwise pass over ``x`` should run block by block (see :func:`split_blocks`).

    A chain of in-place passes over a feature map is bound by memory traffic on CPU; running it block by
    block keeps the temporaries in cache. Only for large contiguous CPU tensors with per-tensor ``params``
    (which broadcast the same way in every block), and not while torch.compile traces (it fuses the
    chain itself, and a loop would be unrolled).
    """
    return (
        x.numel() > BLOCK_ELEMENTS
        and x.device.type == "cpu"
        and x.is_contiguous()
        and all(p.numel() == 1 for p in params)
        and not torch.compiler.is_compiling()
    )


def split_blocks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Matching blocks of the flattened ``tensors`` (contiguous, of one size): one tuple of views per block."""
    return list(zip(*(t.view(-1).split(BLOCK_ELEMENTS) for t in tensors), strict=True))


def block_scratch(rows: int, numel: int, like: torch.Tensor, dtype: torch.dtype | None = None):
    """Scratch for a block-wise pass: ``scratch(size)`` is a ``(rows, size)`` buffer and its rows.

    One buffer serves every block; the views are made once per block size (the last block may be shorter),
    since each view costs a dispatch like a small op.
    """
    buffer = torch.empty((rows, min(numel, BLOCK_ELEMENTS)), dtype=dtype or like.dtype, device=like.device)
    views: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def scratch(size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if size not in views:
            view = buffer[:, :size]
            views[size] = (view, view.unbind(0))
        return views[size]

    return scratch


def mean_abs_scale(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``mean|x|`` per output channel (axis 0) or over the tensor: the L2-optimal scale of ``sgn(x)`` (XNOR-Net)."""
    if per_channel:
        return x.abs().reshape(x.shape[0], -1).mean(dim=1).clamp_min(1e-8)
    return x.abs().mean().clamp_min(1e-8)


def read_flag(module: nn.Module, name: str) -> bool:
    """A 0-d bool buffer (saved with the state) as a Python bool, kept in step by :func:`add_flag`,
    :func:`write_flag` and :func:`refresh_flags`: under ``torch.compile`` a branch on the tensor would break
    the graph in every layer (and the per-layer recompiles, with dynamic shapes, then failed in inductor's
    backward)."""
    flags = module.__dict__.setdefault("_flag_values", {})
    if name not in flags:
        flags[name] = bool(getattr(module, name))
    return flags[name]


def add_flag(module: nn.Module, name: str, value: bool) -> None:
    """Register a flag buffer (persistent, so checkpoints keep it) with its Python value."""
    module.register_buffer(name, torch.tensor(bool(value)))
    module.__dict__.setdefault("_flag_values", {})[name] = bool(value)


def write_flag(module: nn.Module, name: str, value: bool) -> None:
    """Set a flag buffer and what :func:`read_flag` returns (every write goes through here)."""
    getattr(module, name).fill_(bool(value))
    module.__dict__.setdefault("_flag_values", {})[name] = bool(value)


def refresh_flags(module: nn.Module) -> None:
    """Read every flag from its buffer again (after the buffers were replaced, e.g. by a state-dict load)."""
    flags = module.__dict__.setdefault("_flag_values", {})
    for name in flags:
        flags[name] = bool(getattr(module, name))


class Quantizer(nn.Module):
    """Base class: subclasses implement :meth:`grid`, :meth:`soft_forward` and :meth:`initialize`, and declare
    their options as a :class:`~fxquant.quantizers.options.QuantizerOptions` dataclass in ``options_class``."""

    scheme: ClassVar[str] = ""
    options_class: ClassVar[type[QuantizerOptions]] = QuantizerOptions
    #: option name -> default value, derived from ``options_class`` (read-only view for code that wants a dict)
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.options_class
        if "OPTIONS" in vars(cls):
            raise TypeError(f"{cls.__name__}: declare options as a QuantizerOptions dataclass in options_class")
        if not (isinstance(kind, type) and issubclass(kind, QuantizerOptions) and is_dataclass(kind)
                and kind.__eq__ is QuantizerOptions.__eq__):
            raise TypeError(
                f"{cls.__name__}.options_class must be a QuantizerOptions subclass made with "
                "@dataclass(frozen=True, eq=False)"
            )
        cls.OPTIONS = kind.defaults()

    def __init__(
        self, bits: int, role: Role, channels: int | None = None,
        options: QuantizerOptions | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if role not in ("weight", "activation"):
            raise ConfigError(f"quantizer role {role!r} is invalid; allowed: weight, activation")
        self.options = self.parse_options(options)
        self.bits = int(bits)
        self.role: Role = role
        self.channels = channels  # per-channel along axis 0 when set (weights only)
        add_flag(self, "initialized", False)

    # -- configuration ------------------------------------------------------------------------------------

    @classmethod
    def parse_options(cls, options: QuantizerOptions | Mapping[str, Any] | None) -> QuantizerOptions:
        """This scheme's options from an instance of its ``options_class``, a plain mapping or ``None`` (defaults).

        Unknown keys of a mapping are an error listing the allowed ones.
        """
        kind = cls.options_class
        if options is None:
            return kind()
        if isinstance(options, kind):
            return options
        if isinstance(options, QuantizerOptions):
            raise ConfigError(
                f"quantizer_options is a {type(options).__name__}, but quantizer {cls.scheme!r} takes {kind.__name__}"
            )
        if not isinstance(options, Mapping):
            raise ConfigError(f"quantizer_options={options!r} is invalid: expected a mapping or {kind.__name__}")
        unknown = sorted(set(options) - set(cls.OPTIONS), key=str)
        if unknown:
            allowed = ", ".join(sorted(cls.OPTIONS)) or "(none)"
            raise ConfigError(f"quantizer_options {unknown} are not options of {cls.scheme!r}; allowed: {allowed}")
        return kind(**options)

    @property
    def num_params(self) -> int:
        return self.channels if self.channels else 1

    @property
    def levels_count(self) -> int:
        return 2**self.bits

    @property
    def uniform(self) -> bool:
        """Uniform levels deploy as bit-serial/integer kernels; non-uniform ones as a codebook."""
        return True

    # -- the contract -------------------------------------------------------------------------------------

    def grid(self) -> QuantGrid:
        raise NotImplementedError

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initialize(self, x: torch.Tensor) -> None:
        """Set data-dependent parameters from the first tensor seen (weights or a calibration batch)."""

    def track_weight(self, weight: torch.Tensor) -> None:
        """Refresh scales derived from the weight itself before it is frozen (the ``"mean"`` binary scale)."""
        if self.binary_mean_scale:
            scale = mean_abs_scale(weight.detach(), bool(self.channels))
            self.binary_scale.copy_(scale.reshape(self.binary_scale.shape))

    @property
    def binary_mean_scale(self) -> bool:
        """Whether this quantizer is a 1-bit weight quantizer scaled by ``mean|w|`` (option ``binary_scale``).

        Read at call time: SDQ changes ``bits`` during training.
        """
        return self.role == "weight" and self.bits == 1 and getattr(self.options, "binary_scale", None) == "mean"

    def _register_binary_scale(self) -> None:
        """The ``mean|w|`` scale of the last weight seen, for :meth:`grid` (schemes with ``binary_scale``)."""
        # derived from the weight at every forward and at freeze: not state, so checkpoints keep their format
        self.register_buffer("binary_scale", torch.ones(self.num_params if self.channels else ()), persistent=False)

    def binary_forward(self, x: torch.Tensor, unit_sign) -> torch.Tensor:
        """``mean|x|·sgn(x)`` per channel, the value of the ``"mean"`` 1-bit weight grid (``sgn(0) = +1``).

        ``unit_sign(x, window)`` returns ``±1`` with the scheme's surrogate gradient on ``|x| ≤ window``; the
        window is ``max|x|`` per channel, so no weight is cut off from its gradient. ``mean|x|`` is
        recomputed at every step, so the quantized weight follows the batch-norm fold factor: with a learned
        scale ``±s`` it would not, and the running statistics that eval folds in drift from the batch ones.
        """
        per_channel = bool(self.channels)
        scale = mean_abs_scale(x, per_channel)
        with torch.no_grad():
            self.binary_scale.copy_(scale.detach().reshape(self.binary_scale.shape))
            window = (x.abs().reshape(x.shape[0], -1).amax(dim=1) if per_channel else x.abs().amax()).clamp_min(1e-8)
        return unit_sign(x, self.view(window, x)) * self.view(scale, x)

    def update_schedule(self, progress: float) -> None:
        """Advance a training schedule (DSQ alpha, QN temperature); ``progress`` runs from 0 to 1."""

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[0, 2**bits - 1]`` (as whole-number floats) of the hard quantizer."""
        return self.grid().codes(x)

    def integer_weight(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer weight values and their per-channel scale; codebook schemes requantize their levels."""
        grid = self.grid()
        return grid.int_values(codes), grid.scale

    def hard_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_mean_scale:
            with torch.no_grad():
                self.track_weight(x)
        grid = self.grid()
        return grid.dequantize(self.codes(x))

    def ensure_initialized(self, x: torch.Tensor) -> None:
        """Run :meth:`initialize` on ``x`` unless it already ran (the first tensor seen decides)."""
        if not read_flag(self, "initialized"):
            with torch.no_grad():
                self.initialize(x.detach())
            write_flag(self, "initialized", True)

    def reset_initialized(self) -> None:
        """Calibrate again at the next forward (after a bit-width change)."""
        write_flag(self, "initialized", False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        refresh_flags(self)  # the loaded buffers decide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_dtype(x.device.type) is not None:  # rounding and scales stay float32 under mixed precision
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float())
        self.ensure_initialized(x)
        if self.training:
            return self.soft_forward(x)
        return self.hard_forward(x)

    def view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return channel_view(t, like, 0) if self.channels else t.reshape(())

    def extra_repr(self) -> str:
        where = f"per_channel={self.channels}" if self.channels else "per_tensor"
        return f"bits={self.bits}, role={self.role}, {where}"


#: elements on which each clip candidate's error is measured; larger tensors are sampled with a column stride
CLIP_SEARCH_ELEMENTS = 1 << 20
#: candidate × value elements per pass of the clip search: a few passes over many candidates, not ten per candidate
CLIP_BATCH_ELEMENTS = 1 << 20
#: rows at least this long are histogrammed first, and only the candidates that can still win are measured
CLIP_PRUNE_COLUMNS = 1 << 15
#: histogram bins per row (at most) for those bounds
CLIP_BINS = 1 << 12
#: a bound on how many float32 additions a value passes through in PyTorch's sum of a row: its cascade sum keeps
#: four levels of partial sums of at most 2^ceil(log2(n)/4) terms each, a few hundred at 2^20 values (a plain
#: left-to-right sum would exceed it, and near-ties could then resolve otherwise than measured)
SUM_DEPTH = 1 << 12
_U = 2.0**-24  # float32 unit roundoff


def _error_sample(flat: torch.Tensor) -> torch.Tensor:
    """Every k-th column of ``flat`` so that at most :data:`CLIP_SEARCH_ELEMENTS` values are measured.

    The candidates' errors are means, so a strided sample estimates them well; without it the search costs
    32 passes over the tensor (minutes for VGG's 100M-weight classifier). Tensors under the cap are used whole.
    """
    stride = -(-flat.numel() // CLIP_SEARCH_ELEMENTS)
    return flat if stride <= 1 else flat[:, ::stride].contiguous()


def clip_search_bounds(x: torch.Tensor, signed: bool, per_channel: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values a clip search measures errors on (rows: channels, or one row) and each row's widest range
    ``(lo_max, hi_max)``, from the whole tensor; candidates clip at fractions of it."""
    flat = x.detach().float().reshape(x.shape[0], -1) if per_channel else x.detach().float().reshape(1, -1)
    if signed:
        hi_max = flat.abs().amax(dim=1).clamp_min(1e-8)
        lo_max = -hi_max
    else:
        hi_max = flat.amax(dim=1).clamp_min(1e-8)
        lo_max = torch.minimum(flat.amin(dim=1), torch.zeros_like(hi_max))
    return _error_sample(flat), lo_max, hi_max


def search_clip_range(
    x: torch.Tensor, bits: int, signed: bool, per_channel: bool, candidates: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip bounds ``(low, high)`` that minimise the mean squared quantization error on ``x``.

    Max-based ranges waste most levels at 2-4 bits; shrinking the range trades clipping for rounding error,
    which is what DSQ and LSQ then keep learning. Symmetric (``low = -high``) when ``signed``. The range
    bounds come from the whole tensor; the errors from at most :data:`CLIP_SEARCH_ELEMENTS` of its values.

    Candidate ``i`` clips at ``i/candidates`` of the range; the first one with the least error (as float32
    arithmetic computes it, see :func:`_candidate_errors`) wins.
    """
    sample, lo_max, hi_max = clip_search_bounds(x, signed, per_channel)
    n = 2**bits - 1
    fracs = torch.linspace(1.0 / candidates, 1.0, candidates)
    lo = lo_max * fracs.unsqueeze(1)  # (candidates, rows)
    step = (hi_max * fracs.unsqueeze(1) - lo) / n
    best_err = torch.full_like(hi_max, float("inf"))
    best = torch.ones_like(hi_max)
    for frac, err in zip(fracs, _candidate_errors(sample, lo, step, n), strict=True):
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, frac.expand_as(best), best)
    low, high = lo_max * best, hi_max * best
    if not per_channel:
        low, high = low.reshape(()), high.reshape(())
    return low, high


def _quantize_error(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, n: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``(lo + step·clamp(floor((x − lo)/step + ½), 0, n) − x)²``, in this order of float32 operations."""
    diff = torch.sub(x, lo, out=out) if out is not None else torch.sub(x, lo)
    diff.div_(step).add_(0.5).floor_().clamp_(0, n)
    return diff.mul_(step).add_(lo).sub_(x).square_()


def _codes(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """The codes :func:`_quantize_error` gives ``x`` (a non-decreasing function of ``x``)."""
    return torch.sub(x, lo).div_(step).add_(0.5).floor_().clamp_(0, n)


def _candidate_errors(sample: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """Each candidate's mean squared error per row, ``(candidates, rows)``; ``inf`` where it cannot win.

    A candidate's error is what ``_quantize_error(sample, lo, step, n).mean(dim=1)`` gives, bit for bit (so
    the winner is the same), only computed for several candidates per pass. Long rows are bounded first
    (:func:`_possible_winners`) and only the candidates that can still win are measured; a row with one left
    gives it error 0.
    """
    candidates, rows = lo.shape
    if not sample.is_contiguous():  # the one-candidate loop's temporaries would have this layout: keep its sums
        return torch.stack([_quantize_error(sample, lo[c].unsqueeze(1), step[c].unsqueeze(1), n).mean(dim=1)
                            for c in range(candidates)])
    live = _possible_winners(sample, lo, step, n) if sample.shape[1] >= CLIP_PRUNE_COLUMNS else None
    errors = torch.full((candidates, rows), float("inf"))
    if live is None:
        live = torch.ones((candidates, rows), dtype=torch.bool)
    else:
        decided = live & (live.sum(0) == 1)
        errors[decided] = 0.0
        live &= ~decided
    whole = live.all(1)  # candidates measured on every row
    if bool(whole.any()):
        errors[whole] = _measure_candidates(sample, lo[whole], step[whole], n)
    cand, row = (live & ~whole.unsqueeze(1)).nonzero(as_tuple=True)  # only with two rows or more
    if len(cand):
        errors[cand, row] = _measure_rows(sample, lo[cand, row], step[cand, row], row, n)
    return errors


def _measure_candidates(sample: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """``(len(lo), rows)`` errors of candidate bounds ``lo, step`` (each ``(k, rows)``), several per pass.

    PyTorch sums each row of a tensor with two or more rows on its own (the same way whichever rows are
    stacked with it), so the candidates of a many-row sample are reduced together; a one-row tensor it may
    split between threads, so a one-row sample's candidates are reduced one by one, each as its own row.
    """
    rows, cols = sample.shape
    count = lo.shape[0]
    per = max(1, min(count, CLIP_BATCH_ELEMENTS // sample.numel()))
    buffer = torch.empty((per, rows, cols))
    out: list[torch.Tensor] = []
    for start in range(0, count, per):
        size = min(per, count - start)
        err = _quantize_error(sample, lo[start : start + size].unsqueeze(2), step[start : start + size].unsqueeze(2),
                              n, out=buffer[:size])
        if rows == 1:  # each candidate's row reduced on its own
            out.append(torch.stack([err[i].mean(dim=1) for i in range(size)]))
        else:
            out.append(err.mean(dim=2))
    return torch.cat(out)


def _measure_rows(sample: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, row: torch.Tensor,
                  n: int) -> torch.Tensor:
    """Errors of candidate bounds ``lo[i], step[i]`` on row ``row[i]`` of a sample with two rows or more.

    The rows are gathered and reduced together (see :func:`_measure_candidates`), never one alone.
    """
    rows, cols = sample.shape
    count = len(row)
    per = max(2, CLIP_BATCH_ELEMENTS // cols)
    values, buffer = torch.empty((min(per, count + 1), cols)), torch.empty((min(per, count + 1), cols))
    out = []
    for start in range(0, count, per):
        idx, lo_i, step_i = row[start : start + per], lo[start : start + per], step[start : start + per]
        if len(idx) == 1:  # with a second row, whose error is dropped
            idx, lo_i, step_i = torch.cat((idx, (idx + 1) % rows)), lo_i.repeat(2), step_i.repeat(2)
        x = torch.index_select(sample, 0, idx, out=values[: len(idx)])
        err = _quantize_error(x, lo_i.unsqueeze(1), step_i.unsqueeze(1), n, out=buffer[: len(idx)])
        out.append(err.mean(dim=1)[: min(per, count - start)])
    return torch.cat(out)


def _possible_winners(sample: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor | None:
    """``(candidates, rows)``: whether each candidate's error can be the least of its row; None to measure all.

    Each row's values are binned once (count, sum and sum of squares per bin, in float64). Between two
    midpoints of its clip levels a candidate gives every value of a stretch of bins the same code, and the
    exact error of the stretch follows from its sums; the few bins around a midpoint are bounded by their
    range. Codes are a non-decreasing function of the value (every float32 step of :func:`_codes` is, and so
    is binning), so the codes at the ends of a stretch's range prove which codes its values get. The bounds
    allow for the float32 rounding of each value's error and of the sum (a tree at most :data:`SUM_DEPTH`
    additions deep) and for the float64 rounding here; a candidate whose lower bound exceeds another's upper
    bound cannot be the first with the least error, whatever the exact float32 values.
    """
    rows, cols = sample.shape
    candidates = lo.shape[0]
    segments = 2 * n + 1
    if candidates * segments * 8 > cols:  # many levels: bounding them costs more than measuring
        return None
    bins = min(CLIP_BINS, cols // 16)
    row_min, row_max = sample.amin(dim=1, keepdim=True), sample.amax(dim=1, keepdim=True)
    scale = bins / (row_max - row_min)  # float32 bins per unit
    peak = torch.maximum(row_min.abs(), row_max.abs()).max()
    if not bool(torch.isfinite(peak) & torch.isfinite(scale).all()) or float(peak) > 2.0**50:
        return None  # a constant row, or squares that could overflow float32: measure every candidate

    def bin_of(t: torch.Tensor) -> torch.Tensor:  # float32 bin numbers, non-decreasing in the value
        return torch.sub(t, row_min).mul_(scale).floor_().clamp_(0, bins - 1)

    def centre(j: torch.Tensor) -> torch.Tensor:
        return torch.add(j, 0.5).div_(scale).add_(row_min)

    index = bin_of(sample).int()
    if rows > 1:
        index += (torch.arange(rows, dtype=torch.int32) * bins).unsqueeze(1)
    index, values = index.view(-1), sample.view(-1).double()
    size = rows * bins
    count = torch.bincount(index, minlength=size).view(rows, bins)
    most = count.amax(1, keepdim=True).double().unsqueeze(0)  # the longest float64 sum of one bin
    sum1 = torch.bincount(index, values, minlength=size).view(rows, bins)
    sum2 = torch.bincount(index, values.square_(), minlength=size).view(rows, bins)  # float64: exact squares
    # every value of bin j lies in [lower[j], upper[j]]: the neighbours' centres, checked to bin elsewhere
    j = torch.arange(bins, dtype=torch.float32).expand(rows, bins)
    lower, upper = centre(j - 1), centre(j + 1)
    if not (bool((bin_of(lower[:, 1:]) < j[:, 1:]).all()) and bool((bin_of(upper[:, :-1]) > j[:, :-1]).all())):
        return None  # bins finer than float32 resolves
    lower[:, 0], upper[:, -1] = row_min[:, 0], row_max[:, 0]
    prefix = torch.nn.functional.pad(torch.stack((count.double(), sum1, sum2)).cumsum(2), (1, 0))  # bins [0, j)

    # segments of bins: between two midpoints, and the five bins around each midpoint (a bin's range
    # reaches into its neighbours)
    lo64, step64 = lo.double().unsqueeze(2), step.double().unsqueeze(2)
    mids = lo64 + step64 * (torch.arange(n, dtype=torch.float64) + 0.5)
    at = ((mids - row_min.double().unsqueeze(0)) * scale.double().unsqueeze(0)).floor().clamp(-2, bins + 1).long()
    edges = torch.stack((at - 2, at + 3), dim=3).view(candidates, rows, 2 * n).clamp(0, bins)
    zero = torch.zeros((candidates, rows, 1), dtype=torch.long)
    edges = torch.cat((zero, edges, zero + bins), dim=2).cummax(2).values
    start, stop = edges[..., :-1], edges[..., 1:]  # (candidates, rows, segments)

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # t[row, idx] for each candidate
        return torch.gather(t.unsqueeze(0).expand(candidates, -1, -1), 2, idx)

    count, sum1, sum2 = (take(p, stop) - take(p, start) for p in prefix)
    nonempty = count > 0
    low_x = torch.where(nonempty, take(lower, start.clamp_max(bins - 1)), 0.0)  # float32 bounds of its values
    high_x = torch.where(nonempty, take(upper, (stop - 1).clamp_min(0)), 0.0)
    code_low = _codes(low_x, lo.unsqueeze(2), step.unsqueeze(2), n).double()
    code_high = _codes(high_x, lo.unsqueeze(2), step.unsqueeze(2), n).double()
    level_low, level_high = lo64 + step64 * code_low, lo64 + step64 * code_high
    lx, hx = low_x.double(), high_x.double()
    reach = torch.stack(((level_low - lx).abs(), (level_low - hx).abs(), (level_high - lx).abs(),
                         (level_high - hx).abs())).amax(0) * (1 + 1e-12)  # ≥ |level − value| in the segment
    # float32 rounding of one value's error: code·step, + lo, − value (|Δ| ≤ delta), then the square
    big = step64 * code_high + torch.maximum(level_low.abs(), level_high.abs()) + reach
    delta = _U * big * (1 + 4 * _U)
    rounding = count * ((delta * (2 * reach + delta) + _U * (reach + delta) ** 2) * (1 + 1e-9) + 1e-36)
    one_code = code_low == code_high
    exact = count * level_low**2 - 2 * level_low * sum1 + sum2  # Σ (level − value)² over the segment
    seg_low = torch.where(one_code & nonempty, exact - rounding, 0.0)
    seg_high = torch.where(nonempty, torch.where(one_code, exact, count * reach**2) + rounding, 0.0)
    # float64 rounding of the bins' sums, their prefix sums and the quadratic forms, bounded over the row
    spread = torch.maximum(row_min.abs(), row_max.abs()).double().unsqueeze(0) + lo64.abs() + step64 * n
    slack = ((most + bins + 4 * segments + 16) * 2.0**-52 * 16 * cols * spread * spread).squeeze(2)
    total_low = seg_low.sum(2) - slack
    total_high = seg_high.sum(2) + slack
    gamma = SUM_DEPTH * _U / (1 - SUM_DEPTH * _U)
    mean_low = (total_low - gamma * total_high).clamp_min(0) / cols * (1 - 4 * _U)
    mean_high = total_high * (1 + gamma) / cols * (1 + 4 * _U)
    return mean_low <= mean_high.amin(0, keepdim=True)
