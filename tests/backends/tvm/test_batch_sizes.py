"""Several batch sizes in one build (``batch_sizes=(1, 4)``): one Relax function per size, any batch run exactly
in pieces of those, the manifest and both device runners picking the function for the inputs' batch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fxquant
from fxquant.backends.tvm.emulate import QEMU, cache_dir, emulation_available, emulation_missing
from fxquant.backends.tvm.manifest import manifest_json, sha256_file
from fxquant.backends.tvm.native_runner import cached_runner, runner_missing
from fxquant.backends.tvm.run_model import run as run_model
from fxquant.batching import batch_plan, check_batch_sizes
from tests.backends.tvm.helpers import ResidualNet, quantized


@pytest.fixture(scope="module")
def qmodel() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return quantized(ResidualNet(width=8), torch.randn(2, 3, 16, 16), weight_bits=2, act_bits=2)


@pytest.fixture(scope="module")
def host(qmodel):
    return fxquant.convert(qmodel, backend="tvm-llvm", cost_model="model", batch_sizes=(1, 4),
                           debug_accumulators=True)


@pytest.mark.parametrize("samples,sizes,plan", [
    (4, (1, 4), [(4, 4)]),
    (13, (1, 8), [(8, 8), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]),
    (5, (4, 8), [(4, 4), (4, 1)]),  # the remainder is padded into the smallest size
    (3, (8, 4), [(4, 3)]),
    (9, (2, 3), [(3, 3), (3, 3), (3, 3)]),
])
def test_batch_plan_fills_the_largest_sizes_first(samples, sizes, plan) -> None:
    assert batch_plan(samples, sizes) == plan
    assert sum(real for _, real in plan) == samples


@pytest.mark.parametrize("bad", [(), (0,), (2, 2), (1.5,), (True,), 4, "4"])
def test_batch_sizes_are_checked(bad) -> None:
    with pytest.raises(fxquant.ConfigError, match=r"batch_sizes=.* is invalid"):
        check_batch_sizes(bad)


def test_every_batch_size_runs_exactly(host, qmodel) -> None:
    ref = fxquant.convert(qmodel, backend="torch")
    assert host.batch_sizes == [1, 4]
    for samples in (1, 2, 4, 5, 9):  # compiled sizes, a padded one, and pieces of both
        x = torch.randn(samples, 3, 16, 16)
        out, accs = host.run_with_accumulators(x)
        assert out.shape == (samples, 10)
        assert torch.equal(out, ref(x)), samples
        assert all(a.shape[0] == samples for a in accs.values())
    x = torch.randn(6, 3, 16, 16)  # pieces (4, 1, 1) equal the samples run one at a time
    alone = torch.cat([host(x[i:i + 1]) for i in range(6)])
    assert torch.equal(host(x), alone)


def test_manifest_records_each_function(host) -> None:
    manifest = host.manifest
    assert manifest["batch_sizes"] == [1, 4] and manifest["options"]["batch_sizes"] == [1, 4]
    assert manifest["inputs"][0]["shape"] == [1, 3, 16, 16]
    (variant,) = manifest["batch_variants"]
    assert variant["function"] == "main_b4" and variant["batch"] == 4
    assert variant["inputs"][0]["shape"] == [4, 3, 16, 16] and variant["outputs"][0]["shape"] == [4, 10]
    assert [layer["name"] for layer in variant["layers"]] == [layer["name"] for layer in manifest["layers"]]
    assert "batch 4 (main_b4)" in host.report()


def test_other_shapes_fail_naming_the_compiled_sizes(host, qmodel) -> None:
    with pytest.raises(fxquant.InputError, match=r"expected shape \(N, 3, 16, 16\) float32 with N any batch size "
                                                 r"\(compiled: 1, 4\), got \(2, 3, 8, 8\)"):
        host(torch.randn(2, 3, 8, 8))
    with pytest.raises(fxquant.InputError, match="non-finite value"):
        host(torch.full((3, 3, 16, 16), float("nan")))
    single = fxquant.convert(qmodel, backend="tvm-llvm", cost_model="model", batch_sizes=(2,))
    assert torch.equal(single(torch.ones(3, 3, 16, 16)), host(torch.ones(3, 3, 16, 16)))  # padded into 2
    with pytest.raises(fxquant.ConfigError, match=r"batch_sizes=\[2, 2\] is invalid: a batch size is listed twice"):
        fxquant.convert(qmodel, backend="tvm-llvm", batch_sizes=(2, 2))


def test_run_model_picks_the_function_for_the_batch(host, tmp_path: Path, monkeypatch) -> None:
    """The device-side Python runner, on a host build of the same module: main for batch 1, main_b4 for 4."""
    monkeypatch.setenv("TVM_USE_RUNTIME_LIB", "1")  # what run_model sets for itself; undone after the test
    folder = tmp_path / "art"
    folder.mkdir()
    host.executable.export_library(str(folder / "model.so"))
    manifest = {**host.manifest, "files": {"model.so": {"sha256": sha256_file(folder / "model.so")}}}
    (folder / "manifest.json").write_text(manifest_json(manifest))
    for samples in (1, 4):
        x = torch.randn(samples, 3, 16, 16)
        np.save(tmp_path / f"x{samples}.npy", x.numpy())
        written = run_model(folder, [tmp_path / f"x{samples}.npy"], tmp_path / f"out{samples}")
        np.testing.assert_array_equal(np.load(written[0]), host(x).numpy())
    np.save(tmp_path / "x3.npy", np.zeros((3, 3, 16, 16), np.float32))
    with pytest.raises(SystemExit):
        run_model(folder, [tmp_path / "x3.npy"], tmp_path / "out3")


@pytest.mark.skipif(bool(runner_missing()), reason=f"cannot build the runner: {'; '.join(runner_missing())}")
@pytest.mark.skipif(not emulation_available(), reason=f"no aarch64 emulation: {'; '.join(emulation_missing())}")
def test_native_runner_picks_the_function_for_the_batch(qmodel, host, tmp_path: Path) -> None:
    art = fxquant.convert(qmodel, backend="tvm-arm", output_dir=tmp_path / "art", batch_sizes=(1, 4))
    assert json.loads((art.path / "manifest.json").read_text())["batch_sizes"] == [1, 4]
    x1, x4 = torch.randn(1, 3, 16, 16), torch.randn(4, 3, 16, 16)
    np.save(tmp_path / "x1.npy", x1.numpy())
    np.save(tmp_path / "x4.npy", x4.numpy())
    np.save(tmp_path / "x3.npy", np.zeros((3, 3, 16, 16), np.float32))
    np.save(tmp_path / "nan.npy", np.full((4, 3, 16, 16), np.nan, np.float32))
    qemu = [shutil.which(QEMU) or QEMU, "-L", str(cache_dir() / "sysroot"), str(cached_runner()), "--artifact",
            str(art.path)]

    def run(*inputs: str) -> subprocess.CompletedProcess:
        args = [a for name in inputs for a in ("--input", str(tmp_path / name))]
        runs = ["--runs", str(len(inputs))] if len(inputs) > 1 else []
        return subprocess.run([*qemu, *args, *runs, "--output-dir", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300, check=False)

    done = run("x4.npy", "x1.npy")  # one run per function, in one process
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "run_0" / "output_0.npy"), host(x4).numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "run_1" / "output_0.npy"), host(x1).numpy())
    done = run("x3.npy")
    assert done.returncode == 2 and "(compiled batch sizes: 1, 4)" in done.stderr, done.stderr
    done = run("nan.npy")
    assert done.returncode == 2 and "holds NaN or Inf values" in done.stderr, done.stderr
