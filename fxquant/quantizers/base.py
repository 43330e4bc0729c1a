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


def _error_sample(flat: torch.Tensor) -> torch.Tensor:
    """Every k-th column of ``flat`` so that at most :data:`CLIP_SEARCH_ELEMENTS` values are measured.

    The candidates' errors are means, so a strided sample estimates them well; without it the search costs
    32 passes over the tensor (minutes for VGG's 100M-weight classifier). Tensors under the cap are used whole.
    """
    stride = -(-flat.numel() // CLIP_SEARCH_ELEMENTS)
    return flat if stride <= 1 else flat[:, ::stride].contiguous()


def search_clip_range(
    x: torch.Tensor, bits: int, signed: bool, per_channel: bool, candidates: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip bounds ``(low, high)`` that minimise the mean squared quantization error on ``x``.

    Max-based ranges waste most levels at 2-4 bits; shrinking the range trades clipping for rounding error,
    which is what DSQ and LSQ then keep learning. Symmetric (``low = -high``) when ``signed``. The range
    bounds come from the whole tensor; the errors from at most :data:`CLIP_SEARCH_ELEMENTS` of its values.
    """
    flat = x.detach().float().reshape(x.shape[0], -1) if per_channel else x.detach().float().reshape(1, -1)
    sample = _error_sample(flat)
    if signed:
        hi_max = flat.abs().amax(dim=1).clamp_min(1e-8)
        lo_max = -hi_max
    else:
        hi_max = flat.amax(dim=1).clamp_min(1e-8)
        lo_max = torch.minimum(flat.amin(dim=1), torch.zeros_like(hi_max))
    best_err = torch.full_like(hi_max, float("inf"))
    best = torch.ones_like(hi_max)
    n = 2**bits - 1
    for frac in torch.linspace(1.0 / candidates, 1.0, candidates):
        lo, hi = lo_max * frac, hi_max * frac
        lo_col, step = lo.unsqueeze(1), ((hi - lo) / n).unsqueeze(1)
        # uniform_codes and ``lo + step * codes - x`` in place, in the same order: one buffer per candidate
        diff = torch.sub(sample, lo_col).div_(step).add_(0.5).floor_().clamp_(0, n)
        err = diff.mul_(step).add_(lo_col).sub_(sample).square_().mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, frac.expand_as(best), best)
    low, high = lo_max * best, hi_max * best
    if not per_channel:
        low, high = low.reshape(()), high.reshape(())
    return low, high
