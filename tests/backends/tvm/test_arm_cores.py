"""Named aarch64 cores: target dicts, the NEON hot loop in the exported library (cnt, no stack traffic), no
per-task workspace allocations, exactness under qemu, and the static cost model."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm.target.codegen import llvm_cpu_has_features

import fxquant
from fxquant.backends.tvm import arm_estimate
from fxquant.backends.tvm.arm_cores import ARM_CORES, arm_core
from fxquant.backends.tvm.build import ARM_TRIPLE, arm_target_dict
from fxquant.backends.tvm.emulate import emulation_available, emulation_missing, qemu_python_command
from fxquant.backends.tvm.kernels import conv2d_primfunc, dense_primfunc, pack_weights
from fxquant.backends.tvm.kernels.geometry import BitserialGeometry
from fxquant.backends.tvm.options import ARM_CPUS
from fxquant.integer import accumulate
from tests.backends.tvm.helpers import ResidualNet, quantized
from tests.backends.tvm.test_bitserial import _random_codes, make_conv, make_dense

CROSS = f"{ARM_TRIPLE}-g++"
OBJDUMP = f"{ARM_TRIPLE}-objdump"
needs_cross_tools = pytest.mark.skipif(
    shutil.which(CROSS) is None or shutil.which(OBJDUMP) is None,
    reason=f"{CROSS} / {OBJDUMP} missing (.ci/setup-arm)",
)
needs_emulation = pytest.mark.skipif(
    not emulation_available(), reason=f"aarch64 emulation missing: {'; '.join(emulation_missing())} (.ci/setup-arm)"
)

# (out_c, in_c, k, wb, ab, encoding, stride, pad, dilation, (height, width)): every kernel path, small
LAYERS = {
    "paired": (16, 64, 3, 2, 2, "bipolar", 1, 1, 1, (5, 8)),  # pixel pairs, stride 1
    "paired_stride2_tail": (8, 130, 3, 1, 2, "unsigned", 2, 1, 1, (5, 9)),  # pairs at distance 2, odd tail
    "paired_chunked": (8, 2100, 1, 1, 1, "bipolar", 1, 0, 1, (2, 3)),  # runs split into chunks of words
    "wide_shift": (8, 24, 3, 8, 8, "bipolar", 1, 1, 1, (4, 5)),  # 8-bit codes: shifts past 16-bit lanes
    "dilated": (8, 40, 3, 2, 1, "bipolar", 1, 2, 2, (6, 6)),  # one run per tap
}


def _layer_cases() -> list[tuple[str, object, tuple[int, ...]]]:
    cases = []
    for i, (name, (oc, ic, k, wb, ab, enc, s, p, d, (h, w))) in enumerate(LAYERS.items()):
        cases.append((name, make_conv(oc, ic, k, wb, ab, enc, s, p, d, seed=i), (1, ic, h, w)))
    cases.append(("dense", make_dense(10, 300, 2, 3, "bipolar"), (3, 300)))
    return cases


def _module(cpu: str) -> tvm.IRModule:
    target = tvm.target.Target(arm_target_dict(cpu))
    funcs = {}
    for name, layer, shape in _layer_cases():
        build = dense_primfunc if name == "dense" else conv2d_primfunc
        funcs[name] = build(layer, shape, target).with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Per core: the exported aarch64 library of every test layer and its ``objdump -d`` listing."""
    if shutil.which(CROSS) is None or shutil.which(OBJDUMP) is None:
        pytest.skip(f"{CROSS} / {OBJDUMP} missing (.ci/setup-arm)")
    from tvm.support import cc

    out = {}
    folder = tmp_path_factory.mktemp("cores")
    for cpu in ARM_CORES:
        lib = folder / f"{cpu}.so"
        target = tvm.target.Target(arm_target_dict(cpu))
        tvm.compile(_module(cpu), target=target).export_library(str(lib), fcompile=cc.cross_compiler(CROSS))
        listing = subprocess.run([OBJDUMP, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        out[cpu] = (lib, listing)
    return out


def test_registry_covers_the_option_values() -> None:
    assert tuple(ARM_CORES) == ARM_CPUS
    for name, core in ARM_CORES.items():
        assert core.name == name and core.notes and core.clock_ghz > 0
        assert core.has_dotprod == ("+dotprod" in core.mattr) == (name in ("cortex-a76", "neoverse-n1"))
    assert arm_core("cortex-a53").popcount_ones_per_cycle == 43
    assert {ARM_CORES[n].popcount_ones_per_cycle for n in ("cortex-a72", "cortex-a76", "neoverse-n1")} == {85}
    assert [ARM_CORES[n].int8_macs_per_cycle for n in ("cortex-a53", "cortex-a72", "neoverse-n1")] == [5, 8, 32]
    assert arm_core("cortex-a76").mcpu_for_mca == "neoverse-n1"  # LLVM's cortex-a76 model is the A57's
    with pytest.raises(fxquant.ConfigError, match=r"cpu='cortex-a9'.*neoverse-n1"):
        arm_core("cortex-a9")


@pytest.mark.parametrize("cpu", ARM_CPUS)
def test_target_dict(cpu: str) -> None:
    core = ARM_CORES[cpu]
    spec = arm_target_dict(cpu)
    assert spec == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": core.llvm_cpu, "mattr": list(core.mattr)}
    target = tvm.target.Target(spec)
    assert bool(llvm_cpu_has_features(["neon"], target))
    assert bool(llvm_cpu_has_features(["dotprod"], target)) == core.has_dotprod
    assert arm_target_dict() == arm_target_dict("generic") and arm_target_dict()["mcpu"] == "generic"


def test_no_workspace_allocation_per_task() -> None:
    """Tile scratch lives on the stack frame: no TVMBackendAllocWorkspace inside any parallel task."""
    ir = tvm.compile(_module("generic"), target=tvm.target.Target(arm_target_dict())).mod.inspect_source("ll")
    lambdas = re.findall(r"^define [^\n]*@__tvm_parallel_lambda[^\n]*\{\n(.*?)^\}", ir, re.M | re.S)
    assert lambdas
    assert not [body for body in lambdas if "@__TVMBackendAllocWorkspace" in body]


@needs_cross_tools
@pytest.mark.parametrize("cpu", ARM_CPUS)
def test_hot_loop_counts_in_registers(libraries, cpu: str) -> None:
    """The exported library has NEON ``cnt``, and no innermost ``cnt`` loop loads or stores on the stack."""
    _, listing = libraries[cpu]
    assert re.search(r"\bcnt\s+v\d+\.16b", listing)
    loops = arm_estimate.popcount_loops(listing)
    hot = arm_estimate.bitserial_hot_loop(listing)
    assert hot.ones_per_iteration >= 16 * 128  # the 8 pixels x 4 channels tile: 16 byte counters
    spills = {f"{loop.function}@{loop.start:x}": [i.text() for i in loop.stack_accesses] for loop in loops}
    assert not {k: v for k, v in spills.items() if v}, spills


@needs_cross_tools
@needs_emulation
def test_exact_under_qemu(libraries, tmp_path: Path) -> None:
    """Every kernel path, built for an in-order and an out-of-order core, equals ``fxquant.integer.accumulate``."""
    arrays = {}
    for name, layer, shape in _layer_cases():
        codes = _random_codes(shape, layer.act_bits, seed=len(arrays))
        arrays[f"{name}.codes"] = codes.numpy()
        arrays[f"{name}.w"] = pack_weights(layer)
        arrays[f"{name}.ref"] = accumulate(layer, codes).numpy().astype(np.int32)
    np.savez(tmp_path / "io.npz", **arrays)
    names = [name for name, _, _ in _layer_cases()]
    libs = [str(libraries[cpu][0]) for cpu in ("cortex-a53", "neoverse-n1")]
    runner = tmp_path / "run.py"
    runner.write_text(
        "import sys, numpy as np, tvm\n"
        f"d = np.load({str(tmp_path / 'io.npz')!r})\n"
        f"for lib in {libs!r}:\n"
        "    m = tvm.runtime.load_module(lib)\n"
        f"    for name in {names!r}:\n"
        "        out = tvm.runtime.tensor(np.full(d[name + '.ref'].shape, 7777, np.int32))\n"
        "        m[name](tvm.runtime.tensor(d[name + '.codes']), tvm.runtime.tensor(d[name + '.w']), out)\n"
        "        same = np.array_equal(out.numpy(), d[name + '.ref'])\n"
        "        print(lib.rsplit('/', 1)[-1], name, 'EXACT' if same else 'WRONG')\n"
    )
    result = subprocess.run(qemu_python_command(runner), capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.endswith(("EXACT", "WRONG"))]
    assert len(lines) == len(libs) * len(names) and all(line.endswith("EXACT") for line in lines), (
        result.stdout + result.stderr[-2000:]
    )


@needs_cross_tools
def test_manifest_records_the_core(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    q = quantized(ResidualNet(width=8), x, weight_bits=1, act_bits=1)
    art = fxquant.convert(q, backend="tvm-arm", output_dir=tmp_path / "a76", cpu="cortex-a76")
    assert art.manifest["arm_cpu"] == "cortex-a76"
    assert art.manifest["target"]["mcpu"] == "cortex-a76" and "+dotprod" in art.manifest["target"]["mattr"]
    with pytest.raises(fxquant.ConfigError, match="cpu="):
        fxquant.convert(q, backend="tvm-arm", output_dir=tmp_path / "bad", cpu="apple-m1")


_OBJDUMP_SNIPPET = """
0000000000001000 <kernel>:
    1000:\t91000400 \tadd\tx0, x0, #0x1
    1004:\t3dc00000 \tldr\tq0, [x1]
    1008:\t4e201c01 \tand\tv1.16b, v0.16b, v0.16b
    100c:\t4e205821 \tcnt\tv1.16b, v1.16b
    1010:\t3d8003e1 \tstr\tq1, [sp, #16]
    1014:\t54ffff81 \tb.ne\t1004 <kernel+0x4>
    1018:\t54ffff41 \tb.ne\t1000 <kernel>
"""


def test_listing_parser_finds_the_innermost_popcount_loop() -> None:
    loops = arm_estimate.popcount_loops(_OBJDUMP_SNIPPET)
    assert [(loop.start, loop.end) for loop in loops] == [(0x1004, 0x1014)]
    loop = arm_estimate.bitserial_hot_loop(_OBJDUMP_SNIPPET)
    assert loop.popcounts == 1 and loop.ones_per_iteration == 128
    assert [i.text() for i in loop.stack_accesses] == ["str q1, [sp, #16]"]
    assert loop.assembly().splitlines()[-1].strip() == "b.ne .Lhot"


@pytest.mark.parametrize("cpu", ARM_CPUS)
def test_hot_loop_estimate(cpu: str) -> None:
    loop = arm_estimate.hot_loop(cpu)
    assert loop.ones_per_iteration == 16 * 128 and not loop.loop.stack_accesses
    assert loop.cycles > 0 and ("llvm-mca" in loop.method or "static" in loop.method)
    assert 0.5 < arm_estimate.hot_loop_efficiency(cpu) <= 1.02
    assert arm_estimate.bitserial_hot_loop_cycles(cpu) == loop.cycles


def test_static_fallback_without_llvm_mca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arm_estimate, "llvm_mca_path", lambda: None)
    arm_estimate._hot_loop.cache_clear()
    try:
        loop = arm_estimate.hot_loop("cortex-a72")
        assert loop.method.startswith("static")
        # 16 counters x (and, cnt, add) on two NEON pipes: at least 24 cycles per iteration
        assert loop.cycles >= 24 and arm_estimate.hot_loop_efficiency("cortex-a72") <= 1.01
    finally:
        arm_estimate._hot_loop.cache_clear()


def test_layer_estimate_and_ceilings() -> None:
    geom = BitserialGeometry(1, 128, 28, 28, 128, 3, 3, (1, 1), (1, 1), (1, 1, 1, 1), 2, 2, True)
    macs = geom.bit_ops // 4
    for cpu in ARM_CPUS:
        core = ARM_CORES[cpu]
        ceiling = arm_estimate.popcount_ceiling_us(cpu, macs, 2, 2)
        assert ceiling == pytest.approx(macs * 4 / core.popcount_ones_per_cycle / core.clock_ghz / 1e3)
        assert arm_estimate.int8_ceiling_us(cpu, macs) == pytest.approx(
            macs / core.int8_macs_per_cycle / core.clock_ghz / 1e3
        )
        parts = arm_estimate.estimate_bitserial(cpu, macs, 2, 2, geom)
        assert parts.us == pytest.approx(parts.cycles / core.clock_ghz / 1e3)
        assert min(parts.hot_cycles, parts.chunk_cycles, parts.tile_cycles, parts.pack_cycles) > 0
        assert ceiling < parts.us < 3 * ceiling
        assert arm_estimate.estimate_bitserial_us(cpu, macs, 2, 2) <= parts.us  # no padding, tiles or packing
