"""Quantization Networks (Yang et al., CVPR 2019; github.com/aliyun/alibabacloud-quantization-networks).

The quantizer is a sum of unit steps, relaxed to sigmoids of temperature ``T`` in training::

    training:  y = α·( Σ_i s_i·σ(T·(βx − b_i)) − o )        inference:  y = α·( Σ_i s_i·A(βx − b_i) − o )

with fixed step heights ``s_i`` (the gaps of the target set), offset ``o``, fixed biases ``b_i`` and learned
scales ``α`` (output) and ``β`` (input). ``α`` and ``β`` are learned through their logarithms (our design:
their natural sizes differ by orders of magnitude between layers and bit-widths, e.g. ``α ≈ 10⁻³`` for an
8-bit weight, so a shared optimizer takes relative steps; the original trains them with a separate optimizer
at 0.1× the learning rate plus gradient-norm clipping). As in the original code the sigmoid argument is clamped to
``[−10, 10]``; its backward is ``T·s_i·σ(1−σ)`` evaluated at the clamped argument (the clamp passes the
gradient, as in the original's hand-written backward), and the ``α``/``β`` gradients follow by the chain
rule (``∂y/∂α = y/α``, ``∂y/∂β = α·x·Σ T s_i σ(1−σ)``). ``T`` rises linearly with training progress
(:meth:`QNQuantizer.update_schedule`), capped as in the original (2000).

Target sets (ours where noted, following ALGORITHMS.md §2):

- Weights: the odd integers ``{±1, ±3, …, ±(2^B−1)}``: ``n = 2^B−1`` steps of height 2, ``o = 2^B−1``. The
  hard output ``α·(2c − n)`` is the ``"bipolar"`` grid with scale ``α`` (bit-serial deployable); 1 bit is
  ``±α``. Per-channel configs learn one ``α`` and ``β`` per output channel and share the biases ``b_i``
  (in ``βx`` units), so the thresholds in weight units are ``b_i/β_c``: one sorted row per channel.
- Activations: ``{0, …, 2^k−1}``: unit steps, ``o = 0``, the unsigned grid with step ``α``; thresholds
  ``b_i/β`` are non-uniform and exposed in ``grid().thresholds``, so codes come from comparisons. Our design
  for inputs whose first batch has negative values: the same unit steps with an offset ``o`` fitted together
  with ``α`` by least squares to that batch (``low = −α·o``); with ``alpha_init="inverse_beta"``,
  ``o = (2^k−1)/2``, a grid symmetric about zero.

Initialisation (first weights or batch): ``β = (5/4)·q_max/max|W|`` for weights (per channel when
configured) and ``β = q_max / max(x)`` for activations after dropping values beyond mean + 3σ (the haoyz
fork's recipe; the original supplies activation biases offline). The original then sets ``α = 1/β``
(option ``alpha_init="inverse_beta"``); by default we set ``α`` to the least-squares fit of ``x`` by the initial
staircase (our design: ``1/β`` assumes the k-means centres sit on the target values, and can scale a layer's
output by 0.3-3x; the original trains batch norms after every layer, which absorb that, but with batch norm
folded into the weights the eval-time scale has to be right from the start). The biases come from 1-D
k-means with ``|Q|`` clusters on the sorted ``βx`` (ours: deterministic Lloyd iterations from evenly spaced
centres, where the original calls sklearn): each ``b_i`` is the midpoint between the adjacent samples where
the cluster label changes. Codes count thresholds reached (``x ≥ b_i/β``: ties go up, where the original's
``x − b > 0`` sends them down).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxquant.errors import ConfigError
from fxquant.quantizers.base import Quantizer, Role
from fxquant.quantizers.grid import QuantGrid
from fxquant.quantizers.registry import register_quantizer

__all__ = ["QNQuantizer", "qn_soft", "qn_hard", "kmeans_1d", "kmeans_thresholds"]

CLAMP = 10.0
_CHUNK_ELEMENTS = 1 << 22  # sigmoids evaluated together: bounds the memory of 8-bit (255-step) quantizers


class _QNSoft(torch.autograd.Function):
    """``Σ_i s·σ(clamp(T·(z − b_i)))`` of ``z = βx`` with the original code's backward (see module docstring).

    Evaluated in chunks of thresholds without saving one tensor per sigmoid, so an 8-bit quantizer (255
    sigmoids per element) costs memory proportional to the input only.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, biases: torch.Tensor, height: float, temperature: torch.Tensor) -> Any:
        ctx.save_for_backward(z, biases, temperature)
        ctx.height = height
        return _QNSoft.sigmoids(z, biases, temperature, slope=False) * height

    @staticmethod
    def sigmoids(z: torch.Tensor, biases: torch.Tensor, temperature: torch.Tensor, slope: bool) -> torch.Tensor:
        """``Σ_i σ(c_i)`` or ``Σ_i σ(c_i)(1 − σ(c_i))`` with ``c_i = clamp(T·z − T·b_i, ±10)``; thresholds lead."""
        tz = (temperature * z).unsqueeze(0)
        tb = (temperature * biases).reshape(-1, *([1] * z.dim()))
        total = torch.zeros_like(z)
        chunk = max(1, _CHUNK_ELEMENTS // max(z.numel(), 1))
        for start in range(0, biases.numel(), chunk):
            sig = torch.sigmoid(torch.clamp(tz - tb[start : start + chunk], -CLAMP, CLAMP))
            total = total + (sig * (1.0 - sig) if slope else sig).sum(0)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        z, biases, temperature = ctx.saved_tensors
        slope = _QNSoft.sigmoids(z, biases, temperature, slope=True)
        return grad * slope * (ctx.height * temperature), None, None, None


def qn_soft(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    biases: torch.Tensor,
    temperature: torch.Tensor | float,
    height: float,
    offset: float,
) -> torch.Tensor:
    """The training function ``α·(Σ_i s·σ(clamp(T(βx − b_i), ±10)) − o)`` with equal step heights ``s``."""
    t = torch.as_tensor(temperature, dtype=x.dtype, device=x.device)
    return alpha * (_QNSoft.apply(beta * x, biases.to(x.dtype), float(height), t) - offset)


def qn_hard(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, biases: torch.Tensor, height: float, offset: float
) -> torch.Tensor:
    """The inference function ``α·(Σ_i s·A(βx − b_i) − o)`` with the unit step ``A(z) = [z ≥ 0]``."""
    z = beta * x
    steps = (z.unsqueeze(-1) >= biases.to(x.dtype)).to(x.dtype).sum(-1)
    return alpha * (steps * height - offset)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on 1-D data, deterministic: ``(sorted values, cluster end indices, centres)``.

    Centres start evenly spaced over ``[min, max]``; on sorted data every cluster is an interval, so one
    iteration is a ``searchsorted`` plus prefix sums. Empty clusters keep their centre.
    """
    xs = torch.sort(values.detach().reshape(-1).double()).values
    n = xs.numel()
    prefix = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    centres = torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)

    def assign(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.searchsorted(xs, (c[1:] + c[:-1]) * 0.5, right=True), torch.tensor([n])])

    for _ in range(iters):
        ends = assign(centres)
        starts = torch.cat([torch.tensor([0]), ends[:-1]])
        counts = ends - starts
        new = torch.where(counts > 0, (prefix[ends] - prefix[starts]) / counts.clamp_min(1), centres)
        new = torch.sort(new).values
        if torch.equal(new, centres):
            break
        centres = new
    return xs, assign(centres), centres


def kmeans_thresholds(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k − 1`` sorted thresholds of the original ``tools/cluster.py``: the midpoint of the two adjacent
    sorted samples where the k-means label changes. Where one of the two clusters is empty (our addition)
    the midpoint of the two centres is used instead, so that every code keeps a reachable interval."""
    xs, ends, centres = kmeans_1d(values, k)
    starts = torch.cat([torch.tensor([0]), ends[:-1]])
    counts = ends - starts
    out = []
    for j in range(k - 1):
        if counts[j] > 0 and counts[j + 1] > 0:
            e = int(ends[j])
            out.append(float((xs[e - 1] + xs[e]) * 0.5))
        else:
            out.append(float((centres[j] + centres[j + 1]) * 0.5))
    th = torch.tensor(out, dtype=torch.float64)
    return torch.cummax(th, 0).values.float()


@register_quantizer("qn")
class QNQuantizer(Quantizer):
    """Quantization Networks: learned ``α``, ``β``; fixed k-means biases; temperature schedule."""

    OPTIONS = {
        "temperature_start": 10.0,
        "temperature_end": 500.0,
        "temperature_cap": 2000.0,
        "outlier_sigmas": 3.0,
        "alpha_init": "least_squares",
    }

    def __init__(
        self, bits: int, role: Role, channels: int | None = None, options: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(bits, role, channels, options)
        t0, t1, cap = (float(self.options[k]) for k in ("temperature_start", "temperature_end", "temperature_cap"))
        if self.options["alpha_init"] not in ("least_squares", "inverse_beta"):
            raise ConfigError(
                f"quantizer_options alpha_init={self.options['alpha_init']!r} is invalid; allowed: least_squares, "
                "inverse_beta"
            )
        if not (0 < t0 and 0 < t1 and 0 < cap):
            raise ConfigError(
                f"quantizer_options temperature_start={t0}, temperature_end={t1}, temperature_cap={cap} are "
                "invalid: QN temperatures must be positive"
            )
        shape = (self.num_params,) if (role == "weight" and channels) else ()
        self.log_alpha = nn.Parameter(torch.zeros(shape))
        self.log_beta = nn.Parameter(torch.zeros(shape))
        n = 2**self.bits - 1
        self.register_buffer("biases", torch.arange(n, dtype=torch.float32) + 0.5)
        self.register_buffer("temperature", torch.tensor(min(t0, cap)))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("signed_offset", torch.tensor(self.steps / 2.0))

    # -- target set -----------------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """``n``: the number of unit steps (|Q| − 1)."""
        return 2**self.bits - 1

    @property
    def height(self) -> float:
        """``s_i``: 2 for the odd-integer weight set, 1 for activations."""
        return 2.0 if self.role == "weight" else 1.0

    @property
    def offset(self) -> float:
        """``o``: ``2^B − 1`` for weights, 0 for activations; fitted to the data for signed ones (our design)."""
        if self.role == "weight":
            return float(self.steps)
        return float(self.signed_offset) if bool(self.signed) else 0.0

    @property
    def q_max(self) -> float:
        return float(self.steps) if self.role == "weight" or not bool(self.signed) else self.steps / 2.0

    @property
    def alpha(self) -> torch.Tensor:
        """The output scale ``α`` (learned as ``log α``)."""
        return self.log_alpha.exp()

    @property
    def beta(self) -> torch.Tensor:
        """The input scale ``β`` (learned as ``log β``)."""
        return self.log_beta.exp()

    def grid(self) -> QuantGrid:
        alpha, beta = self.alpha.detach(), self.beta.detach()
        thresholds = self.biases.unsqueeze(0) / beta.unsqueeze(-1) if beta.dim() else self.biases / beta
        if self.role == "weight":
            return QuantGrid(self.bits, "bipolar", alpha, torch.zeros_like(alpha), thresholds=thresholds)
        return QuantGrid(self.bits, "unsigned", alpha, -alpha * self.offset, thresholds=thresholds)

    # -- data and schedule ----------------------------------------------------------------------------------

    def initialize(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.role == "weight":
            per_channel = bool(self.channels)
            peak = x.abs().reshape(x.shape[0], -1).amax(dim=1) if per_channel else x.abs().amax()
            beta = 1.25 * self.q_max / peak.clamp_min(1e-8)
            scaled = x * self.view(beta, x)
        else:
            self.signed.fill_(bool(x.min() < 0))
            flat = x.reshape(-1)
            sig = float(self.options["outlier_sigmas"])
            if sig > 0:
                mean, std = flat.mean(), flat.std() if flat.numel() > 1 else flat.new_zeros(())
                keep = (flat - mean).abs() <= sig * std
                flat = flat[keep] if bool(keep.any()) else flat
            peak = flat.abs().amax() if bool(self.signed) else flat.amax()
            beta = self.q_max / peak.clamp_min(1e-8)
            scaled = flat * beta
        self.log_beta.copy_(beta.log().reshape(self.log_beta.shape))
        self.log_alpha.copy_((-beta.log()).reshape(self.log_alpha.shape))
        self.biases.copy_(kmeans_thresholds(scaled, self.steps + 1))
        self.signed_offset.fill_(self.steps / 2.0)
        if self.options["alpha_init"] == "least_squares":
            if self.role == "activation" and bool(self.signed):
                self.fit_signed_levels(x)
            else:
                self.log_alpha.copy_(self.least_squares_alpha(x).log().reshape(self.log_alpha.shape))

    def fit_signed_levels(self, x: torch.Tensor) -> None:
        """Least-squares ``x ≈ α·(c − o)`` over both ``α`` and ``o`` for signed activations.

        A zero-centred target set ``{−n/2, …, n/2}`` maps skewed inputs (a normalised image: mostly
        background near −0.8, strokes up to +2) to levels far from their k-means clusters; fitting the
        offset puts the lowest level at the background and keeps ``α`` the step between levels.
        """
        c, v = self.codes(x).reshape(-1).double(), x.reshape(-1).double()
        var = ((c - c.mean()) ** 2).mean()
        slope = ((c - c.mean()) * (v - v.mean())).mean() / var if float(var) > 0 else v.new_zeros(())
        if float(slope) <= 0:
            return  # degenerate batch: keep alpha = 1/beta and the zero-centred offset
        self.log_alpha.copy_(slope.log().float().reshape(self.log_alpha.shape))
        self.signed_offset.fill_(float(c.mean() - v.mean() / slope))

    def least_squares_alpha(self, x: torch.Tensor) -> torch.Tensor:
        """``α = Σ x·q / Σ q²`` (per channel for per-channel weights), ``q = s·c − o`` the unit staircase of ``x``.

        The output scale that best fits ``x`` with the current biases and ``β`` (falls back to ``1/β`` where the
        staircase is all zero).
        """
        q = self.codes(x) * self.height - self.offset
        rows = self.role == "weight" and bool(self.channels)
        lead = x.shape[0] if rows else 1
        xr, qr = x.reshape(lead, -1), q.reshape(lead, -1)
        num, den = (xr * qr).sum(dim=1), (qr * qr).sum(dim=1)
        fallback = 1.0 / self.beta.detach().reshape(-1).expand_as(num)
        alpha = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-12), fallback)
        return alpha if rows else alpha.reshape(())

    def update_schedule(self, progress: float) -> None:
        """``T = min(cap, T_start + (T_end − T_start)·progress)``: the linear growth of the original code."""
        t0, t1 = float(self.options["temperature_start"]), float(self.options["temperature_end"])
        self.temperature.fill_(min(float(self.options["temperature_cap"]), t0 + (t1 - t0) * float(progress)))

    # -- forward --------------------------------------------------------------------------------------------

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.view(self.alpha, x), self.view(self.beta, x)
        return qn_soft(x, alpha, beta, self.biases, self.temperature, self.height, self.offset)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, T={float(self.temperature):g}"
