"""AArch64 NEON instruction choice: ``cnt`` on 16 bytes, byte counters, pairwise widening adds.

One 128-bit step for two products is ``and, cnt, add``. Every layer counts *pixel pairs* (:mod:`.microkernel`):
one ``ldr q`` fetches two pixels' words, and ANDing them with two channels' weight words as stored and as
swapped (a copy prepared once per call) covers the 2 x 2 products without ``ld1r`` broadcasts, which occupy a
vector pipe on the A53, A72, A76 and N1 alike; only a row's odd last pixel is broadcast. The hot loop is then
``and, cnt, add`` per 128 one-bit MACs plus loads, which the load pipes absorb. It is emitted as LLVM IR
(:func:`count_loops_ir`) so that LLVM cannot unroll it into spills.

Byte counts stay below 256 for a chunk of 31 words. After a chunk one ``uaddlp`` (8 -> 16 bit), a shift by the
bit-plane weight and one ``uadalp`` (16 -> 32 bit accumulate) fold the counter into 32-bit partial sums; at the
end of the tile ``addp`` and one lane blend per channel turn diagonal and anti-diagonal sums into output rows.

The tile (8 pixels x 4 channels: 16 counters, 4 weight vectors, 4 activation pairs) leaves room in the 32 q
registers; the generated code of every named core (``arm_cores.py``) has no stack loads or stores in any loop
that counts bits (``tests/backends/tvm/test_arm_cores.py``), and tiles were compared by ``llvm-mca`` cycles per
one-bit MAC (``arm_estimate.py``), not timed on hardware. Results are checked bit-exact under qemu-aarch64.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx

from .geometry import BitserialGeometry
from .microkernel import Tiling, WeightLoader, flat_weights
from .stages import ramp

__all__ = ["NeonIsa", "count_loop_name", "count_loops_ir"]

_UADDLP = (
    ("uint16x8", "llvm.aarch64.neon.uaddlp.v8i16.v16i8"),
    ("uint32x4", "llvm.aarch64.neon.uaddlp.v4i32.v8i16"),
    ("uint64x2", "llvm.aarch64.neon.uaddlp.v2i64.v4i32"),
)
_ADDP = "llvm.aarch64.neon.addp.v4i32"
#: a 16-bit lane holds at most 2 * 31 * 8 = 496 counts per chunk; shifted by up to 6 it still fits 16 bits
_MAX_SHIFT_16 = 6


def count_loop_name(pixels: int, vec_blocks: int) -> str:
    """The hot loop for ``pixels`` pixels (pairs, and one broadcast pixel when odd) x ``vec_blocks`` channel pairs."""
    return f"fxquant_neon_{pixels}px_x{vec_blocks}"


def count_loops_ir(shapes: Sequence[tuple[int, int]]) -> str:
    """An LLVM IR module with the hot loop of every ``(pixels, vec_blocks)`` in ``shapes`` (see :func:`_count_loop`)."""
    ir: list[str] = []
    metadata: list[str] = ['!0 = !{!"llvm.loop.unroll.disable"}']
    for i, (pixels, vec_blocks) in enumerate(sorted(set(shapes))):
        ir += _count_loop(pixels, vec_blocks, i + 1)
        metadata.append(f"!{i + 1} = distinct !{{!{i + 1}, !0}}")
    return "\n".join([*ir, "declare <16 x i8> @llvm.ctpop.v16i8(<16 x i8>)", *metadata]) + "\n"


def _count_loop(pixels: int, vec_blocks: int, loop_id: int) -> list[str]:
    """The LLVM IR function of one hot loop: ``pixels`` pixels x ``vec_blocks`` channel pairs.

    ``void f(ptr counts, ptr act, i64 pair_stride, ptr w, i32 n, i1 fresh)`` adds, for ``n >= 1`` consecutive
    words, ``popcount(a & w)`` into 16-byte counters at ``counts`` (with ``fresh`` they start from zero and are not
    read). Pair ``P`` of pixels ``2P, 2P + 1``: counter ``(P * vec_blocks + v) * 2 + k`` counts ``a[P]``, 16 bytes
    at ``act + P * pair_stride`` (two pixels' words), against ``w[v][k]``, 16 bytes at ``w + 64 * k + 16 * v``
    (two channels' words, as stored and swapped). An odd last pixel: counter ``pairs * vec_blocks * 2 + v``
    counts its word (at ``act + pairs * pair_stride``) broadcast to both lanes (``ld1r``) against ``w[v][0]``.
    Per word ``act`` advances 16 bytes and ``w`` 128 (one row of :func:`.microkernel.prepare_paired_weights`). The
    counters stay in registers for the whole run (``and``, ``cnt``, ``add`` each); a fresh run counts its first
    word outside the loop, which saves clearing the counters and adding to zero. The loop carries
    ``llvm.loop.unroll.disable``.
    """
    name = count_loop_name(pixels, vec_blocks)
    vec = "<16 x i8>"
    pairs, odd = divmod(pixels, 2)
    counters = [(p, v, k) for p in range(pairs) for v in range(vec_blocks) for k in (0, 1)]
    counters += [(pairs, v, 0) for v in range(vec_blocks) if odd]
    operands = [(f"w{v}_{k}", str(64 * k + 16 * v)) for v in range(vec_blocks) for k in ((0, 1) if pairs else (0,))]

    def step(tag: str, act: str, w: str, previous: list[str] | None) -> list[str]:
        """One word: load the operands, and each counter += popcount (or = popcount when ``previous`` is None)."""
        out = []
        for p in range(pairs + odd):
            out.append(f"  %a{p}p.{tag} = getelementptr inbounds i8, ptr {act}, i64 {f'%aoff{p}' if p else 0}")
            if p == pairs:  # the odd pixel: one word in both lanes
                out += [f"  %a{p}x.{tag} = load i64, ptr %a{p}p.{tag}, align 8",
                        f"  %a{p}i.{tag} = insertelement <2 x i64> poison, i64 %a{p}x.{tag}, i32 0",
                        f"  %a{p}s.{tag} = shufflevector <2 x i64> %a{p}i.{tag}, <2 x i64> poison, "
                        "<2 x i32> zeroinitializer",
                        f"  %a{p}.{tag} = bitcast <2 x i64> %a{p}s.{tag} to {vec}"]
            else:
                out.append(f"  %a{p}.{tag} = load {vec}, ptr %a{p}p.{tag}, align 8")
        for op, offset in operands:
            out += [f"  %{op}p.{tag} = getelementptr inbounds i8, ptr {w}, i64 {offset}",
                    f"  %{op}.{tag} = load {vec}, ptr %{op}p.{tag}, align 8"]
        for c, (p, v, k) in enumerate(counters):
            out += [f"  %t{c}.{tag} = and {vec} %a{p}.{tag}, %w{v}_{k}.{tag}"]
            count = f"%c{c}.{tag}" if previous is None else f"%n{c}.{tag}"
            out += [f"  {count} = call {vec} @llvm.ctpop.v16i8({vec} %t{c}.{tag})"]
            if previous is not None:
                out += [f"  %c{c}.{tag} = add {vec} {previous[c]}, {count}"]
        return out

    ir = [f"define void @{name}(ptr %counts, ptr %act, i64 %pair_stride, ptr %w, i32 %n, i1 %fresh) {{", "entry:",
          # an empty asm hides the trip count: a run of one or two words stays a loop instead of being flattened
          # into the loops around it, whose live 32-bit sums would then spill the counters
          '  %trip = call i32 asm "", "=r,0"(i32 %n)']
    ir += [f"  %aoff{p} = mul i64 %pair_stride, {p}" for p in range(1, pairs + odd)]
    ir += [f"  %cp{c} = getelementptr inbounds i8, ptr %counts, i64 {16 * c}" for c in range(len(counters))]
    ir += ["  br i1 %fresh, label %first, label %resume", "resume:"]
    ir += [f"  %c{c}.in = load {vec}, ptr %cp{c}, align 1" for c in range(len(counters))]
    ir += ["  br label %loop", "first:"]
    ir += step("first", "%act", "%w", None)
    ir += ["  %ap.first = getelementptr inbounds i8, ptr %act, i64 16",
           "  %wp.first = getelementptr inbounds i8, ptr %w, i64 128",
           "  %only = icmp eq i32 %n, 1",
           "  br i1 %only, label %exit, label %loop",
           "loop:",
           "  %i = phi i32 [ 0, %resume ], [ 1, %first ], [ %i.next, %loop ]",
           "  %ap = phi ptr [ %act, %resume ], [ %ap.first, %first ], [ %ap.next, %loop ]",
           "  %wp = phi ptr [ %w, %resume ], [ %wp.first, %first ], [ %wp.next, %loop ]"]
    ir += [f"  %c{c}.prev = phi {vec} [ %c{c}.in, %resume ], [ %c{c}.first, %first ], [ %c{c}.loop, %loop ]"
           for c in range(len(counters))]
    ir += step("loop", "%ap", "%wp", [f"%c{c}.prev" for c in range(len(counters))])
    ir += ["  %ap.next = getelementptr inbounds i8, ptr %ap, i64 16",
           "  %wp.next = getelementptr inbounds i8, ptr %wp, i64 128",
           "  %i.next = add nuw nsw i32 %i, 1",
           "  %done = icmp eq i32 %i.next, %trip",
           f"  br i1 %done, label %exit, label %loop, !llvm.loop !{loop_id}",
           "exit:"]
    ir += [f"  %c{c}.out = phi {vec} [ %c{c}.first, %first ], [ %c{c}.loop, %loop ]" for c in range(len(counters))]
    ir += [f"  store {vec} %c{c}.out, ptr %cp{c}, align 1" for c in range(len(counters))]
    return [*ir, "  ret void", "}"]


class NeonIsa:
    """NEON: two output channels (uint64 words) per 128-bit register, byte counters."""

    name = "aarch64-neon"
    halves = 1
    oc_per_vector = 2
    counter_dtype = "uint8x16"
    chunked = True
    paired = True

    def prepare_weights(self, geom: BitserialGeometry, wpk: tirx.Buffer) -> WeightLoader:
        flat = flat_weights(geom, wpk)
        return lambda row, half, lane0: tirx.reinterpret("uint8x16", flat[row, ramp(lane0, 2)])

    def broadcast(self, word: tirx.Expr) -> tirx.Expr:
        return tirx.reinterpret("uint8x16", tirx.Broadcast(word, 2))

    def count_loop_name(self, pixels: int, vec_blocks: int) -> str:
        return count_loop_name(pixels, vec_blocks)

    def count_loops_ir(self, shapes: Sequence[tuple[int, int]]) -> str:
        return count_loops_ir(shapes)

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        return tirx.popcount(a[0] & w[0])

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        value = counter
        for dtype, name in _UADDLP:
            value = tirx.call_llvm_pure_intrin(dtype, name, value)
        return tirx.reinterpret("int64x2", value)

    def accumulate(self, acc: tirx.Expr, counter: tirx.Expr, shift: tirx.Expr, max_shift: int) -> tirx.Expr:
        dtype, name = _UADDLP[0]
        halfwords = tirx.call_llvm_pure_intrin(dtype, name, counter)
        if max_shift == 0:
            return acc + tirx.call_llvm_pure_intrin(*_UADDLP[1], halfwords)
        if max_shift <= _MAX_SHIFT_16:
            shifted = halfwords << tirx.Broadcast(tirx.Cast("uint16", shift), 8)
            return acc + tirx.call_llvm_pure_intrin(*_UADDLP[1], shifted)
        words = tirx.call_llvm_pure_intrin(*_UADDLP[1], halfwords)
        return acc + (words << tirx.Broadcast(tirx.Cast("uint32", shift), 4))

    def combine(self, first: tirx.Expr, second: tirx.Expr) -> tirx.Expr:
        return tirx.call_llvm_pure_intrin("uint32x4", _ADDP, first, second)

    def tiling(self, geom: BitserialGeometry) -> Tiling:
        """8 pixels (4 pairs) x 4 channels: 16 byte counters, 4 weight vectors (2 as stored, 2 swapped) and 4
        activation pairs; every layer, dense ones as one pixel with a phantom partner."""
        return Tiling(tile_w=8, vec_blocks=2, paired=True)
