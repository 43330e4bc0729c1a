"""TVM backends (``"tvm-llvm"``, ``"tvm-arm"``): lower the frozen integer graph to Relax and compile it.

Example::

    mod = fxquant.convert(qmodel, backend="tvm-llvm")            # runs here, on the host CPU
    print(mod.report())                                            # which kernel each layer got, and why
    art = fxquant.convert(qmodel, backend="tvm-arm", output_dir="artifacts/resnet")   # model.so for aarch64
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fxquant.backends.registry import register_backend
from fxquant.backends.tvm.artifact import Artifact, export_artifact, load_manifest, verify_artifact
from fxquant.backends.tvm.build import arm_target_dict, compile_module, host_target_dict, make_target
from fxquant.backends.tvm.lower import CAPABILITIES, lower_graph, register_converter
from fxquant.backends.tvm.manifest import build_manifest
from fxquant.backends.tvm.options import ArmOptions, TvmOptions
from fxquant.backends.tvm.runtime import TvmModule

__all__ = [
    "lower_tvm_llvm", "lower_tvm_arm", "TvmModule", "Artifact", "load_manifest", "verify_artifact",
    "register_converter",
]


def _lower_and_compile(
    backend: str, frozen: fx.GraphModule, opts: TvmOptions, target_dict: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """Lower ``frozen`` to Relax for the target, compile it, and describe the result in a manifest."""
    target = make_target(target_dict, opts.target)
    lowered = lower_graph(frozen, opts, target)
    build = compile_module(lowered.mod, target)
    return lowered, build, build_manifest(backend, lowered, build, target, opts)


@register_backend("tvm-llvm", CAPABILITIES)
def lower_tvm_llvm(frozen: fx.GraphModule, **options: Any) -> TvmModule:
    """Compile for this machine's CPU; returns a callable module with ``.manifest`` and ``.report()``."""
    opts = TvmOptions.parse("tvm-llvm", options)
    lowered, build, manifest = _lower_and_compile("tvm-llvm", frozen, opts, host_target_dict())
    manifest["build_seconds"] = round(build.seconds, 3)
    return TvmModule(build.executable, manifest, lowered.functions, opts.num_threads)


@register_backend("tvm-arm", CAPABILITIES)
def lower_tvm_arm(frozen: fx.GraphModule, **options: Any) -> Artifact:
    """Cross-compile for aarch64 + NEON and write ``output_dir`` (model.so, manifest.json, run_model.py).

    ``cpu=`` names the core (:data:`~fxquant.backends.tvm.arm_cores.ARM_CORES`); the manifest records it as
    ``arm_cpu`` next to the target it implies.
    """
    opts = ArmOptions.parse("tvm-arm", options)
    _, build, manifest = _lower_and_compile("tvm-arm", frozen, opts, arm_target_dict(opts.cpu))
    manifest["arm_cpu"] = opts.cpu
    return export_artifact(build.executable, manifest, opts.output_dir, force=opts.force)
