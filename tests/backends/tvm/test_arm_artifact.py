"""``tvm-arm``: the artifact folder, its manifest, overwrite rules, integrity checks, and the emulated run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import fxquant
from fxquant.backends.tvm import verify_artifact
from fxquant.backends.tvm.emulate import (
    emulation_available,
    emulation_missing,
    run_batches_under_qemu,
    run_under_qemu,
)
from fxquant.backends.tvm.manifest import sha256_file
from fxquant.models import resnet20
from fxquant.passes.freeze import integer_layers
from tests.backends.tvm.helpers import ResidualNet, quantized, reference_accumulators

OBJDUMP = "aarch64-linux-gnu-objdump"
needs_emulation = pytest.mark.skipif(
    not emulation_available(), reason=f"aarch64 emulation missing: {'; '.join(emulation_missing())} (.ci/setup-arm)"
)
needs_cross_compiler = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None, reason="aarch64-linux-gnu-g++ missing (.ci/setup-arm)"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (.ci/setup-arm)")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2)
    out = tmp_path_factory.mktemp("arm") / "residual"
    art = fxquant.convert(q, backend="tvm-arm", output_dir=out, debug_accumulators=True)
    return q, x, art


@needs_cross_compiler
def test_artifact_files_and_manifest(built) -> None:
    q, x, art = built
    assert sorted(p.name for p in art.path.iterdir()) == ["manifest.json", "model.so", "run_model.py"]
    text = (art.path / "manifest.json").read_text()
    manifest = json.loads(text)
    assert manifest == art.manifest
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"  # canonical, sorted keys
    assert manifest["backend"] == "tvm-arm"
    assert manifest["target"]["mtriple"] == "aarch64-linux-gnu" and "+neon" in manifest["target"]["mattr"]
    assert manifest["fxquant_version"] == fxquant.__version__ and manifest["tvm_version"]
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "head", "shape": [2, 10], "dtype": "float32"}]
    assert manifest["files"]["model.so"]["sha256"] == sha256_file(art.path / "model.so")
    assert manifest["files"]["model.so"]["bytes"] == (art.path / "model.so").stat().st_size
    layers = {e["name"]: e for e in manifest["layers"]}
    frozen = fxquant.passes.freeze(q)
    assert set(layers) == set(integer_layers(frozen))
    for name, layer in integer_layers(frozen).items():
        entry = layers[name]
        assert (entry["weight_bits"], entry["act_bits"]) == (layer.weight_bits, layer.act_bits)
        assert entry["weight_scale"] == pytest.approx(layer.weight_scale.tolist())
        assert entry["input_step"] == pytest.approx(float(layer.input_step))
        assert entry["kernel"] in ("bitserial", "dot", "direct") and entry["reason"]
    assert "build_seconds" not in manifest  # nothing time-dependent in a deployed manifest
    assert verify_artifact(art.path) == manifest


@needs_cross_compiler
def test_existing_folder_needs_force(built, tmp_path: Path) -> None:
    q, _, _ = built
    target = tmp_path / "art"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(fxquant.BackendError, match=r"already exists.*force=True"):
        fxquant.convert(q, backend="tvm-arm", output_dir=target)
    assert (target / "keep.txt").read_text() == "user data"
    with pytest.raises(fxquant.BackendError, match=r"refusing to replace .*art: it holds files fxquant did not "
                                                   r"write \(keep\.txt\)"):
        fxquant.convert(q, backend="tvm-arm", output_dir=target, force=True)  # force never deletes user files
    assert (target / "keep.txt").read_text() == "user data"
    (target / "keep.txt").unlink()
    art = fxquant.convert(q, backend="tvm-arm", output_dir=target, force=True)  # an empty folder loses nothing
    assert sorted(p.name for p in art.path.iterdir()) == ["manifest.json", "model.so", "run_model.py"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging or old copies left behind
    verify_artifact(target)


@needs_cross_compiler
def test_truncated_library_is_rejected(built, tmp_path: Path) -> None:
    _, x, art = built
    copy = tmp_path / "copy"
    shutil.copytree(art.path, copy)
    library = copy / "model.so"
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    with pytest.raises(fxquant.BackendError, match=re.escape(str(library)) + ".*truncated or corrupted"):
        verify_artifact(copy)
    with pytest.raises(fxquant.BackendError, match="model.so"):
        run_under_qemu(copy, [x.numpy()])
    library.unlink()
    with pytest.raises(fxquant.BackendError, match=r"model.so is missing"):
        verify_artifact(copy)


@needs_cross_compiler
def test_bitserial_layers_use_neon_popcount(built) -> None:
    _, _, art = built
    bitserial = [e["name"] for e in art.manifest["layers"] if e["kernel"] == "bitserial"]
    if not bitserial:
        pytest.skip("no layer got the bit-serial kernel (fxquant.backends.tvm.kernels.bitserial not installed)")
    if shutil.which(OBJDUMP) is None:
        pytest.skip(f"{OBJDUMP} missing (binutils-aarch64-linux-gnu, .ci/setup-arm)")
    listing = subprocess.run([OBJDUMP, "-d", str(art.path / "model.so")], capture_output=True, text=True, check=True)
    counts: dict[str, int] = {}
    function = ""
    for line in listing.stdout.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1)
            counts.setdefault(function, 0)
        elif re.search(r"\tcnt\t", line):
            counts[function] += 1
    kernels = {f: n for f, n in counts.items() if f.startswith("bitserial_") and f.endswith("_compute_")}
    assert kernels, f"no bit-serial kernel symbol in model.so ({sorted(counts)})"
    assert all(n > 0 for n in kernels.values()), kernels
    assert sum(n for f, n in counts.items() if f not in kernels) == 0  # popcounts only where bit-serial runs


@needs_cross_compiler
@needs_emulation
def test_emulated_run_equals_host_build_and_reference(built) -> None:
    """run_model.py under qemu equals the host build and the integer reference; the C++ runner equals it."""
    q, x, art = built
    host = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True)
    want, want_accs = host.run_with_accumulators(x)
    flipped = x.flip(0).numpy()
    outputs, second = run_batches_under_qemu(art.path, [[x.numpy()], [flipped]], runner="python", num_threads=1)
    names = [a["name"] for a in art.manifest["debug_accumulators"]]
    assert len(outputs) == 1 + len(names)
    np.testing.assert_array_equal(outputs[0], want.numpy())
    np.testing.assert_array_equal(second[0], host(torch.from_numpy(flipped)).numpy())
    native = run_batches_under_qemu(art.path, [[x.numpy()], [flipped]], runner="native")  # C++ == run_model.py
    for got, expected in zip([*native[0], *native[1]], [*outputs, *second], strict=True):
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
    expected = reference_accumulators(fxquant.convert(q, backend="torch"), x)
    for name, acc in zip(names, outputs[1:], strict=True):
        np.testing.assert_array_equal(acc, want_accs[name].numpy())
        np.testing.assert_array_equal(acc.astype(np.int64), expected[name].numpy())
    with pytest.raises(fxquant.InputError, match=r"expected \[2, 3, 16, 16\] float32"):
        run_under_qemu(art.path, [x[:1].numpy()])


EMULATED_NETWORKS = {
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "cifar_resnet20": lambda: resnet20(num_classes=10),
}


@pytest.mark.slow
@needs_cross_compiler
@needs_emulation
@pytest.mark.parametrize("name", sorted(EMULATED_NETWORKS))
def test_network_emulated_equals_host_build(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    q = quantized(EMULATED_NETWORKS[name](), x, weight_bits=2, act_bits=2)
    art = fxquant.convert(q, backend="tvm-arm", output_dir=tmp_path / name)
    assert art.manifest["kernel_counts"].get("bitserial", 0) > 0, art.manifest["kernel_counts"]
    host = fxquant.convert(q, backend="tvm-llvm")
    (logits,) = run_under_qemu(art.path, [x.numpy()])
    want = host(x)
    torch.testing.assert_close(torch.from_numpy(logits), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(torch.from_numpy(logits).argmax(1), fxquant.convert(q, backend="torch")(x).argmax(1))


@needs_cross_compiler
@needs_emulation
@pytest.mark.parametrize(
    "cpu,kernel,instruction",
    [
        ("cortex-a76", {"dw": "direct", "*": "dot"}, "sdot"),  # 2-bit codes fit int8: sdot
        ("cortex-a53", {"dw": "direct", "*": "dot"}, "smlal"),  # no dot product: int16 multiply-accumulate
        ("neoverse-n1", "auto", None),  # the static model's own choice
    ],
)
def test_named_core_builds_run_exactly(cpu: str, kernel, instruction: str | None, tmp_path: Path) -> None:
    """Each named core's build, its dot-product kernels included, gives the integer reference's accumulators
    under qemu (whose default CPU has every feature these cores have), and contains the core's instruction."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=2, first_last_bits=None)
    art = fxquant.convert(q, backend="tvm-arm", output_dir=tmp_path / cpu, debug_accumulators=True, cpu=cpu,
                          kernel=kernel)
    assert art.manifest["arm_cpu"] == cpu and art.manifest["target"]["mcpu"] == cpu
    layers = {e["name"]: e for e in art.manifest["layers"]}
    if kernel != "auto":
        assert {e["kernel"] for name, e in layers.items() if name != "dw"} == {"dot"}
    for entry in layers.values():
        assert entry["cost_model"] == "model" and entry["reason"]
    if instruction is not None:
        disassembly = subprocess.run([OBJDUMP, "-d", str(art.library)], capture_output=True, text=True).stdout
        assert re.search(rf"\s{instruction}\s", disassembly)
    outputs = run_under_qemu(art.path, [x.numpy()])
    expected = reference_accumulators(fxquant.convert(q, backend="torch"), x)
    names = [a["name"] for a in art.manifest["debug_accumulators"]]
    for name, acc in zip(names, outputs[1:], strict=True):
        np.testing.assert_array_equal(acc.astype(np.int64), expected[name].numpy())
