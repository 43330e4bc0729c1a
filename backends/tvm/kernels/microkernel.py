"""The register-tiled bit-serial loop nest every target shares; the instructions come from a :class:`PopcountIsa`.

One PrimFunc holds the whole layer:

1. per-call weight preparation, if the ISA wants one (``prepare_weights``),
2. activation bit-packing into zero-padded planes (:func:`.stages.emit_activation_pack`),
3. bipolar window sums (:func:`.stages.emit_window_sums`),
4. the main loop, parallel over (batch, output-channel tile, output row). Each task walks its row in tiles of
   ``tile_w`` pixels x ``oc_tile`` output channels whose counters stay in vector registers::

       for each (activation bit i, weight bit j):
           for each chunk of at most 31 reduction words (kh, kw, channel word):
               counters = 0
               for each word: counters[p, v] += popcount(a_i[p] & w_j[v])       # 8-bit lanes
               acc[p, v] += widen(counters[p, v]) << (i + j)
       out[o, pixel] = acc                     unsigned weights
       out[o, pixel] = 2 * acc + wsum[pixel]   bipolar weights (2c - n); wsum = -n * window sum of codes

Two ways to fill a vector of counters:

* **broadcast** (the x86 and portable ISAs): one activation word in every lane against ``oc_per_vector`` output
  channels' words, in a TIR loop nest;
* **paired** (ISAs with ``paired = True``, i.e. NEON; every layer): two pixels' words (``s`` columns apart for
  stride ``s``), loaded as one vector, against two channels' words as stored (the *diagonal*: pixel 0 x channel
  0, pixel 1 x channel 1) and with the two words swapped (the *anti-diagonal*). Two ANDs give the same four
  products as two broadcasts, but a broadcast costs a vector instruction on NEON (``ld1r`` occupies a vector
  pipe) and loads do not. An odd last pixel is broadcast. Operands are reordered once per call so that a kernel
  row's words are consecutive in both, and the loop over them is the ISA's LLVM IR with unrolling disabled
  (:func:`_paired_micro_kernel` says why). The ISA widens into 32-bit partial sums (``accumulate``) and turns
  diagonal and anti-diagonal sums into per-channel rows of pixels once per tile (``combine``).

The counters and 32/64-bit sums of a tile are small stack arrays (``scope="global"`` under 1 KiB, which TVM keeps
as an ``alloca`` that LLVM promotes to registers); ``scope="local"`` would cost a ``TVMBackendAllocWorkspace``
call per tile. Everything that can be negative is signed (window sums, output); unsigned lanes only add
non-negative counts that cannot wrap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .geometry import BitserialGeometry
from .layout import MAX_CHUNK, OC_BLOCK
from .stages import emit_activation_pack, emit_pixel_pairs, emit_window_sums, out_index, ramp, vconst

__all__ = [
    "PopcountIsa",
    "PairedIsa",
    "Tiling",
    "WeightLoader",
    "build_bitserial",
    "weight_rows",
    "flat_weights",
    "STACK_BYTES",
    "PairedRuns",
    "paired_runs",
    "prepare_paired_weights",
]

WeightLoader = Callable[[tirx.Expr, int, tirx.Expr], tirx.Expr]
"""``load(row, half, lane0)``: ``oc_per_vector`` weight words of one row (see :func:`weight_rows`) from lane0."""

#: TVM keeps CPU allocations of scope "global" below this many bytes on the stack (``runtime::kMaxStackAlloca``)
STACK_BYTES = 1024
#: runs of at least this many words count their first word outside the hot loop (no clearing, no add to zero)
FRESH_WORDS = 4


class PopcountIsa(Protocol):
    """What a target contributes: how to count the bits of ``a & w`` per vector and widen the counts."""

    name: str
    halves: int  # 2: activation and weight words are stored as low and high nibbles
    oc_per_vector: int  # uint64 weight words (output channels) per vector register
    counter_dtype: str  # per-step count vector, e.g. "uint8x32"
    chunked: bool  # counts live in 8-bit lanes and must be widened every <= 31 words

    def prepare_weights(self, geom: BitserialGeometry, wpk: tirx.Buffer) -> WeightLoader:
        """Emit any per-call weight preparation; return the weight loader."""
        ...

    def broadcast(self, word: tirx.Expr) -> tirx.Expr:
        """One activation word in every lane, typed like the weight vectors."""
        ...

    def count(self, a: Sequence[tirx.Expr], w: Sequence[tirx.Expr]) -> tirx.Expr:
        """Per-step counts (``counter_dtype``) of ``a & w``, summed over the halves."""
        ...

    def widen(self, counter: tirx.Expr) -> tirx.Expr:
        """Counts -> ``int64 x oc_per_vector`` per-output-channel totals."""
        ...

    def tiling(self, geom: BitserialGeometry) -> Tiling:
        """The register tile for this layer."""
        ...


class PairedIsa(PopcountIsa, Protocol):
    """An ISA with two words per vector that counts pixel pairs against channel pairs (``paired = True``)."""

    paired: bool

    def count_loop_name(self, pixels: int, vec_blocks: int) -> str:
        """The function :meth:`count_loops_ir` defines for ``pixels`` (even: pairs; or 1) x ``vec_blocks``."""
        ...

    def count_loops_ir(self, shapes: Sequence[tuple[int, int]]) -> str:
        """LLVM IR of the hot loops over one run of words for these tiles, see :func:`_paired_micro_kernel`."""
        ...

    def accumulate(self, acc: tirx.Expr, counter: tirx.Expr, shift: tirx.Expr, max_shift: int) -> tirx.Expr:
        """``acc`` (``uint32x4``: two partial sums per half) plus the widened counter shifted left by ``shift``."""
        ...

    def combine(self, first: tirx.Expr, second: tirx.Expr) -> tirx.Expr:
        """Pairwise sums of two ``uint32x4`` partial-sum vectors: ``[f0+f1, f2+f3, s0+s1, s2+s3]``."""
        ...


@dataclass(frozen=True)
class Tiling:
    """Register tile: ``tile_w`` output pixels of one row x ``vec_blocks`` vectors of output channels.

    ``paired``: count pixel pairs against channel pairs (stride-1 convolutions on a :class:`PairedIsa`).
    """

    tile_w: int
    vec_blocks: int
    paired: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return {"tile_w": self.tile_w, "vec_blocks": self.vec_blocks, "paired": self.paired}


def weight_rows(geom: BitserialGeometry) -> int:
    """Rows of ``OC_BLOCK`` words in the packed weights: (block, kh, kw, weight bit, word) flattened."""
    taps = 1 if geom.dense else geom.kernel_h * geom.kernel_w
    return geom.oc_blocks * taps * geom.weight_bits * geom.padded_words


def flat_weights(geom: BitserialGeometry, wpk: tirx.Buffer) -> tirx.Buffer:
    """A ``(rows, OC_BLOCK)`` view of the packed weight parameter."""
    return T.decl_buffer((weight_rows(geom), OC_BLOCK), "uint64", data=wpk.data)


def _row(
    geom: BitserialGeometry, ob: tirx.Expr, kh: tirx.Expr, kw: tirx.Expr, wb: tirx.Expr, cw: tirx.Expr
) -> tirx.Expr:
    kh_n, kw_n = (1, 1) if geom.dense else (geom.kernel_h, geom.kernel_w)
    return (((ob * kh_n + kh) * kw_n + kw) * geom.weight_bits + wb) * geom.padded_words + cw


def _nest(dims: Sequence[int], body: Callable[..., None], bound: tuple = ()) -> None:
    """Serial loops over ``dims``; ``body`` gets the loop variables (after ``bound``)."""
    if not dims:
        body(*bound)
        return
    with T.serial(0, dims[0]) as v:
        _nest(dims[1:], body, (*bound, v))


_TileBuffers = tuple[tirx.Buffer, tirx.Buffer]


def _tile_buffers(isa: PopcountIsa, tiling: Tiling, tile_w: int) -> _TileBuffers:
    """(sums, byte counters) of one register tile, allocated once per task for its widest tile.

    Under :data:`STACK_BYTES` they are ``scope="global"``, which TVM keeps as an ``alloca`` (LLVM promotes it to
    registers); ``scope="local"`` would be a ``TVMBackendAllocWorkspace`` call per tile.
    """
    lane_type, lanes = isa.counter_dtype.split("x")
    if tiling.paired:
        counters = -(-tile_w // 2) * tiling.vec_blocks * 2
        sums = (counters * 4, "uint32")
    else:
        counters = tile_w * tiling.vec_blocks
        sums = (tile_w * isa.oc_per_vector * tiling.vec_blocks, "int64")
    out = []
    for elements, dtype in (sums, (counters * int(lanes), lane_type)):
        nbytes = elements * int("".join(ch for ch in dtype if ch.isdigit())) // 8
        out.append(T.alloc_buffer((elements,), dtype, scope="global" if nbytes < STACK_BYTES else "local"))
    return out[0], out[1]


def _clear(buf: tirx.Buffer, vectors: int, lanes: int) -> None:
    """Zero ``vectors`` register-sized pieces one by one: LLVM then keeps each piece in its own register, where
    one long store (say 192 bytes) can make it split the array into scalars."""
    for i in range(vectors):
        T.buffer_store(buf, vconst(0, buf.dtype, lanes), [ramp(i * lanes, lanes)])


@dataclass(frozen=True)
class _Task:
    """Everything one register tile needs besides its position."""

    geom: BitserialGeometry
    isa: PopcountIsa
    load_w: WeightLoader | None  # broadcast kernel: the ISA's weight loader
    apk: tirx.Buffer
    out: tirx.Buffer
    wsum: tirx.Buffer | None
    vec_blocks: int
    paired_weights: tirx.Buffer | None = None  # paired kernel: see prepare_paired_weights
    pairs: tirx.Buffer | None = None  # paired kernel: see stages.emit_pixel_pairs


def _reduction(task: _Task) -> tuple[tuple[int, int, int, int], int]:
    if task.isa.chunked:
        return task.geom.reduction_dims()
    geom = task.geom
    return (geom.kernel_h, geom.kernel_w, 1, geom.padded_words), 0


def _store_outputs(task: _Task, n: tirx.Expr, o: tirx.Expr, oh: tirx.Expr, ow0: tirx.Expr, tile_w: int,
                   value: tirx.Expr) -> None:
    """``out[n, o, oh, ow0 : ow0 + tile_w] = value`` (int32), adding the window sums for bipolar weights."""
    geom = task.geom
    if task.wsum is not None:
        value = value * vconst(2, "int32", tile_w) + task.wsum[n, oh, ramp(ow0, tile_w)]
    store = out_index(geom, n, o, oh, ramp(ow0, tile_w))
    if geom.out_channels % OC_BLOCK:
        with T.If(o < geom.out_channels):
            with T.Then():
                T.buffer_store(task.out, value, store)
    else:
        T.buffer_store(task.out, value, store)


def _micro_kernel(
    task: _Task, bufs: _TileBuffers, n: tirx.Expr, ob: tirx.Expr, lane0: tirx.Expr, oh: tirx.Expr, ow0: tirx.Expr,
    tile_w: int,
) -> None:
    """Broadcast tile: each pixel's word in every lane against ``vec_blocks`` vectors of channels."""
    geom, isa, vec_blocks, load_w = task.geom, task.isa, task.vec_blocks, task.load_w
    assert load_w is not None
    opv = isa.oc_per_vector
    oc_tile = opv * vec_blocks
    sh, sw = geom.stride
    dh, dw = geom.dilation
    dims, split = _reduction(task)
    lane_type, lanes = isa.counter_dtype.split("x")
    clanes = int(lanes)
    n_counters = tile_w * vec_blocks

    acc, counts = bufs
    _clear(acc, tile_w * vec_blocks, opv)

    def chunk(ab: tirx.Expr, wb: tirx.Expr, *outer: tirx.Expr) -> None:
        _clear(counts, n_counters, clanes)

        def step(*inner: tirx.Expr) -> None:
            kh, kw, cwo, cwi = (*outer, *inner)
            cw = cwo * dims[3] + cwi
            row = _row(geom, ob, kh, kw, wb, cw)
            w = [[load_w(row, h, lane0 + v * opv) for h in range(isa.halves)] for v in range(vec_blocks)]
            ih = oh * sh + kh * dh
            for p in range(tile_w):
                iw = (ow0 + p) * sw + kw * dw
                a = [T.Bind(isa.broadcast(task.apk[n, ab, ih, cw, h, iw])) for h in range(isa.halves)]
                for v in range(vec_blocks):
                    at = ramp((p * vec_blocks + v) * clanes, clanes)
                    T.buffer_store(counts, counts[at] + isa.count(a, w[v]), [at])

        _nest(dims[split:], step)
        shift = tirx.Broadcast(tirx.Cast("int64", ab + wb), opv)
        for p in range(tile_w):
            for v in range(vec_blocks):
                wide = isa.widen(counts[ramp((p * vec_blocks + v) * clanes, clanes)]) << shift
                at = ramp(p * oc_tile + v * opv, opv)
                T.buffer_store(acc, acc[at] + wide, [at])

    _nest((geom.act_bits, geom.weight_bits, *dims[:split]), chunk)

    out_type = f"int32x{tile_w}" if tile_w > 1 else "int32"
    for j in range(oc_tile):
        value = tirx.Cast(out_type, acc[tirx.Ramp(j, oc_tile, tile_w) if tile_w > 1 else j])
        _store_outputs(task, n, ob * OC_BLOCK + lane0 + j, oh, ow0, tile_w, value)


@dataclass(frozen=True)
class PairedRuns:
    """How the paired kernel walks a reduction: runs of consecutive words, grouped into chunks.

    A run is one kernel row's words (``kernel_w * padded_words``; consecutive in both operands when the kernel
    is not dilated, see :func:`.stages.emit_pixel_pairs` and :func:`prepare_paired_weights`) or, dilated, one
    tap's words. A chunk is ``runs_per_chunk`` whole runs when they fit ``MAX_CHUNK`` words, otherwise an equal
    part (``words``) of one run.
    """

    run_words: int  # words of one run
    runs_per_row: int  # runs of one kernel row: 1, or kernel_w when dilated
    runs_per_chunk: int
    words: int  # words per hot-loop call

    @property
    def pieces(self) -> int:
        """Hot-loop calls per run."""
        return self.run_words // self.words


def paired_runs(geom: BitserialGeometry) -> PairedRuns:
    """The runs and chunks of ``geom``'s reduction: at most ``MAX_CHUNK`` words per chunk, every chunk alike."""
    dilated = geom.dilation[1] != 1
    run_words = geom.padded_words if dilated else geom.kernel_w * geom.padded_words
    runs_per_row = geom.kernel_w if dilated else 1
    runs = geom.kernel_h * runs_per_row
    if run_words <= MAX_CHUNK:
        per = max(r for r in range(1, runs + 1) if runs % r == 0 and r * run_words <= MAX_CHUNK)
        return PairedRuns(run_words, runs_per_row, per, run_words)
    return PairedRuns(run_words, runs_per_row, 1, max(d for d in range(1, MAX_CHUNK + 1) if run_words % d == 0))


def prepare_paired_weights(geom: BitserialGeometry, wpk: tirx.Buffer) -> tirx.Buffer:
    """Weights reordered for the paired kernel: rows ``(block, weight bit, kh, kw, word)``, each the block's
    ``OC_BLOCK`` words followed by the same words with every pair swapped (``2 * OC_BLOCK`` words).

    With the weight bit outside the taps, the words of one kernel row are consecutive, as are the activations.
    """
    kh_n, kw_n, wb_n, pw = geom.kernel_h, geom.kernel_w, geom.weight_bits, geom.padded_words
    flat = flat_weights(geom, wpk)
    rows = weight_rows(geom)
    out = T.alloc_buffer((rows, 2 * OC_BLOCK), "uint64")
    with T.parallel(0, rows) as r:
        cw = r % pw
        kw = (r // pw) % kw_n
        kh = (r // (pw * kw_n)) % kh_n
        wb = (r // (pw * kw_n * kh_n)) % wb_n
        ob = r // (pw * kw_n * kh_n * wb_n)
        words = flat[_row(geom, ob, kh, kw, wb, cw), ramp(0, OC_BLOCK)]
        T.buffer_store(out, words, [r, ramp(0, OC_BLOCK)])
        swapped = tirx.Shuffle([words], [j ^ 1 for j in range(OC_BLOCK)])
        T.buffer_store(out, swapped, [r, ramp(OC_BLOCK, OC_BLOCK)])
    return out


def _paired_micro_kernel(
    task: _Task, bufs: _TileBuffers, n: tirx.Expr, ob: tirx.Expr, lane0: tirx.Expr, oh: tirx.Expr, ow0: tirx.Expr,
    tile_w: int,
) -> None:
    """Paired tile: pixel pairs x channel pairs, a diagonal and an anti-diagonal counter each, and an odd last pixel
    broadcast against the channel pairs.

    Pair ``P`` (pixels ``2P, 2P + 1``): counter ``((P * vec_blocks + v) * 2 + k)`` against channels ``2v, 2v + 1``
    of the tile, as stored (``k = 0``) or swapped (``k = 1``). The odd pixel: counter ``pairs * vec_blocks * 2 + v``.

    The hot loop walks one run of consecutive words (a kernel row, or a chunk of one) with both operands at a
    fixed stride. It is the ISA's LLVM IR (``count_loops_ir``), inlined, with unrolling disabled: LLVM would
    otherwise unroll short reduction loops by 2-4 (in-order cores always), hoist the next steps' loads and spill
    counters, which is exactly what this kernel must not do.
    """
    geom, isa, vec_blocks = task.geom, task.isa, task.vec_blocks
    wpairs, apairs = task.paired_weights, task.pairs
    assert wpairs is not None and apairs is not None
    sh, sw = geom.stride
    dh, dw = geom.dilation
    pw = geom.padded_words
    runs = paired_runs(geom)
    lane_type, lanes = isa.counter_dtype.split("x")
    clanes = int(lanes)
    pairs, odd = divmod(tile_w, 2)
    n_counters = (2 * pairs + odd) * vec_blocks
    max_shift = geom.act_bits + geom.weight_bits - 2
    loop_name = isa.count_loop_name(tile_w, vec_blocks)  # type: ignore[attr-defined]
    row_words = int(apairs.shape[3])
    pair_stride = 2 * sw * pw * 2 * 8  # bytes from one pixel pair's words to the next pair's

    acc, counts = bufs
    _clear(acc, n_counters, 4)

    def chunk(ab: tirx.Expr, wb: tirx.Expr, group: tirx.Expr, piece: tirx.Expr) -> None:
        def run(i: tirx.Expr | int, fresh: bool) -> None:
            j = group * runs.runs_per_chunk + i  # run index: (kh, kw when dilated)
            kh = j // runs.runs_per_row if runs.runs_per_row > 1 else j
            kw = j % runs.runs_per_row if runs.runs_per_row > 1 else 0
            m0 = kw * pw + piece * runs.words  # first word of the call within the kernel row's kw * pw + cw
            wrow = ((ob * geom.weight_bits + wb) * geom.kernel_h + kh) * geom.kernel_w * pw + m0
            arow = ((n * geom.act_bits + ab) * int(apairs.shape[2]) + oh * sh + kh * dh) * row_words
            column = ow0 * sw + kw * (dw - 1)  # + m0 // pw: the kernel column is in m0 (kw * pw)
            act = apairs.access_ptr("r", offset=(arow + column * pw + m0) * 2)
            weights = wpairs.access_ptr("r", offset=wrow * 2 * OC_BLOCK + lane0)
            stride = tirx.const(pair_stride, "int64")
            T.evaluate(T.call_extern("void", loop_name, counts.access_ptr("rw"), act, stride, weights,
                                     tirx.const(runs.words, "int32"), tirx.const(fresh, "bool")))

        if runs.words >= FRESH_WORDS:
            run(0, True)  # the chunk's first run starts the byte counters from zero
        else:  # short runs: the hot loop itself must count every word
            _clear(counts, n_counters, clanes)
            run(0, False)
        if runs.runs_per_chunk > 1:
            with T.serial(1, runs.runs_per_chunk) as i:
                run(i, False)
        shift = ab + wb
        for c in range(n_counters):
            at = ramp(c * 4, 4)
            value = isa.accumulate(acc[at], counts[ramp(c * clanes, clanes)], shift, max_shift)
            T.buffer_store(acc, value, [at])

    groups = geom.kernel_h * runs.runs_per_row // runs.runs_per_chunk
    _nest((geom.act_bits, geom.weight_bits, groups, runs.pieces), chunk)

    def sums(c: int) -> tirx.Expr:
        return acc[ramp(c * 4, 4)]

    single = []  # the odd pixel: per counter pair, [c0, c1, c2, c3] of channels 2v .. 2v + 3
    for v in range(0, vec_blocks if odd else 0, 2):
        base = pairs * vec_blocks * 2
        single.append(T.Bind(isa.combine(sums(base + v), sums(base + min(v + 1, vec_blocks - 1)))))
    for v in range(vec_blocks):
        rows_of: tuple[list[tirx.Expr], list[tirx.Expr]] = ([], [])  # channels 2v, 2v + 1: vectors of pixels
        for pair in range(0, pairs, 2):
            first, second = (pair * vec_blocks + v) * 2, ((pair + 1) * vec_blocks + v) * 2
            if pair + 1 < pairs:  # two pairs: [(p0,c0) (p1,c1) (p2,c0) (p3,c1)] and [(p0,c1) (p1,c0) (p2,c1) (p3,c0)]
                diagonal = T.Bind(isa.combine(sums(first), sums(second)))
                anti = T.Bind(isa.combine(sums(first + 1), sums(second + 1)))
                rows_of[0].append(tirx.Shuffle([diagonal, anti], [0, 5, 2, 7]))
                rows_of[1].append(tirx.Shuffle([anti, diagonal], [0, 5, 2, 7]))
            else:  # a last single pair: [(p0,c0) (p1,c1) (p0,c1) (p1,c0)]
                both = T.Bind(isa.combine(sums(first), sums(first + 1)))
                rows_of[0].append(tirx.Shuffle([both], [0, 3]))
                rows_of[1].append(tirx.Shuffle([both], [2, 1]))
        for k, parts in enumerate(rows_of):
            picks = list(range(2 * pairs))
            if odd:
                parts = [*parts, single[v // 2]]
                picks.append(2 * pairs + 2 * (v % 2) + k)  # channel 2v + k is lane 2 (v % 2) + k of its vector
            if len(parts) == 1 and len(picks) == 2 * pairs and pairs in (1, 2):
                value = parts[0]
            else:
                value = tirx.Shuffle(parts, picks)
            out_type = f"int32x{tile_w}" if tile_w > 1 else "int32"
            o = ob * OC_BLOCK + lane0 + 2 * v + k
            _store_outputs(task, n, o, oh, ow0, tile_w, tirx.Cast(out_type, value))


def _paired_loops_ir(isa: PopcountIsa, geom: BitserialGeometry, tiling: Tiling) -> str:
    """The LLVM IR of every hot loop the layer's tiles call (full tiles and the row's tail)."""
    tile_w = max(1, min(tiling.tile_w, geom.out_w))
    widths = sorted({tile_w, geom.out_w % tile_w} - {0})
    return isa.count_loops_ir([(w, tiling.vec_blocks) for w in widths])  # type: ignore[attr-defined]


def build_bitserial(geom: BitserialGeometry, isa: PopcountIsa, tiling: Tiling) -> tirx.PrimFunc:
    """The whole layer as one PrimFunc ``(codes, packed_weight, out)``."""
    tile_w = max(1, min(tiling.tile_w, geom.out_w))
    oc_tile = isa.oc_per_vector * tiling.vec_blocks
    if OC_BLOCK % oc_tile:
        raise ValueError(f"{tiling} gives {oc_tile} output channels per tile; it must divide {OC_BLOCK}")
    paired = tiling.paired
    if paired and not (getattr(isa, "paired", False) and isa.oc_per_vector == 2 and isa.halves == 1):
        raise ValueError(f"{tiling} asks for pixel pairs; ISA {isa.name} cannot count them")
    micro = _paired_micro_kernel if paired else _micro_kernel
    subs = OC_BLOCK // oc_tile
    o_tiles = geom.oc_blocks * subs
    oh_n = geom.out_h
    full, tail = divmod(geom.out_w, tile_w)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("bitserial_dense" if geom.dense else "bitserial_conv2d")
            codes = T.arg("codes", T.buffer(geom.codes_shape, "int32"))
            wpk = T.arg("packed_weight", T.buffer(geom.weight_shape, "uint64"))
            out = T.arg("out", T.buffer(geom.out_shape, "int32"))
            T.func_attr({"tirx.noalias": True})
            paired_weights = prepare_paired_weights(geom, wpk) if paired else None
            load_w = None if paired else isa.prepare_weights(geom, wpk)
            apk = emit_activation_pack(geom, codes, isa.halves)
            pairs = emit_pixel_pairs(geom, apk) if paired else None
            wsum = emit_window_sums(geom, codes) if geom.bipolar else None
            task = _Task(geom, isa, load_w, apk, out, wsum, tiling.vec_blocks, paired_weights, pairs)
            with contextlib.ExitStack() as stack:
                if paired:
                    stack.enter_context(T.attr(tirx.const(0, "int32"), "pragma_import_llvm",
                                               _paired_loops_ir(isa, geom, tiling)))
                with T.parallel(0, geom.batch * o_tiles * oh_n) as it:
                    n = it // (o_tiles * oh_n)
                    ot = (it // oh_n) % o_tiles
                    oh = it % oh_n
                    ob = ot // subs
                    lane0 = (ot % subs) * oc_tile
                    bufs = _tile_buffers(isa, tiling, tile_w)
                    with T.serial(0, full) as t:
                        micro(task, bufs, n, ob, lane0, oh, t * tile_w, tile_w)
                    if tail:
                        micro(task, bufs, n, ob, lane0, oh, full * tile_w, tail)
    return ib.get()
