"""Per-layer facts of a prepared model: scheme, bits, weight scales, weight SQNR, activation range.

The SQNR (``10·log10(Σw² / Σ(w − q(w))²)``, on the weight the quantizer sees, i.e. with batch norm folded)
says how much of each layer's weight survives quantization: each bit adds about 6 dB on a uniform grid,
so a layer far below its neighbours is the one to give more bits or to look at.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.layers import QuantLayer, layer_type_name

__all__ = ["LayerRow", "layer_rows", "format_table", "plot_rows"]


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    scheme: str
    weight_bits: int
    act_bits: int
    weight_scale_min: float
    weight_scale_max: float
    weight_sqnr_db: float | None  # None when quantization is lossless
    act_low: float
    act_high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float | None:
    noise = float((w - q).double().pow(2).sum())
    signal = float(w.double().pow(2).sum())
    return None if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-300) / noise)


@torch.no_grad()
def layer_rows(model: fx.GraphModule) -> list[LayerRow]:
    """One row per quantized layer, in module order.

    Example::

        for row in layer_rows(fxquant.load_prepared("trained.ckpt")): print(row.name, row.weight_sqnr_db)
    """
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLayer):
            continue
        wq, aq = layer.weight_quant, layer.input_quant
        if not (bool(wq.initialized) and bool(aq.initialized)):
            raise FxQuantError(f"layer {name}: quantizers are not calibrated yet (prepare with example inputs)")
        weight = layer.folded_weight_bias()[0].detach()
        w_scale = wq.grid().scale.detach().float().reshape(-1)
        a_ends = aq.grid().dequantize(torch.tensor([0.0, float(2**aq.bits - 1)])).reshape(-1)
        rows.append(LayerRow(
            name=name,
            type=layer_type_name(layer),
            scheme=type(wq).scheme,
            weight_bits=wq.bits,
            act_bits=aq.bits,
            weight_scale_min=float(w_scale.min()),
            weight_scale_max=float(w_scale.max()),
            weight_sqnr_db=_sqnr_db(weight, wq.hard_forward(weight)),
            act_low=float(a_ends.min()),
            act_high=float(a_ends.max()),
        ))
    return rows


_HEADERS = {
    "name": "layer", "type": "type", "scheme": "scheme", "weight_bits": "W", "act_bits": "A",
    "weight_scale_min": "w scale min", "weight_scale_max": "w scale max", "weight_sqnr_db": "SQNR dB",
    "act_low": "act low", "act_high": "act high",
}


def _cell(value: Any) -> str:
    if value is None:
        return "inf"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_table(rows: list[LayerRow]) -> str:
    """A fixed-width text table (the ``fxquant inspect`` output)."""
    names = [f.name for f in fields(LayerRow)]
    table = [[_HEADERS[n] for n in names]] + [[_cell(getattr(r, n)) for n in names] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(names))]
    align = [str.ljust] * 3 + [str.rjust] * (len(names) - 3)  # text columns left, numbers right
    lines = ["  ".join(a(c, w) for a, c, w in zip(align, line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_rows(rows: list[LayerRow]) -> bytes:
    """A PNG bar chart of weight SQNR per layer, bars labelled with their bits (rendered with Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sqnr = [r.weight_sqnr_db if r.weight_sqnr_db is not None else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2.0), 4.0), layout="constrained")
    bars = ax.bar(range(len(rows)), sqnr, color=[f"C{r.weight_bits % 10}" for r in rows])
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(f"W{row.weight_bits}A{row.act_bits}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title("weight quantization SQNR per layer")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
