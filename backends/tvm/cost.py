"""What a candidate kernel costs for one layer: timed on this host, or modelled for a target it cannot run.

:class:`HostTimer` (``cost_model="measure"``) compiles each candidate alone, runs it on random codes in the
layer's range, checks its accumulator against the integer reference (a kernel that disagrees is never chosen)
and keeps the fastest run. Timings are cached on disk, keyed by CPU model, ISA flags, thread count, kernel
version and the layer's shape and bits (``$FXQUANT_CACHE_DIR/kernel_costs.json``, default
``~/.cache/fxquant``), so a model converts at full speed the second time.

:class:`StaticModel` (``cost_model="model"``, the only choice for ``"tvm-arm"``) divides the work by the
target's instruction throughput: one-bit MACs per cycle for bit-serial (``wb * ab`` bit-plane pairs),
multiply-adds per cycle for the dot-product and direct kernels, plus a per-element term for packing the
activations. Its numbers are estimates; docs/kernels.md says how far they go.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from tvm import tirx

from fxquant.backends.tvm.arm_estimate import estimate_bitserial_us
from fxquant.conv_geometry import ConvGeometry, DenseGeometry
from fxquant.integer import FrozenLayer, accumulate, input_values
from fxquant.tvm_host import ensure_pool_size

__all__ = ["KernelPlan", "HostTimer", "StaticModel", "KernelMismatch", "cost_cache_path", "host_identity"]

CACHE_FORMAT = 2  # 2: fastest sample (1 kept medians, which a busy machine inflates)


@dataclass(frozen=True)
class KernelPlan:
    """One candidate kernel for one layer: ``build()`` returns the scheduled PrimFunc and its packed weight."""

    kind: str  # "bitserial" | "dot" | "direct"
    detail: str  # instruction choice or layout, e.g. "avx2"
    version: str  # bumped when the generated code changes (cache key)
    build: Callable[[], tuple[tirx.PrimFunc, np.ndarray]]
    tiling: Mapping[str, Any] | None = None  # the family's tiling dataclass as plain data (the manifest's "tiling")


class KernelMismatch(Exception):
    """A candidate's accumulator differs from the integer reference on random codes."""


def cost_cache_path() -> Path:
    root = os.environ.get("FXQUANT_CACHE_DIR") or Path.home() / ".cache" / "fxquant"
    return Path(root) / "kernel_costs.json"


@cache
def host_identity() -> str:
    """CPU model and the ISA flags kernels dispatch on: cached timings are valid for this identity only."""
    model = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_vpopcntdq", "avx_vnni", "asimd",
              "asimddp")
    return f"{model} [{' '.join(f for f in wanted if f in flags)}]"


def _geometry_key(geom: ConvGeometry | DenseGeometry) -> str:
    return json.dumps(geom.__dict__, sort_keys=True, default=list)


def _random_input(layer: FrozenLayer, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Codes in the layer's range (the values the kernel multiplies, looked up for codebook inputs)."""
    generator = torch.Generator().manual_seed(seed)
    table = layer.input_levels_int  # a codebook may hold fewer levels than its bits allow (LCQ: 2^B - 1)
    levels = 2**layer.act_bits if table is None else int(table.numel())
    codes = torch.randint(0, levels, shape, generator=generator, dtype=torch.int32)
    return input_values(layer, codes).to(torch.int32)


class HostTimer:
    """``cost_model="measure"``: time every candidate on this host (exactness checked, cached on disk)."""

    name = "measure"

    def __init__(self, target: tvm.target.Target, threads: int, path: Path | None = None) -> None:
        self.target, self.threads = target, threads
        self.path = path or cost_cache_path()
        self._entries: dict[str, float] = self._load()

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return {}
        entries = data.get("entries", {})
        return {k: float(v) for k, v in entries.items() if isinstance(v, int | float)}

    def _save(self) -> None:
        """Atomic replace; a cache that cannot be written only costs the next run its timings."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".kernel_costs.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"format": CACHE_FORMAT, "entries": self._entries}, f, sort_keys=True, indent=0)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def key(self, plan: KernelPlan, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry) -> str:
        bits = f"w{layer.weight_bits}a{layer.act_bits}{layer.weight_encoding}" if plan.kind == "bitserial" else ""
        return "|".join((host_identity(), f"t{self.threads}", plan.version, plan.kind, plan.detail, bits,
                         _geometry_key(geom)))

    def cost_us(self, plan: KernelPlan, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry) -> float:
        key = self.key(plan, layer, geom)
        if key in self._entries:
            return self._entries[key]
        seconds = self._time(plan, layer, geom)
        self._entries[key] = round(seconds * 1e6, 2)
        self._save()
        return self._entries[key]

    def _time(self, plan: KernelPlan, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry) -> float:
        func, packed = plan.build()
        func = func.with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), target=self.target)
        values = _random_input(layer, geom.input_shape)
        want = accumulate(layer, values).numpy()
        device = tvm.cpu()
        args = [tvm.runtime.tensor(values.numpy(), device), tvm.runtime.tensor(packed, device),
                tvm.runtime.tensor(np.zeros(geom.output_shape, np.int32), device)]
        ensure_pool_size(self.threads)
        lib(*args)
        if not np.array_equal(args[2].numpy().astype(np.int64), want):
            raise KernelMismatch(f"{plan.kind} ({plan.detail}) accumulator differs from the integer reference")
        samples = []
        budget = time.perf_counter() + 0.2
        while len(samples) < 3 or (len(samples) < 15 and time.perf_counter() < budget):
            start = time.perf_counter()
            lib(*args)
            samples.append(time.perf_counter() - start)
        return min(samples)  # the kernel's own time: other load on the machine only ever adds to a sample


#: per-cycle throughput of one x86 core, by instruction choice: one-bit MACs (bit-serial) or multiply-adds;
#: avx2 rows from timings on a Zen 3 core (ResNet-18 3x3 convs); the AVX-512 rows (vpopcntq, vpdpbusd) are
#: their issue rates derated to about 60 % (llvm-mca's Ice Lake model), not timings
_X86_RATES = {
    "bitserial": {"x86-avx512-vpopcntdq": 300.0, "x86-avx2": 96.0, "generic-llvm": 16.0},
    "dot": {"avx512-vnni": 60.0, "avx512-vnni-halved": 45.0, "avx2-u8s8": 40.0, "avx2": 26.0, "generic": 8.0},
    "direct": {"oc-vector": 14.0, "row-vector": 8.0},
}
_GHZ_X86 = 2.5
_PACK_CYCLES_PER_ELEMENT = 0.5


class StaticModel:
    """``cost_model="model"``: work divided by the target's instruction throughput (an estimate, not a timing)."""

    name = "model"

    def __init__(self, target: tvm.target.Target, threads: int, cpu: str | None = None) -> None:
        self.target, self.threads, self.cpu = target, threads, cpu
        triple = str(target.attrs.get("mtriple", "") or "")
        self.arm = triple.startswith(("aarch64", "arm64"))

    def _arm_bitserial_us(self, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry) -> float:
        """The named core's hot loop as generated (llvm-mca, or an instruction count without it; docs/arm.md)."""
        return estimate_bitserial_us(self.cpu or "generic", geom.macs, layer.weight_bits, layer.act_bits)

    def _rate(self, plan: KernelPlan) -> tuple[float, float]:
        """(per-cycle throughput, GHz) for this plan on the target."""
        if self.arm:
            from fxquant.backends.tvm.arm_cores import ARM_CORES

            core = ARM_CORES[self.cpu or "generic"]  # bit-serial: see _arm_bitserial_us
            if plan.kind == "dot":
                return core.int8_macs_per_cycle * (0.8 if plan.detail == "neon-sdot" else 0.5), core.clock_ghz
            return core.int8_macs_per_cycle * 0.25, core.clock_ghz
        table = _X86_RATES[plan.kind]
        return table.get(plan.detail, min(table.values())), _GHZ_X86

    def cost_us(self, plan: KernelPlan, layer: FrozenLayer, geom: ConvGeometry | DenseGeometry) -> float:
        if self.arm and plan.kind == "bitserial":
            return round(self._arm_bitserial_us(layer, geom) / max(1, self.threads), 2)
        rate, ghz = self._rate(plan)
        work = float(geom.macs)
        if plan.kind == "bitserial":
            work *= layer.weight_bits * layer.act_bits
        inputs = float(np.prod(geom.input_shape))
        cycles = work / rate + inputs * _PACK_CYCLES_PER_ELEMENT
        return round(cycles / ghz / 1e3 / max(1, self.threads), 2)

