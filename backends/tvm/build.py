"""Targets and the compile pipeline: legalize and fuse the Relax module, schedule every PrimFunc, build.

``tvm.compile``'s default Relax pipeline on CPU neither fuses nor schedules, so this runs legalization and
fusion first, applies :class:`~fxquant.backends.tvm.schedule_rules.CpuGeneric` to the fused functions
(the kernels arrive scheduled and opaque), then hands the module to ``tvm.compile``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax
from tvm.s_tir import dlight
from tvm.target.codegen import llvm_cpu_has_features

from fxquant.backends.tvm.arm_cores import arm_core
from fxquant.backends.tvm.schedule_rules import CpuGeneric, unscheduled_functions
from fxquant.errors import BackendError, ConfigError
from fxquant.tvm_host import host_target_dict

__all__ = [
    "BuildResult", "has_feature", "host_target_dict", "arm_target_dict", "make_target", "compile_module", "ARM_TRIPLE",
]

ARM_TRIPLE = "aarch64-linux-gnu"


def arm_target_dict(cpu: str = "generic") -> dict[str, Any]:
    """64-bit ARM Linux for a named core (:mod:`.arm_cores`): its ``-mcpu`` (LLVM's scheduling model, which decides
    whether the NEON hot loop spills) and features; ``"generic"`` is any ARMv8-A core with NEON."""
    core = arm_core(cpu)
    return {"kind": "llvm", "mtriple": ARM_TRIPLE, "mcpu": core.llvm_cpu, "mattr": list(core.mattr)}


def make_target(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> tvm.target.Target:
    """``base`` updated key by key with the user's ``target=`` option."""
    spec = {**base, **(overrides or {})}
    try:
        return tvm.target.Target(spec)
    except Exception as exc:
        raise ConfigError(f"target={spec!r} is not a valid TVM target: {exc}") from exc


def has_feature(target: tvm.target.Target, feature: str) -> bool:
    """Whether LLVM will use ``feature`` for ``target``; False for a feature it does not know for the triple."""
    try:
        return bool(llvm_cpu_has_features([feature], target))
    except Exception:  # a feature LLVM does not know for this triple
        return False


def target_features(target: tvm.target.Target) -> dict[str, bool]:
    """Which vector features LLVM will use for ``target`` (reported in the manifest)."""
    names = ("avx2", "fma", "popcnt", "avx512f") if "x86" in str(target.attrs.get("mtriple", "")) else ("neon",)
    return {name: has_feature(target, name) for name in names}


@dataclass
class BuildResult:
    """The executable and facts about the build (seconds spent, functions left unscheduled)."""

    executable: tvm.runtime.Executable
    seconds: float
    unscheduled: list[str]
    features: dict[str, bool]


def _prepare(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    passes = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dlight.ApplyDefaultSchedule(CpuGeneric()),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def compile_module(mod: tvm.IRModule, target: tvm.target.Target) -> BuildResult:
    """Fuse, schedule and compile a lowered module for ``target``.

    Example::

        result = compile_module(lowered.mod, make_target(host_target_dict(), None))
    """
    start = time.perf_counter()
    try:
        prepared = _prepare(mod, target)
        unscheduled = unscheduled_functions(prepared)
        executable = tvm.compile(prepared, target=target)
    except Exception as exc:
        raise BackendError(f"TVM build for target {target} failed: {type(exc).__name__}: {exc}") from exc
    return BuildResult(executable, time.perf_counter() - start, unscheduled, target_features(target))
