"""A default CPU schedule for the fused float/elementwise PrimFuncs that legalization produces.

The Relax CPU pipeline leaves TIR unscheduled (one thread, scalar loops). This rule inlines what it can
(never reverse-inlining into a reduction), then per remaining block parallelizes the outer spatial loops
and vectorizes a contiguous innermost spatial extent. Kernels that arrive already scheduled (``tirx.is_scheduled``) are
skipped by :class:`~tvm.s_tir.dlight.ApplyDefaultSchedule`; functions this rule cannot handle are left
as they are and listed by :func:`unscheduled_functions`, so a slow kernel is never silent.
"""

from __future__ import annotations

from tvm import IRModule, s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

__all__ = ["CpuGeneric", "unscheduled_functions", "VECTOR_LANES", "MIN_PARALLEL_EXTENT"]

#: 32-bit lanes per vector statement: one AVX2 register, two NEON registers
VECTOR_LANES = 8
#: below this many iterations a thread-pool launch costs more than it saves
MIN_PARALLEL_EXTENT = 4096


def _is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """A block with an init statement or a non-spatial axis (a unit reduction axis may be gone)."""
    stmt = sch.get(block)
    return stmt.init is not None or any(int(iv.iter_type) != tirx.IterVar.DataPar for iv in stmt.iter_vars)


def _inline(sch: s_tir.Schedule, infos: list) -> list:
    """dlight's ``try_inline``, except that nothing is reverse-inlined into a reduction: a reduction with a
    unit-extent axis can otherwise absorb its consumer and read the consumer's output as its accumulator."""

    def attempt(reverse: bool) -> int | None:
        for i, info in enumerate(infos):
            try:
                if reverse:
                    if any(_is_reduction(sch, p) for p in sch.get_producers(info.block_rv)):
                        continue
                    sch.reverse_compute_inline(info.block_rv)
                else:
                    sch.compute_inline(info.block_rv)
            except s_tir.schedule.ScheduleError:
                continue
            return i
        return None

    while True:
        done = attempt(reverse=False)
        if done is None:
            done = attempt(reverse=True)
        if done is None:
            return infos
        infos.pop(done)


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


class CpuGeneric(ScheduleRule):
    """Inline everything inlinable, then parallel outer spatial loops, vectorize the inner one."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in _inline(sch, infos):
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            if not loops or len(loops) != len(kinds):
                continue
            spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
            leading = len(kinds) - len(kinds.lstrip("S"))
            try:
                if info.is_injective():
                    self._spatial(sch, spatial)
                elif leading > 0:
                    self._reduction(sch, info.block_rv, loops[:leading], loops[leading])
            except s_tir.schedule.ScheduleError:
                continue  # this block keeps its plain loops; the others are still scheduled
        return sch

    @staticmethod
    def _spatial(sch: s_tir.Schedule, loops: list[s_tir.schedule.LoopRV]) -> None:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        total = _extent(sch, fused)
        if total is None:
            return
        if total % VECTOR_LANES == 0 and total >= VECTOR_LANES:
            outer, inner = sch.split(fused, [None, VECTOR_LANES])
            sch.vectorize(inner)
        else:
            outer = fused
        if total >= MIN_PARALLEL_EXTENT:
            sch.parallel(outer)

    @staticmethod
    def _reduction(
        sch: s_tir.Schedule,
        block: s_tir.schedule.SBlockRV,
        leading: list[s_tir.schedule.LoopRV],
        first_reduce: s_tir.schedule.LoopRV,
    ) -> None:
        fused = sch.fuse(*leading) if len(leading) > 1 else leading[0]
        total = _extent(sch, fused)
        if total is not None and total >= 16:
            sch.parallel(fused)
        sch.decompose_reduction(block, first_reduce)


def unscheduled_functions(mod: IRModule) -> list[str]:
    """Names of PrimFuncs that no schedule reached (they compile, but run as plain scalar loops)."""
    names = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not bool(func.attrs and func.attrs.get("tirx.is_scheduled", False)):
            names.append(gv.name_hint)
    return sorted(names)
