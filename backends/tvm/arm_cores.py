"""Named aarch64 cores for ``"tvm-arm"``: what LLVM is told (``-mcpu``, features) and what the core can do.

The throughput ceilings are per core and per cycle, for one thread, from the instruction mix of each kernel and
the core's vector pipes (docs/arm.md, "Named cores"):

* bit-serial: ``and + cnt + add`` on 128 bits is 128 one-bit multiply-accumulates (two output channels x 64 input
  channels). Two 128-bit NEON pipes (A72, A76, N1) issue those three instructions in 1.5 cycles (85 one-bit
  MACs/cycle); the A53 issues one 128-bit NEON instruction per cycle (43).
* int8: ``smull/smlal`` (8 MACs per 128-bit instruction pair of pipes, about 8/cycle on A72, about 5 on the A53)
  or ``sdot`` where the core has the dot-product extension (16 MACs per instruction, two pipes: 32/cycle).

``llvm_cpu`` is what the code generator gets; ``mca_cpu`` is the scheduling model ``llvm-mca`` is run with.
LLVM's ``cortex-a76`` model is the Cortex-A57's, so A76-class cores are analysed as ``neoverse-n1`` (the same
core design for servers), while the generated code still names the real core.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.errors import ConfigError

__all__ = ["ArmCore", "ARM_CORES", "arm_core"]


@dataclass(frozen=True)
class ArmCore:
    """One aarch64 core: code-generation settings, clock, throughput ceilings, and the issue resources the
    static fallback model divides instruction counts by when ``llvm-mca`` is absent."""

    name: str
    llvm_cpu: str  # -mcpu for code generation; "generic" means no -mcpu
    mattr: tuple[str, ...]
    has_dotprod: bool
    clock_ghz: float  # a typical shipping clock, for microseconds in estimates
    popcount_ones_per_cycle: float  # bit-serial ceiling: one-bit MACs per cycle
    int8_macs_per_cycle: float  # int8 ceiling: 8-bit MACs per cycle
    notes: str
    mca_cpu: str = ""  # llvm-mca -mcpu ("" = llvm_cpu)
    issue_width: int = 3  # instructions dispatched per cycle
    neon_pipes: int = 2  # 128-bit ASIMD instructions per cycle
    load_pipes: int = 1  # loads per cycle
    in_order: bool = False

    @property
    def mcpu_for_mca(self) -> str:
        return self.mca_cpu or self.llvm_cpu


_TWO_PIPES = "two 128-bit ASIMD pipes: and+cnt+add per 128 one-bit MACs in 1.5 cycles = 85/cycle"

ARM_CORES: dict[str, ArmCore] = {
    core.name: core
    for core in (
        ArmCore(
            name="generic",
            llvm_cpu="generic",
            mattr=("+neon",),
            has_dotprod=False,
            clock_ghz=1.8,
            popcount_ones_per_cycle=85.0,
            int8_macs_per_cycle=8.0,
            notes="any ARMv8-A core with NEON; ceilings and llvm-mca model of a Cortex-A72-class core (" + _TWO_PIPES
            + "; int8 by smull/smlal, no dot product assumed); clock nominal",
            mca_cpu="cortex-a72",
        ),
        ArmCore(
            name="cortex-a53",
            llvm_cpu="cortex-a53",
            mattr=("+neon",),
            has_dotprod=False,
            clock_ghz=1.4,
            popcount_ones_per_cycle=43.0,
            int8_macs_per_cycle=5.0,
            notes="in-order, dual issue, one 128-bit NEON instruction per cycle: 128/3 = 43 one-bit MACs/cycle; "
            "int8 ~5 MACs/cycle by smull/smlal; 1.4 GHz as in the Raspberry Pi 3B+",
            issue_width=2,
            neon_pipes=1,
            in_order=True,
        ),
        ArmCore(
            name="cortex-a72",
            llvm_cpu="cortex-a72",
            mattr=("+neon",),
            has_dotprod=False,
            clock_ghz=1.8,
            popcount_ones_per_cycle=85.0,
            int8_macs_per_cycle=8.0,
            notes=_TWO_PIPES + "; int8 ~8 MACs/cycle by smull/smlal; 1.8 GHz as in the "
            "Raspberry Pi 4 (rev 1.4)",
        ),
        ArmCore(
            name="cortex-a76",
            llvm_cpu="cortex-a76",
            mattr=("+neon", "+dotprod"),
            has_dotprod=True,
            clock_ghz=2.4,
            popcount_ones_per_cycle=85.0,
            int8_macs_per_cycle=32.0,
            notes=_TWO_PIPES + "; int8 32 MACs/cycle by sdot on two pipes; 2.4 GHz as in the "
            "Raspberry Pi 5; llvm-mca runs the neoverse-n1 model (LLVM's cortex-a76 model is the A57's)",
            mca_cpu="neoverse-n1",
            issue_width=4,
            load_pipes=2,
        ),
        ArmCore(
            name="neoverse-n1",
            llvm_cpu="neoverse-n1",
            mattr=("+neon", "+dotprod"),
            has_dotprod=True,
            clock_ghz=2.5,
            popcount_ones_per_cycle=85.0,
            int8_macs_per_cycle=32.0,
            notes=_TWO_PIPES + "; int8 32 MACs/cycle by sdot on two pipes; 2.5 GHz as in AWS "
            "Graviton2",
            issue_width=4,
            load_pipes=2,
        ),
    )
}


def arm_core(name: str) -> ArmCore:
    """The registry entry for ``name``; an unknown name lists the known ones."""
    try:
        return ARM_CORES[name]
    except KeyError:
        raise ConfigError(f"cpu={name!r} is invalid: expected one of {', '.join(ARM_CORES)}") from None
