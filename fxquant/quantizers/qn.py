"""Quantization Networks (Yang et al., CVPR 2019; github.com/aliyun/alibabacloud-quantization-networks).

The quantizer is a sum of unit steps, relaxed to sigmoids of temperature ``T`` in training::

    training:  y = α·( Σ_i s_i·σ(T·(βx − b_i)) + q_0 )        inference:  y = α·( Σ_i s_i·A(βx − b_i) + q_0 )

over a target set ``q_0 < q_1 < … < q_n`` with step heights ``s_i = q_i − q_{i−1}``, fixed biases ``b_i`` and
learned scales ``α`` (output) and ``β`` (input), both learned through their logarithms. As in the original
code the sigmoid argument is clamped to ``[−10, 10]`` and its backward is ``T·s_i·σ(1−σ)`` at the clamped
argument. ``T`` rises linearly with training progress (:meth:`QNQuantizer.update_schedule`), by default from
1 to 20, where the soft function is already the staircase.

Option ``levels``: ``"uniform"`` (default) puts the targets on the bipolar (weights) or unsigned
(activations) grid with the biases at their midpoints, so the layer deploys to the bit-serial kernels;
``"kmeans"`` is the original's clustering, non-uniform, deployed as a codebook. Per-channel weights learn one
``α`` and ``β`` per channel and share ``b_i`` and ``q_c``. Equations, and which choices are the paper's and
which ours: docs/design.md, section "QN"; the measurements behind the defaults: README.md, "Measured".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from fxquant.errors import ConfigError
from fxquant.quantizers.base import Quantizer, Role, add_flag, read_flag, search_clip_range, write_flag
from fxquant.quantizers.compiled import qn as qn_kernels
from fxquant.quantizers.compiled.runtime import kernels_enabled
from fxquant.quantizers.grid import QuantGrid, requantize_levels
from fxquant.quantizers.options import QuantizerOptions
from fxquant.quantizers.registry import register_quantizer

__all__ = ["QNQuantizer", "QNOptions", "qn_soft", "qn_hard", "kmeans_1d", "kmeans_thresholds", "LEVEL_CHOICES"]

CLAMP = 10.0
Levels = Literal["uniform", "kmeans"]
LEVEL_CHOICES = get_args(Levels)
_CHUNK_ELEMENTS = 1 << 22  # sigmoids evaluated together: bounds the memory of 8-bit (255-step) quantizers


class _QNSoft(torch.autograd.Function):
    """``Σ_i s_i·σ(clamp(T·(z − b_i)))`` of ``z = βx`` with the original code's backward (module docstring).

    Only the thresholds within ``10/T`` of ``z`` need a sigmoid: the others sit on the clamp, so they add
    the constant ``σ(±10)`` (and ``σ(10)·σ(−10)`` to the slope) and are summed through prefix sums of the
    heights. Each element evaluates a window of the few sorted thresholds around it, which makes an 8-bit
    quantizer (255 steps) about as cheap as a 2-bit one once ``T`` has grown. With ``evenly_spaced``
    (equal gaps and heights: the uniform target sets) the window is found arithmetically rather than by
    search and gather, and its sigmoids are kept for the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        biases: torch.Tensor,
        heights: torch.Tensor,
        temperature: torch.Tensor,
        evenly_spaced: bool,
    ) -> Any:
        n = biases.numel()
        reach = CLAMP / float(temperature)  # beyond this distance from z a threshold's sigmoid is clamped
        width = _window_width(biases, 2.0 * reach)
        ctx.even = evenly_spaced and width < n
        if ctx.even:
            value, sigmoids = _QNSoft.even_window(z, biases, heights, temperature, width, reach)
            ctx.save_for_backward(*sigmoids)
            top = float(_sigmoid_clamp(z))
            ctx.outside = (n - width) * top * (1.0 - top)
            ctx.gain = float(heights[0]) * float(temperature)
            return value
        ctx.save_for_backward(z, biases, heights, temperature)
        return _QNSoft.sigmoids(z, biases, heights, temperature, slope=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        if ctx.even:
            return grad * _window_slope(ctx.saved_tensors, ctx.outside, grad) * ctx.gain, None, None, None, None
        z, biases, heights, temperature = ctx.saved_tensors
        slope = _QNSoft.sigmoids(z, biases, heights, temperature, slope=True)
        return grad * slope * temperature, None, None, None, None

    @staticmethod
    def sigmoids(
        z: torch.Tensor, biases: torch.Tensor, heights: torch.Tensor, temperature: torch.Tensor, slope: bool
    ) -> torch.Tensor:
        """``Σ_i s_i·σ(c_i)`` or ``Σ_i s_i·σ(c_i)(1 − σ(c_i))`` with ``c_i = clamp(T·z − T·b_i, ±10)``."""
        n = biases.numel()
        reach = CLAMP / float(temperature)
        width = _window_width(biases, 2.0 * reach)
        if width >= n:
            return _QNSoft.all_sigmoids(z, biases, heights, temperature, slope)
        zc = z.contiguous()
        first = torch.searchsorted(biases, zc - reach, right=True).clamp_(max=n - width)  # first unclamped
        index = first.unsqueeze(0) + torch.arange(width, device=z.device).reshape(-1, *([1] * z.dim()))
        sig = torch.sigmoid(torch.clamp(temperature * zc - temperature * biases[index], -CLAMP, CLAMP))
        total = ((sig * (1.0 - sig) if slope else sig) * heights[index]).sum(0)
        cum = torch.cat([heights.new_zeros(1), torch.cumsum(heights, 0)])
        below, above = cum[first], cum[-1] - cum[first + width]  # thresholds passed / not reached
        top = _sigmoid_clamp(z)
        if slope:
            return total + (below + above) * (top * (1.0 - top))
        return total + below * top + above * (1.0 - top)

    @staticmethod
    def even_window(
        z: torch.Tensor,
        biases: torch.Tensor,
        heights: torch.Tensor,
        temperature: torch.Tensor,
        width: int,
        reach: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The windowed sum for ``b_j = b_0 + j·g`` and equal heights ``s``, and the window's sigmoids."""
        n = biases.numel()
        b0, gap, height = float(biases[0]), float(biases[1] - biases[0]), float(heights[0])
        position = (z - b0) / gap  # z in threshold units: b_j sits at j
        first = torch.floor(position - reach / gap).add_(1.0).clamp_(0.0, float(n - width))
        scaled = (position - first).mul_(temperature * gap)  # T·(z − b_first)
        total, sigmoids = torch.zeros_like(z), []
        for k in range(width):
            shifted = scaled if k == 0 else scaled - temperature * (k * gap)
            sig = torch.sigmoid(shifted.clamp(-CLAMP, CLAMP))
            total += sig
            sigmoids.append(sig)
        top = float(_sigmoid_clamp(z))
        # the `first` thresholds before the window are passed (σ(10)), the rest not reached (σ(−10))
        total += first.mul_(2.0 * top - 1.0).add_((n - width) * (1.0 - top))
        return total.mul_(height), sigmoids

    @staticmethod
    def all_sigmoids(
        z: torch.Tensor, biases: torch.Tensor, heights: torch.Tensor, temperature: torch.Tensor, slope: bool
    ) -> torch.Tensor:
        """Every threshold, in chunks that bound the memory (low temperatures, where every sigmoid is live)."""
        lead = [-1] + [1] * z.dim()
        tz = (temperature * z).unsqueeze(0)
        tb = (temperature * biases).reshape(lead)
        s = heights.reshape(lead)
        total = torch.zeros_like(z)
        chunk = max(1, _CHUNK_ELEMENTS // max(z.numel(), 1))
        for start in range(0, biases.numel(), chunk):
            sig = torch.sigmoid(torch.clamp(tz - tb[start : start + chunk], -CLAMP, CLAMP))
            total = total + ((sig * (1.0 - sig) if slope else sig) * s[start : start + chunk]).sum(0)
        return total


class _QNEvenFused(torch.autograd.Function):
    """``α·(S(βx) + q_0)`` for evenly spaced thresholds with per-tensor α, β: the TVM kernels of
    ``fxquant.quantizers.compiled.qn`` over whole blocks, :class:`_QNSoft`'s arithmetic for the tail.

    Same values and gradients as ``alpha * (_QNSoft.apply(beta * x, ...) + q_0)`` (to float32 rounding), in
    one pass forward and one backward instead of a dozen; ``D = S'(βx)`` is the one tensor kept.
    """

    @staticmethod
    def forward(ctx, x, alpha, beta, biases, heights, temperature, low_target: float, width: int):
        n = biases.numel()
        reach = CLAMP / float(temperature)
        top = float(_sigmoid_clamp(x))
        a, b, t, height = float(alpha), float(beta), float(temperature), float(heights[0])
        outside = (n - width) * top * (1.0 - top)
        out, derivative = torch.empty_like(x), torch.empty_like(x)
        head = qn_kernels.qn_even_forward(
            x, out, derivative, alpha=a, beta=b, low_target=low_target, first_bias=float(biases[0]),
            gap=float(biases[1] - biases[0]), reach=reach, last_first=n - width, width=width, temperature=t,
            height=height, top=top, clamp=CLAMP, outside_slope=outside,
        )
        if head < x.numel():
            tail = beta * x.view(-1)[head:]
            value, sigmoids = _QNSoft.even_window(tail, biases, heights, temperature, width, reach)
            out.view(-1)[head:] = alpha * (value + low_target)
            derivative.view(-1)[head:] = _window_slope(sigmoids, outside, tail) * (height * t)
        ctx.save_for_backward(x, alpha, beta, out, derivative)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, alpha, beta, out, derivative = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        head, sums = qn_kernels.qn_even_backward(x, grad, derivative, out, grad_x, float(alpha * beta))
        if head < x.numel():
            xt, gt, dt, ot = (t.view(-1)[head:] for t in (x, grad, derivative, out))
            gd = gt * dt
            grad_x.view(-1)[head:] = gd * (alpha * beta)
            sums = sums + torch.stack((torch.dot(gd, xt), torch.dot(gt, ot)))
        sum_gxd, sum_g_out = sums.unbind(0)
        grad_alpha = (sum_g_out / alpha).reshape(alpha.shape)  # ∂out/∂α = out/α
        grad_beta = (alpha * sum_gxd).reshape(beta.shape)
        return grad_x, grad_alpha, grad_beta, None, None, None, None, None


def _window_slope(sigmoids, outside: float, like: torch.Tensor) -> torch.Tensor:
    """``Σ_window σ(1 − σ) + outside``: the even window's slope from its sigmoids (``outside``: the clamped ones)."""
    slope = torch.full_like(like, outside)
    for sig in sigmoids:
        slope += sig * (1.0 - sig)
    return slope


def _sigmoid_clamp(like: torch.Tensor) -> torch.Tensor:
    """``σ(10)`` in the dtype of ``like``: the value of every threshold that ``z`` has passed by far."""
    return torch.sigmoid(torch.tensor(CLAMP, dtype=like.dtype, device=like.device))


def _window_width(biases: torch.Tensor, length: float) -> int:
    """The most sorted thresholds that an open interval of ``length`` can hold, plus one for rounding."""
    ends = torch.searchsorted(biases, biases + length, right=False)
    return int((ends - torch.arange(biases.numel(), device=biases.device)).max()) + 1


def qn_soft(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    biases: torch.Tensor,
    temperature: torch.Tensor | float,
    targets: torch.Tensor,
    evenly_spaced: bool = False,
) -> torch.Tensor:
    """The training function ``α·(Σ_i s_i·σ(clamp(T(βx − b_i), ±10)) + q_0)``, ``s_i`` the gaps of ``targets``.

    ``evenly_spaced`` promises equal gaps between the biases and equal heights (a faster evaluation)."""
    t = torch.as_tensor(temperature, dtype=x.dtype, device=x.device)
    targets = targets.to(x.dtype)
    heights = targets[1:] - targets[:-1]
    biases = biases.to(x.dtype)
    if evenly_spaced and alpha.numel() == 1 and beta.numel() == 1 and biases.numel() > 1 and float(alpha.detach()) != 0:
        width = _window_width(biases, 2.0 * CLAMP / float(t))
        kernel = qn_kernels.forward_kernel(float(t), float(biases[1] - biases[0]))
        if width < biases.numel() and kernels_enabled(kernel, x):
            return _QNEvenFused.apply(x, alpha, beta, biases, heights, t, float(targets[0]), width)
    return alpha * (_QNSoft.apply(beta * x, biases, heights, t, evenly_spaced) + targets[0])


def qn_hard(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, biases: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The inference function ``α·(Σ_i s_i·A(βx − b_i) + q_0)`` with the unit step ``A(z) = [z ≥ 0]``."""
    z = beta * x
    targets = targets.to(x.dtype)
    reached = (z.unsqueeze(-1) >= biases.to(x.dtype)).to(x.dtype)
    return alpha * ((reached * (targets[1:] - targets[:-1])).sum(-1) + targets[0])


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


def kmeans_thresholds(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thresholds, centres)``: the ``k − 1`` sorted thresholds of the original ``tools/cluster.py`` (the
    midpoint of the two adjacent sorted samples where the k-means label changes) and the ``k`` centres.
    Where one of the two clusters is empty (our addition) the midpoint of the two centres is used instead,
    so that every code keeps a reachable interval."""
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
    return torch.cummax(th, 0).values.float(), centres.float()


@dataclass(frozen=True, eq=False)
class QNOptions(QuantizerOptions):
    """The temperature runs linearly from ``temperature_start`` to ``temperature_end`` over training, capped at
    ``temperature_cap``; ``levels`` picks the target set; ``outlier_sigmas`` (``levels="kmeans"``
    activations) drops values beyond mean + that many standard deviations before clustering (0: none)."""

    temperature_start: float = 1.0
    temperature_end: float = 20.0
    temperature_cap: float = 2000.0
    levels: Levels = "uniform"
    outlier_sigmas: float = 3.0

    def check(self) -> None:
        for option in ("temperature_start", "temperature_end", "temperature_cap"):
            if not getattr(self, option) > 0:
                raise ConfigError(
                    f"quantizer_options {option}={getattr(self, option)!r} is invalid: QN temperatures must be positive"
                )
        if not self.outlier_sigmas >= 0:
            raise ConfigError(
                f"quantizer_options outlier_sigmas={self.outlier_sigmas!r} is invalid: expected a number >= 0 (0: off)"
            )


@register_quantizer("qn")
class QNQuantizer(Quantizer):
    """Quantization Networks: learned ``α``, ``β``; fixed biases and targets; temperature schedule."""

    options_class = QNOptions
    options: QNOptions

    def __init__(
        self, bits: int, role: Role, channels: int | None = None, options: QNOptions | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(bits, role, channels, options)
        t0, cap = self.options.temperature_start, self.options.temperature_cap
        if role == "weight" and self.bits == 1:
            raise ConfigError(
                "quantizer 'qn' cannot quantize weights to 1 bit: its learned output scale α does not follow the "
                "batch-norm fold factor, so the running statistics drift and eval collapses; use 'dsq' or 'lsq' "
                "(1-bit weights scaled by mean|w|) or 2+ weight bits"
            )
        shape = (self.num_params,) if (role == "weight" and channels) else ()
        self.log_alpha = nn.Parameter(torch.zeros(shape))
        self.log_beta = nn.Parameter(torch.zeros(shape))
        targets = self.uniform_targets(0.0)
        self.register_buffer("targets", targets)
        self.register_buffer("biases", (targets[1:] + targets[:-1]) * 0.5)
        self.register_buffer("temperature", torch.tensor(min(t0, cap)))
        add_flag(self, "signed", role == "weight")

    # -- target set -----------------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """``n``: the number of steps (``2^B − 1``)."""
        return 2**self.bits - 1

    @property
    def uniform(self) -> bool:
        return self.options.levels == "uniform"

    def uniform_targets(self, low: float) -> torch.Tensor:
        """Weights: the odd integers ``2c − n``; activations: ``c + low`` (``low`` the lowest target)."""
        c = torch.arange(self.steps + 1, dtype=torch.float32)
        return 2.0 * c - self.steps if self.role == "weight" else c + low

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
        per_channel = beta.dim() > 0
        thresholds = self.biases.unsqueeze(0) / beta.unsqueeze(-1) if per_channel else self.biases / beta
        if not self.uniform:
            levels = alpha.unsqueeze(-1) * self.targets if per_channel else alpha * self.targets
            levels_int, int_scale = requantize_levels(levels)
            return QuantGrid(self.bits, "codebook", int_scale, torch.zeros_like(int_scale), levels, thresholds,
                             levels_int=levels_int)
        if self.role == "weight":
            return QuantGrid(self.bits, "bipolar", alpha, torch.zeros_like(alpha), thresholds=thresholds)
        return QuantGrid(self.bits, "unsigned", alpha, alpha * self.targets[0], thresholds=thresholds)

    # -- data and schedule ----------------------------------------------------------------------------------

    def initialize(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.role == "activation":
            write_flag(self, "signed", bool(x.min() < 0))
        if self.uniform:
            self.fit_uniform(x)
        else:
            self.fit_kmeans(x)

    def fit_uniform(self, x: torch.Tensor) -> None:
        """Targets on the uniform grid of the squared-error-optimal clip range; biases at their midpoints."""
        weight = self.role == "weight"
        low, high = search_clip_range(x, self.bits, signed=weight, per_channel=weight and bool(self.channels))
        alpha = high / self.steps if weight else (high - low) / self.steps
        alpha = alpha.clamp_min(1e-8)
        targets = self.uniform_targets(0.0 if weight else float(low / alpha))
        self.targets.copy_(targets)
        self.biases.copy_((targets[1:] + targets[:-1]) * 0.5)
        self.log_alpha.copy_(alpha.log().reshape(self.log_alpha.shape))
        self.log_beta.copy_((-alpha.log()).reshape(self.log_beta.shape))

    def fit_kmeans(self, x: torch.Tensor) -> None:
        """The original's initialisation: ``β`` from the peak, k-means biases and centres on ``βx``, ``α = 1/β``."""
        if self.role == "weight":
            peak = x.abs().reshape(x.shape[0], -1).amax(dim=1) if self.channels else x.abs().amax()
            beta = 1.25 * self.steps / peak.clamp_min(1e-8)
            scaled = x * self.view(beta, x)
        else:
            flat = x.reshape(-1)
            sig = self.options.outlier_sigmas
            if sig > 0 and flat.numel() > 1:
                keep = (flat - flat.mean()).abs() <= sig * flat.std()
                flat = flat[keep] if bool(keep.any()) else flat
            signed = read_flag(self, "signed")
            q_max = self.steps / 2.0 if signed else float(self.steps)
            beta = q_max / (flat.abs().amax() if signed else flat.amax()).clamp_min(1e-8)
            scaled = flat * beta
        thresholds, centres = kmeans_thresholds(scaled, self.steps + 1)
        self.biases.copy_(thresholds)
        self.targets.copy_(centres)
        self.log_beta.copy_(beta.log().reshape(self.log_beta.shape))
        self.log_alpha.copy_((-beta.log()).reshape(self.log_alpha.shape))

    def update_schedule(self, progress: float) -> None:
        """``T = min(cap, T_start + (T_end − T_start)·progress)``: the linear growth of the original code."""
        t0, t1 = self.options.temperature_start, self.options.temperature_end
        self.temperature.fill_(min(self.options.temperature_cap, t0 + (t1 - t0) * float(progress)))

    # -- forward --------------------------------------------------------------------------------------------

    def soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.view(self.alpha, x), self.view(self.beta, x)
        evenly_spaced = self.uniform and self.steps > 1  # biases at the midpoints of uniform targets
        return qn_soft(x, alpha, beta, self.biases, self.temperature, self.targets, evenly_spaced)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.options.levels}, T={float(self.temperature):g}"
