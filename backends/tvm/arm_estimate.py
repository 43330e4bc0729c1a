"""Static cost of a bit-serial layer on a named aarch64 core (:mod:`.arm_cores`), without aarch64 hardware.

The estimate has three parts:

1. **Hot loop.** A small reference conv is compiled for the core (LLVM's own assembly, so no cross compiler is
   needed), the innermost loop that contains the NEON ``cnt`` instructions is cut out, and ``llvm-mca`` reports its
   cycles per iteration under the core's scheduling model (``ArmCore.mcpu_for_mca``). Without ``llvm-mca`` a static
   bound is used instead: instructions per class divided by the core's issue width, NEON pipes and load pipes.
   Every ``cnt`` on 16 bytes is 128 one-bit multiply-accumulates, so one iteration's work is known exactly.
2. **Layer.** Hot-loop iterations of the whole layer (bit-plane pairs x taps x padded words x register tiles,
   padding and ragged tiles included) times the cycles per iteration, plus the per-chunk widening and per-tile
   set-up and output stores (counted instructions over the NEON pipes) and a packing term for the activation
   bit-planes and the bipolar window sums.
3. **Ceilings.** ``popcount_ceiling_us``: the layer's one-bit MACs at the core's bit-serial ceiling;
   ``int8_ceiling_us``: its MACs at the core's int8 ceiling (``sdot`` where the core has it).

It ignores memory: ``llvm-mca`` assumes every load hits L1, and nothing here models cache or TLB misses, the
thread pool, or frequency scaling. One thread; see ``docs/arm.md`` for how far to trust it.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass

from fxquant.backends.tvm.arm_cores import ArmCore, arm_core
from fxquant.backends.tvm.build import arm_target_dict
from fxquant.backends.tvm.kernels import conv2d_primfunc
from fxquant.backends.tvm.kernels.geometry import BitserialGeometry
from fxquant.backends.tvm.kernels.layout import MAX_CHUNK, OC_BLOCK
from fxquant.backends.tvm.kernels.microkernel import paired_runs
from fxquant.backends.tvm.kernels.schedule_arm import NeonIsa
from fxquant.errors import BackendError
from fxquant.integer import FrozenConv2d, frozen_layer

__all__ = [
    "Instruction",
    "Loop",
    "HotLoop",
    "parse_listing",
    "innermost_loops",
    "popcount_loops",
    "bitserial_hot_loop",
    "llvm_mca_path",
    "mca_cycles",
    "static_cycles",
    "hot_loop",
    "bitserial_hot_loop_cycles",
    "hot_loop_efficiency",
    "popcount_ceiling_us",
    "int8_ceiling_us",
    "estimate_bitserial_us",
    "estimate_bitserial",
    "LayerEstimate",
    "layer_efficiency",
    "REFERENCE_LAYER",
]

# ----------------------------------------------------------------------------------------------------------------
# Listings: objdump -d output of a library, or LLVM's assembly text; both become per-function instruction lists.

_BRANCHES = {"b", "cbz", "cbnz", "tbz", "tbnz"}
_OBJDUMP_FUNC = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_OBJDUMP_INSN = re.compile(r"^\s+([0-9a-f]+):\s+(?:(?:[0-9a-f]{2} ?){4}\s+|[0-9a-f]{8}\s+)?([a-z][\w.]*)\s*(.*)$")
_ASM_LABEL = re.compile(r"^([.$\w][\w.$]*):")
_ASM_INSN = re.compile(r"^\s+([a-z][\w.]*)(?:\s+(.*))?$")
_STACK = re.compile(r"\[sp\b")


@dataclass(frozen=True)
class Instruction:
    """One instruction; ``target`` is the address (objdump) or index (assembly) a direct branch jumps to."""

    address: int
    mnemonic: str
    operands: str
    target: int | None = None

    @property
    def is_branch(self) -> bool:
        return self.mnemonic in _BRANCHES or self.mnemonic.startswith("b.")

    @property
    def touches_stack(self) -> bool:
        """A load or store addressed from the stack pointer (spills, reloads, stack arrays).

        ``x29`` is not counted: LLVM allocates it as an ordinary register where it omits the frame pointer.
        """
        return self.mnemonic.startswith(("ld", "st")) and bool(_STACK.search(self.operands))

    def text(self, label: str | None = None) -> str:
        """The instruction as ``llvm-mca`` reads it (a branch jumps to ``label``)."""
        if self.target is not None and label is not None:
            head = ", ".join(self.operands.split(",")[:-1])
            return f"{self.mnemonic} {head + ', ' if head else ''}{label}"
        return f"{self.mnemonic} {self.operands}".strip()


def _strip_comment(operands: str) -> str:
    return operands.split("//")[0].split(";")[0].strip()


def _branch_target(mnemonic: str, operands: str) -> str | None:
    if not (mnemonic in _BRANCHES or mnemonic.startswith("b.")):
        return None
    return operands.split(",")[-1].strip() or None


def _parse_objdump(text: str) -> dict[str, list[Instruction]]:
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        header = _OBJDUMP_FUNC.match(line)
        if header:
            current = functions.setdefault(header.group(2), [])
            continue
        insn = _OBJDUMP_INSN.match(line)
        if insn is None or current is None:
            continue
        address, mnemonic, operands = int(insn.group(1), 16), insn.group(2), _strip_comment(insn.group(3))
        target = _branch_target(mnemonic, operands)
        where = re.match(r"([0-9a-f]+)(?:\s*<.*>)?$", target) if target else None
        if where:
            operands = re.sub(r"\s*<[^>]*>$", "", operands)
        current.append(Instruction(address, mnemonic, operands, int(where.group(1), 16) if where else None))
    return functions


def _parse_asm(text: str) -> dict[str, list[Instruction]]:
    functions: dict[str, list[Instruction]] = {}
    pending: list[tuple[str, int, str, str, str]] = []  # function, index, mnemonic, operands, label
    labels: dict[tuple[str, str], int] = {}
    function, index = "", 0
    for line in text.splitlines():
        label = _ASM_LABEL.match(line)
        if label:
            name = label.group(1)
            if not name.startswith("."):
                function = name
                functions.setdefault(function, [])
            labels[(function, name)] = index
            continue
        insn = _ASM_INSN.match(line)
        if insn is None or not function:
            continue
        mnemonic, operands = insn.group(1), _strip_comment(insn.group(2) or "")
        pending.append((function, index, mnemonic, operands, _branch_target(mnemonic, operands) or ""))
        index += 1
    for func, at, mnemonic, operands, target in pending:
        resolved = labels.get((func, target)) if target else None
        functions[func].append(Instruction(at, mnemonic, operands, resolved))
    return functions


def parse_listing(text: str) -> dict[str, list[Instruction]]:
    """Instructions per function from ``objdump -d`` output or from LLVM assembly text."""
    return _parse_objdump(text) if re.search(r"^[0-9a-f]+ <.+>:$", text, re.M) else _parse_asm(text)


@dataclass(frozen=True)
class Loop:
    """A loop closed by a backward branch: its body is every instruction from the target to the branch."""

    function: str
    body: tuple[Instruction, ...]

    @property
    def start(self) -> int:
        return self.body[0].address

    @property
    def end(self) -> int:
        return self.body[-1].address

    @property
    def popcounts(self) -> int:
        return sum(1 for i in self.body if i.mnemonic == "cnt")

    @property
    def ones_per_iteration(self) -> int:
        """One-bit multiply-accumulates per iteration: 128 per ``cnt`` on 16 bytes, 64 on 8."""
        return sum(128 if ".16b" in i.operands else 64 for i in self.body if i.mnemonic == "cnt")

    @property
    def stack_accesses(self) -> list[Instruction]:
        return [i for i in self.body if i.touches_stack]

    def assembly(self) -> str:
        """The body as ``llvm-mca`` input, the closing branch jumping back to the top."""
        lines = [".Lhot:"]
        lines += [f"  {i.text('.Lhot' if i.target is not None else None)}" for i in self.body]
        return "\n".join(lines) + "\n"


def innermost_loops(function: str, instructions: list[Instruction]) -> list[Loop]:
    """Loops (backward branches) that contain no other loop."""
    spans = []
    for i, insn in enumerate(instructions):
        if insn.is_branch and insn.target is not None and insn.target <= insn.address:
            first = next((j for j, x in enumerate(instructions) if x.address >= insn.target), i)
            spans.append((first, i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [Loop(function, tuple(instructions[a : b + 1])) for a, b in sorted(set(inner))]


def popcount_loops(listing: str | dict[str, list[Instruction]]) -> list[Loop]:
    """Every innermost loop that counts bits (``cnt``): the bit-serial main loop and the window sums."""
    functions = parse_listing(listing) if isinstance(listing, str) else listing
    return [loop for name, body in functions.items() for loop in innermost_loops(name, body) if loop.popcounts]


def bitserial_hot_loop(listing: str | dict[str, list[Instruction]]) -> Loop:
    """The bit-serial main loop: the popcount loop that ANDs 128-bit vectors, with the most work per iteration."""
    loops = [
        loop
        for loop in popcount_loops(listing)
        if any(i.mnemonic == "and" and ".16b" in i.operands for i in loop.body)
    ]
    if not loops:
        raise BackendError("no NEON bit-serial loop (and + cnt on 128-bit vectors) in the listing")
    return max(loops, key=lambda loop: loop.ones_per_iteration)


# ----------------------------------------------------------------------------------------------------------------
# Cycles per iteration: llvm-mca, or a static bound.


def llvm_mca_path() -> str | None:
    """``llvm-mca`` on PATH, or the newest versioned one (Debian installs ``llvm-mca-NN`` next to it)."""
    found = shutil.which("llvm-mca")
    if found:
        return found
    for version in range(30, 13, -1):
        found = shutil.which(f"llvm-mca-{version}")
        if found:
            return found
    return None


@functools.cache
def _mca_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"LLVM version (\S+)", out)
    return match.group(1) if match else "unknown"


def mca_cycles(loop: Loop, mcpu: str, iterations: int = 100) -> tuple[float, float]:
    """(cycles per iteration, block reciprocal throughput) of ``loop`` from ``llvm-mca -mcpu=mcpu``."""
    path = llvm_mca_path()
    if path is None:
        raise BackendError("llvm-mca not found (Debian package llvm)")
    cmd = [path, "-mtriple=aarch64", f"-mcpu={mcpu}", f"-iterations={iterations}"]
    result = subprocess.run(cmd, input=loop.assembly(), capture_output=True, text=True, check=False)
    total = re.search(r"^Total Cycles:\s+(\d+)", result.stdout, re.M)
    block = re.search(r"^Block RThroughput:\s+([\d.]+)", result.stdout, re.M)
    if result.returncode != 0 or total is None or block is None:
        raise BackendError(f"{' '.join(cmd)} failed: {(result.stderr or result.stdout).strip()[:500]}")
    return int(total.group(1)) / iterations, float(block.group(1))


def _instruction_class(insn: Instruction) -> str:
    if insn.is_branch:
        return "branch"
    if insn.mnemonic.startswith(("ld", "st")):
        return "load" if insn.mnemonic.startswith("ld") else "store"
    if re.search(r"\b[vqd]\d+", insn.operands):
        return "neon"
    return "integer"


def static_cycles(loop: Loop, core: ArmCore) -> float:
    """Cycles per iteration bounded by the busiest resource: issue slots, NEON pipes or load/store pipes.

    ``ld1r`` also occupies a NEON pipe (it replicates the element). An in-order core is charged its NEON and
    memory instructions one after the other, since it cannot overlap them the way an out-of-order core does.
    """
    counts = {"branch": 0, "load": 0, "store": 0, "neon": 0, "integer": 0}
    for insn in loop.body:
        counts[_instruction_class(insn)] += 1
        if insn.mnemonic == "ld1r":
            counts["neon"] += 1
    loads = counts["load"] + sum(1 for i in loop.body if i.mnemonic.startswith("ldp") and "q" in i.operands)
    memory = (loads + counts["store"]) / core.load_pipes
    neon = counts["neon"] / core.neon_pipes
    issue = len(loop.body) / core.issue_width
    return float(neon + memory if core.in_order else max(issue, neon, memory))


# ----------------------------------------------------------------------------------------------------------------
# The reference kernel and its hot loop, per core.

#: (out channels, in channels, kernel, image): a 3x3 conv with two words per tap, as in ResNet's middle stages,
#: and one full tile of 8 pixels per row
REFERENCE_LAYER = (16, 128, 3, 8)


@dataclass(frozen=True)
class HotLoop:
    """The analysed hot loop of one core's bit-serial kernel."""

    core: str
    loop: Loop
    cycles: float  # per iteration
    method: str  # "llvm-mca <version> -mcpu=<model>" or "static bound (llvm-mca absent)"

    @property
    def ones_per_iteration(self) -> int:
        return self.loop.ones_per_iteration

    @property
    def ones_per_cycle(self) -> float:
        return self.ones_per_iteration / self.cycles


def _reference_assembly(core: ArmCore) -> str:
    """LLVM's aarch64 assembly of the reference conv built for ``core`` (same code the exported library holds)."""
    import torch
    import tvm


    out_c, in_c, k, size = REFERENCE_LAYER
    codes = torch.randint(0, 2, (out_c, in_c, k, k), generator=torch.Generator().manual_seed(0))
    layer = frozen_layer(
        FrozenConv2d, weight_int=2 * codes - 1, weight_codes=codes, weight_scale=torch.ones(out_c), bias=None,
        weight_bits=1,
        weight_encoding="bipolar", act_bits=1, input_low=torch.tensor(0.0), input_step=torch.tensor(1.0),
        stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
    )
    target = tvm.target.Target(arm_target_dict(core.name))
    func = conv2d_primfunc(layer, (1, in_c, size, size), target)
    return tvm.compile(func, target=target).mod.inspect_source("asm")


@functools.cache
def _hot_loop(name: str) -> HotLoop:
    core = arm_core(name)
    loop = bitserial_hot_loop(_reference_assembly(core))
    path = llvm_mca_path()
    if path is None:
        return HotLoop(core.name, loop, static_cycles(loop, core), "static bound (llvm-mca absent)")
    cycles, _ = mca_cycles(loop, core.mcpu_for_mca)
    return HotLoop(core.name, loop, cycles, f"llvm-mca {_mca_version(path)} -mcpu={core.mcpu_for_mca}")


def _core(core: ArmCore | str) -> ArmCore:
    return arm_core(core) if isinstance(core, str) else core


def hot_loop(core: ArmCore | str) -> HotLoop:
    """The reference kernel's hot loop on ``core`` with its modelled cycles (computed once per process)."""
    return _hot_loop(_core(core).name)


def bitserial_hot_loop_cycles(core: ArmCore | str) -> float:
    """Modelled cycles per iteration of the bit-serial hot loop on ``core``."""
    return hot_loop(core).cycles


def hot_loop_efficiency(core: ArmCore | str) -> float:
    """Ceiling cycles / modelled cycles of the hot loop: 1.0 runs at the core's bit-serial ceiling."""
    core = _core(core)
    loop = hot_loop(core)
    return loop.ones_per_iteration / core.popcount_ones_per_cycle / loop.cycles


# ----------------------------------------------------------------------------------------------------------------
# Layers.


def _us(cycles: float, core: ArmCore) -> float:
    return cycles / (core.clock_ghz * 1e3)


def popcount_ceiling_us(core: ArmCore | str, macs: int, weight_bits: int, act_bits: int) -> float:
    """The layer's one-bit MACs (``macs * wb * ab``) at the core's bit-serial ceiling, in microseconds."""
    core = _core(core)
    return _us(macs * weight_bits * act_bits / core.popcount_ones_per_cycle, core)


def int8_ceiling_us(core: ArmCore | str, macs: int) -> float:
    """The layer's MACs at the core's int8 ceiling (``smull/smlal``, or ``sdot`` with the dot product)."""
    core = _core(core)
    return _us(macs / core.int8_macs_per_cycle, core)


# Instructions outside the hot loop, counted in the generated code of the paired NEON kernel (schedule_arm.py):
#: per chunk and byte counter: widen to 16 bits (uaddlp) and accumulate into 32 bits (uadalp), plus one shift
#: (ushl) when bit-plane pairs have different weights
CHUNK_OPS_PER_COUNTER = 2
#: per call of the hot loop: pointer set-up, trip count, branch (integer instructions)
RUN_OPS = 8
#: per tile and counter: addp, the lane blend to per-channel rows (rev64, trn2), x2, + window sums, store
TILE_OPS_PER_COUNTER = 3
#: activation packing per input pixel, 64-bit word and activation bit: and, shift, or per channel on 4 lanes
PACK_OPS_PER_WORD = 48
#: pixel-pair copy per padded pixel, word and activation bit (a load and a store)
PAIR_OPS_PER_WORD = 2
#: bipolar window sums: one int32 add per input code on 4 lanes, one per output pixel and tap on 4 lanes
WINDOW_OPS_PER_CODE = 1 / 4


@dataclass(frozen=True)
class LayerEstimate:
    """Modelled single-thread cycles of one layer call by part, and the total in microseconds."""

    hot_cycles: float  # hot-loop iterations x modelled cycles per iteration
    loop_cycles: float  # entering and leaving the hot loop
    chunk_cycles: float  # clearing and widening the byte counters
    tile_cycles: float  # clearing the sums, combining and storing each tile's outputs
    pack_cycles: float  # bit-packing the activations, pixel pairs, window sums
    us: float

    @property
    def cycles(self) -> float:
        return self.hot_cycles + self.loop_cycles + self.chunk_cycles + self.tile_cycles + self.pack_cycles


def _tiles(geom: BitserialGeometry, tile_w: int) -> list[tuple[int, int]]:
    """(pixels, how many) of the register tiles along one output row: full tiles and the tail."""
    full, tail = divmod(geom.out_w, tile_w)
    return [(tile_w, full)] + ([(tail, 1)] if tail else [])


def estimate_bitserial(
    core: ArmCore | str, macs: int, weight_bits: int, act_bits: int, geom: BitserialGeometry | None = None
) -> LayerEstimate:
    """Modelled single-thread time of one bit-serial layer on ``core``, by part.

    With ``geom`` (the tile information) the kernel's real work is counted: channels padded to whole 64-bit
    words, output channels to whole tiles, a row's odd last pixel counted by its own (broadcast) loop, one chunk
    per at most 31 words, and the packing stages (``macs`` is then implied by ``geom``). Without it the
    layer is taken as perfectly divisible: ``macs * wb * ab`` one-bit MACs in hot-loop iterations and one chunk
    per 31 words, nothing else.
    """

    core = _core(core)
    loop = hot_loop(core)
    planes = weight_bits * act_bits  # bit-plane pairs
    pipes, issue = core.neon_pipes, core.issue_width
    per_counter = loop.cycles / loop.loop.popcounts  # cycles of one counter's and + cnt + add, loads included
    if geom is None:
        counter_steps = macs * planes / 128  # one counter step: 2 pixels x 2 channels x 64 bits, or 2 x 64 bits
        chunks = counter_steps / MAX_CHUNK
        return _estimate(core, counter_steps * per_counter, 0.0, chunks * CHUNK_OPS_PER_COUNTER / pipes, 0.0, 0.0)
    tiling = NeonIsa().tiling(geom)
    tile_w = max(1, min(tiling.tile_w, geom.out_w))
    oc_tile = NeonIsa.oc_per_vector * tiling.vec_blocks
    rows_oc = geom.batch * geom.out_h * geom.oc_blocks * (OC_BLOCK // oc_tile)  # (row, channel tile) tasks
    taps = geom.kernel_h * geom.kernel_w
    steps = planes * taps * geom.padded_words  # hot-loop iterations per tile
    if tiling.paired:
        runs = paired_runs(geom)
        calls = planes * geom.kernel_h * runs.runs_per_row * runs.pieces
        chunks = calls // runs.runs_per_chunk
    else:
        dims, split = geom.reduction_dims()
        chunks = planes
        for d in dims[:split]:
            chunks *= d
        calls = chunks
    hot = loop_c = chunk_c = tile_c = 0.0
    for pixels, count in _tiles(geom, tile_w):
        n = rows_oc * count
        if tiling.paired:  # pixel pairs, and an odd last pixel broadcast (one more ld1r on a NEON pipe)
            counters = pixels * tiling.vec_blocks
            hot += n * steps * (counters * per_counter + (pixels % 2) / pipes)
            loop_c += n * calls * RUN_OPS / issue
        else:
            counters = pixels * tiling.vec_blocks
            hot += n * steps * counters * per_counter
            loop_c += n * calls * RUN_OPS / issue
        chunk_c += n * chunks * counters * (CHUNK_OPS_PER_COUNTER + int(planes > 1)) / pipes
        tile_c += n * counters * TILE_OPS_PER_COUNTER / pipes
    pixels_in = geom.batch * geom.in_h * geom.in_w
    padded = geom.batch * geom.padded_h * geom.padded_w
    pack = pixels_in * geom.words * act_bits * PACK_OPS_PER_WORD
    pack += padded * geom.padded_words * act_bits * PAIR_OPS_PER_WORD * int(tiling.paired)
    if geom.bipolar:
        pixels_out = geom.batch * geom.out_h * geom.out_w
        pack += (pixels_in * geom.in_channels + pixels_out * taps) * WINDOW_OPS_PER_CODE
    return _estimate(core, hot, loop_c, chunk_c, tile_c, pack / pipes)


def _estimate(core: ArmCore, hot: float, loop: float, chunk: float, tile: float, pack: float) -> LayerEstimate:
    return LayerEstimate(hot, loop, chunk, tile, pack, _us(hot + loop + chunk + tile + pack, core))


def estimate_bitserial_us(
    core: ArmCore | str, macs: int, weight_bits: int, act_bits: int, geom: BitserialGeometry | None = None
) -> float:
    """Modelled single-thread microseconds of one bit-serial layer on ``core`` (see :func:`estimate_bitserial`)."""
    return estimate_bitserial(core, macs, weight_bits, act_bits, geom).us


def layer_efficiency(core: ArmCore | str, geom: BitserialGeometry) -> float:
    """Ceiling time / modelled time of a whole bit-serial layer (packing and all overheads included)."""
    macs = geom.bit_ops // (geom.weight_bits * geom.act_bits)
    ceiling = popcount_ceiling_us(core, macs, geom.weight_bits, geom.act_bits)
    return ceiling / estimate_bitserial_us(core, macs, geom.weight_bits, geom.act_bits, geom)
