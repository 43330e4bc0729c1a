"""A bitwidth plan: per-layer (weight bits, activation bits), as the SDQ search returns it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fxquant.bits import check_bits
from fxquant.errors import ConfigError
from fxquant.io.output_files import write_text_atomic

__all__ = ["BitwidthPlan", "search_report"]

PLAN_FORMAT = "fxquant.bitwidth_plan/1"


@dataclass(frozen=True)
class BitwidthPlan:
    """Layer name → ``(weight_bits, act_bits)``; applied by ``QuantConfig(plan=...)``.

    Example::

        plan = BitwidthPlan({"conv1": (8, 8), "layer1.0.conv1": (3, 4)})
        plan.save("plan.json"); BitwidthPlan.load("plan.json") == plan
        plan.report("plan.png")   # per-layer table and bar chart (a searched plan carries the layer sizes)

    ``metadata`` must be JSON data; a searched plan keeps the budget, the achieved costs, the layer sizes
    (``metadata["layers"]``), the ties and the search's sensitivities there.
    """

    bits: Mapping[str, tuple[int, int]]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for name, pair in dict(self.bits).items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ConfigError(f"plan[{name!r}] must be (weight_bits, act_bits), got {pair!r}")
            for what, b in zip(("weight_bits", "act_bits"), pair, strict=True):
                check_bits(f"plan[{name!r}].{what}", b)
            clean[name] = (int(pair[0]), int(pair[1]))
        object.__setattr__(self, "bits", clean)
        object.__setattr__(self, "metadata", dict(self.metadata))

    def check_layers(self, layers: list[str]) -> None:
        unknown = sorted(set(self.bits) - set(layers))
        if unknown:
            raise ConfigError(f"plan names layers the model does not have: {unknown}; layers are: {layers}")

    def to_dict(self) -> dict[str, Any]:
        bits = {k: list(v) for k, v in self.bits.items()}
        return {"format": PLAN_FORMAT, "bits": bits, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitwidthPlan:
        if data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"not a bitwidth plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        return cls({k: tuple(v) for k, v in data["bits"].items()}, data.get("metadata", {}))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (a crash never leaves half a plan)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def report(
        self,
        png_path: str | os.PathLike | None = None,
        costs: Mapping[str, Any] | None = None,
        file: TextIO | None = None,
        title: str | None = None,
        quiet: bool = False,
    ) -> str:
        """Per-layer table of bits, MACs and BitOPs (printed unless ``quiet``), and a bar chart with
        ``png_path``; see :func:`fxquant.search_report`."""
        return search_report(self, png_path, costs, file, title, quiet)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BitwidthPlan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read bitwidth plan {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # JSON syntax or not UTF-8
            raise ConfigError(f"cannot read bitwidth plan {path}: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"bitwidth plan {path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"bitwidth plan {path}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bitwidth plan {path} is malformed: {type(exc).__name__}: {exc}") from exc


# -- report -----------------------------------------------------------------------------------------------


def _layer_table(plan: BitwidthPlan, costs: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    info = costs if costs is not None else plan.metadata.get("layers", {})
    rows = []
    for name, (wb, ab) in plan.bits.items():
        c = info.get(name)
        c = c.to_dict() if hasattr(c, "to_dict") else c
        macs = c["macs"] if c else None
        params = c["params"] if c else None
        rows.append({
            "layer": name,
            "weight_bits": wb,
            "act_bits": ab,
            "params": params,
            "macs": macs,
            "bitops": macs * wb * ab if macs is not None else None,
            "size_bytes": params * wb / 8 + c["overhead_bytes"] if c else None,
        })
    return rows


def search_report(
    plan: BitwidthPlan,
    png_path: str | os.PathLike | None = None,
    costs: Mapping[str, Any] | None = None,
    file: TextIO | None = None,
    title: str | None = None,
    quiet: bool = False,
) -> str:
    """Print (to ``file``, default stdout, unless ``quiet``) and return a per-layer table of bits, MACs and
    BitOPs; with ``png_path``, also draw the bits and BitOPs per layer as a bar chart (matplotlib, Agg).

    Layer sizes come from the plan's metadata (a searched plan carries them) or from ``costs``
    (``fxquant.passes.analysis.cost_model.layer_costs`` of a prepared model).

    Example::

        fxquant.search_report(plan, "plan.png")
    """
    rows = _layer_table(plan, costs)
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    header = f"{'layer':<{width}}  {'W':>2} {'A':>2} {'params':>9} {'MACs':>12} {'MBitOPs':>10} {'bytes':>10}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if v is not None else "?"

    for r in rows:
        mbitops = r["bitops"] / 1e6 if r["bitops"] is not None else None
        lines.append(
            f"{r['layer']:<{width}}  {r['weight_bits']:>2} {r['act_bits']:>2} {fmt(r['params'], '>9')} "
            f"{fmt(r['macs'], '>12')} {fmt(mbitops, '>10.2f')} {fmt(r['size_bytes'], '>10.1f')}"
        )
    known = [r for r in rows if r["params"] is not None]
    if known and len(known) == len(rows):
        params = sum(r["params"] for r in rows)
        avg = sum(r["params"] * r["weight_bits"] for r in rows) / params
        total_bitops = sum(r["bitops"] for r in rows) / 1e6
        total_bytes = sum(r["size_bytes"] for r in rows)
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<{width}}  {'':>2} {'':>2} {params:>9} {sum(r['macs'] for r in rows):>12} "
            f"{total_bitops:>10.2f} {total_bytes:>10.1f}"
        )
        lines.append(f"average weight bits (parameter-weighted): {avg:.4f}")
    meta = plan.metadata
    if "metric" in meta and "target" in meta:
        achieved = meta.get("achieved", float("nan"))
        lines.append(f"budget: {meta['metric']} <= {meta['target']:.6g}; achieved {achieved:.6g}")
    text = "\n".join(lines)
    if not quiet:
        print(text, file=file if file is not None else sys.stdout)
    if png_path is not None:
        _bar_chart(rows, Path(png_path), title)
    return text


def _bar_chart(rows: list[dict[str, Any]], path: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in rows]
    xs = range(len(rows))
    fig, (ax_bits, ax_ops) = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(rows) + 2), 6.5), sharex=True)
    ax_bits.bar([x - 0.2 for x in xs], [r["weight_bits"] for r in rows], width=0.4, label="weight bits")
    ax_bits.bar([x + 0.2 for x in xs], [r["act_bits"] for r in rows], width=0.4, label="activation bits")
    ax_bits.set_ylabel("bits")
    ax_bits.set_ylim(0, 10.5)
    ax_bits.set_yticks(range(0, 9))
    ax_bits.legend(loc="upper center", ncol=2, fontsize=8)
    ax_ops.bar(list(xs), [(r["bitops"] or 0) / 1e6 for r in rows], color="tab:green")
    ax_ops.set_ylabel("MBitOPs / sample")
    ax_ops.set_xticks(list(xs))
    ax_ops.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    if title:
        ax_bits.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
