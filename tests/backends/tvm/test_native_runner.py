"""``fxquant_run``, the C++ device runner: a deployable folder, exact outputs under qemu for .npy and raw inputs,
and the refusals of run_model.py (tampered library, wrong input, bad option) with exit status 2."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fxquant
from fxquant.backends.tvm.emulate import QEMU, cache_dir, emulation_available, emulation_missing
from fxquant.backends.tvm.native_runner import RUNNER_NAME, build_runner, cached_runner, runner_missing
from tests.backends.tvm.helpers import ResidualNet, quantized

pytestmark = [
    pytest.mark.skipif(bool(runner_missing()), reason=f"cannot build the runner: {'; '.join(runner_missing())}"),
    pytest.mark.skipif(not emulation_available(), reason=f"no aarch64 emulation: {'; '.join(emulation_missing())}"),
]
ELF_MACHINE_AARCH64 = 183


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    q = quantized(ResidualNet(width=8), x, weight_bits=2, act_bits=3)
    art = fxquant.convert(q, backend="tvm-arm", output_dir=tmp_path_factory.mktemp("native") / "art")
    return x, fxquant.convert(q, backend="tvm-llvm", cost_model="model"), art, cached_runner()


def run(runner: Path, *args: str | Path) -> subprocess.CompletedProcess:
    command = [QEMU, "-L", str(cache_dir() / "sysroot"), str(runner), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_deployable_folder(setup) -> None:
    """The runner and the two libraries it finds through $ORIGIN: the folder runs on a device as it is."""
    binary = setup[3]
    folder = binary.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted([RUNNER_NAME, "libtvm_ffi.so", "libtvm_runtime.so"])
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE_AARCH64
    with pytest.raises(fxquant.BackendError, match="already exists; pass force=True"):
        build_runner(folder)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_npy_and_raw_inputs_give_the_host_build_outputs(setup, tmp_path: Path) -> None:
    x, host, art, runner = setup
    other = torch.randn(2, 3, 16, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    other.numpy().tofile(tmp_path / "other.bin")  # raw little-endian float32, the manifest gives the shape
    done = run(runner, "--artifact", art.path, "--input", tmp_path / "x.npy", "--input", tmp_path / "other.bin",
               "--runs", "2", "--num-threads", "1", "--output-dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    for index, inputs in enumerate((x, other)):
        got = np.load(tmp_path / "out" / f"run_{index}" / "output_0.npy")
        assert got.dtype == np.float32 and got.shape == (2, 10)
        np.testing.assert_array_equal(got, host(inputs).numpy())


def test_refusals_exit_2_with_one_line(setup, tmp_path: Path) -> None:
    x, _, art, runner = setup
    np.save(tmp_path / "x64.npy", x.double().numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    x.clone().fill_(float("inf")).numpy().tofile(tmp_path / "inf.bin")
    tampered = tmp_path / "tampered"
    shutil.copytree(art.path, tampered)
    (tampered / "model.so").write_bytes((tampered / "model.so").read_bytes()[:4096])
    cases = [
        (["--artifact", art.path, "--input", tmp_path / "x64.npy"], "input x: expected [2, 3, 16, 16] float32"),
        (["--artifact", art.path, "--input", tmp_path / "x.npy", "--input", tmp_path / "x.npy"],
         "expected 1 input file(s) (1 per run), got 2"),
        (["--artifact", tampered, "--input", tmp_path / "x.npy"], "does not match the sha256 in manifest.json"),
        (["--artifact", art.path, "--input", tmp_path / "inf.bin"], "holds NaN or Inf values"),
        (["--artifact", art.path, "--num-threads", "0"], "--num-threads: expected a positive integer"),
    ]
    for args, message in cases:
        done = run(runner, *args, "--output-dir", tmp_path / "out")
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()
