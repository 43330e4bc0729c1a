"""The TVM stages of the pipeline: compile-and-verify on this host, aarch64 artifact folders that verify runs
under qemu (or checks for integrity only: a truncated ``model.so`` is caught)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.backends.tvm.emulate import emulation_available, emulation_missing
from fxquant.cli.main import main
from fxquant.io.checkpoint import Checkpoint, save_checkpoint
from fxquant.io.model_spec import ModelSpec
from tests.conftest import calibrate_bn

pytest.importorskip("fxquant.backends.tvm")
pytestmark = pytest.mark.slow

SPEC = ModelSpec("tests.conftest:TinyNet", {"classes": 5})
needs_cross_compiler = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                          reason="no aarch64 cross compiler")
needs_emulation = pytest.mark.skipif(
    not emulation_available(), reason=f"aarch64 emulation missing: {'; '.join(emulation_missing())} (.ci/setup-arm)"
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prepared TinyNet checkpoint and a 12x12 RGB ImageFolder to verify on."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    model = calibrate_bn(SPEC.build(), (8, 3, 12, 12))
    qmodel = fxquant.prepare(model, (torch.randn(8, 3, 12, 12),), fxquant.QuantConfig(weight_bits=2, act_bits=2))
    save_checkpoint(Checkpoint.from_prepared(qmodel, (3, 12, 12), SPEC), "q.ckpt")
    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b", "c"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, "RGB").save(tmp_path / "imgs" / label / f"{i}.png")
    return tmp_path


def test_verify_compiles_for_this_host_and_agrees(workdir: Path) -> None:
    args = ["verify", "--backend", "tvm-llvm", "--reference", "q.ckpt", "--data", "imgs", "--batch-size", "4"]
    assert main(args) == 0
    report = json.loads(Path("q.ckpt.verify-tvm-llvm.report.json").read_text())
    assert report["metrics"]["samples"] == 9  # two full batches and a padded one
    assert report["metrics"]["top1_agreement"] == 1.0
    assert report["metrics"]["max_abs_diff"] <= 1e-4


@needs_cross_compiler
def test_arm_artifact_folder_is_checked_for_integrity(workdir: Path, capsys, monkeypatch) -> None:
    assert main(["convert", "q.ckpt", "--backend", "tvm-arm", "-o", "art"]) == 0
    assert sorted(p.name for p in Path("art").iterdir()) == ["manifest.json", "model.so", "run_model.py"]
    assert json.loads(Path("art.report.json").read_text())["outputs"]["artifacts"]["path"] == "art"
    assert main(["verify", "art", "--reference", "q.ckpt", "--integrity-only"]) == 0
    again = subprocess.run([sys.executable, "-m", "fxquant", "convert", "q.ckpt", "--backend", "tvm-arm", "-o", "art2"],
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name in ("model.so", "manifest.json", "run_model.py"):  # another process builds the very same artifact
        assert Path("art2", name).read_bytes() == Path("art", name).read_bytes(), name
    capsys.readouterr()
    with monkeypatch.context() as patched:  # a host without the emulation cache
        patched.setenv("FXQUANT_AARCH64_CACHE", str(workdir / "no-cache"))
        assert main(["verify", "art", "--reference", "q.ckpt", "--data", "imgs", "--force"]) == 1
        err = capsys.readouterr().err
        assert "cannot run the aarch64 artifact: emulation needs" in err and "pass --integrity-only" in err
        assert main(["verify", "--backend", "tvm-arm", "--reference", "q.ckpt", "--data", "imgs"]) == 1
        assert "--backend tvm-arm: this host cannot run the aarch64 artifact" in capsys.readouterr().err
    library = Path("art/model.so")
    library.write_bytes(library.read_bytes()[:1000])
    assert main(["verify", "art", "--reference", "q.ckpt", "--integrity-only", "--force"]) == 1
    assert "truncated or corrupted" in capsys.readouterr().err
    # a killed run's staging folder is removed, and --force replaces a folder fxquant wrote, in one step
    Path(".art.fxq-4206969-killed").mkdir()
    assert main(["convert", "q.ckpt", "--backend", "tvm-arm", "-o", "art", "--force"]) == 0
    assert sorted(p.name for p in Path("art").iterdir()) == ["manifest.json", "model.so", "run_model.py"]
    assert not Path(".art.fxq-4206969-killed").exists()
    assert main(["verify", "art", "--reference", "q.ckpt", "--integrity-only"]) == 0
    capsys.readouterr()
    # the integrity check needs the reference the artifact was built from
    for spec, config, message in [
        (ModelSpec("tests.conftest:TinyNet", {"classes": 3}), fxquant.QuantConfig(weight_bits=2, act_bits=2),
         r"layer fc has another weight_shape than in --reference other.ckpt \(artifact \[5, 8\], reference "
         r"\[3, 8\]\): the artifact was converted from another model"),
        (SPEC, fxquant.QuantConfig(weight_bits=3, act_bits=2),
         r"layer conv2 has another weight_bits than in --reference other.ckpt \(artifact 2, reference 3\)"),
        (SPEC, fxquant.QuantConfig(weight_bits=2, act_bits=2),
         r"layer conv1 has another input_low .*: the artifact was converted from another checkpoint"),
    ]:
        qother = fxquant.prepare(calibrate_bn(spec.build(), (8, 3, 12, 12)), (torch.randn(8, 3, 12, 12),), config)
        save_checkpoint(Checkpoint.from_prepared(qother, (3, 12, 12), spec), "other.ckpt", force=True)
        assert main(["verify", "art", "--reference", "other.ckpt", "--integrity-only", "--force"]) == 1
        assert re.search(message, capsys.readouterr().err)


@needs_cross_compiler
@needs_emulation
def test_verify_runs_arm_artifacts_under_emulation(workdir: Path, capsys) -> None:
    """A folder from `convert` and a `--backend tvm-arm` build (in a temporary folder) both run under qemu."""
    assert main(["convert", "q.ckpt", "--backend", "tvm-arm", "--batch-size", "4,2", "-o", "art"]) == 0
    assert json.loads(Path("art/manifest.json").read_text())["batch_sizes"] == [4, 2]
    # test batches of 3 run as 2 + 1 padded into 2, on the batch-2 function
    assert main(["verify", "art", "--reference", "q.ckpt", "--data", "imgs", "--batch-size", "3"]) == 0
    assert "running the aarch64 artifact under qemu-aarch64 (native runner) on 3 batch(es)" in capsys.readouterr().out
    metrics = json.loads(Path("art.verify.report.json").read_text())["metrics"]
    assert metrics["emulation"] == {"emulator": "qemu-aarch64", "runner": "native"}
    assert (metrics["samples"], metrics["top1_agreement"]) == (9, 1.0) and metrics["max_abs_diff"] <= 1e-4
    args = ["verify", "--backend", "tvm-arm", "--reference", "q.ckpt", "--data", "imgs", "--batch-size", "4"]
    assert main(args) == 0
    metrics = json.loads(Path("q.ckpt.verify-tvm-arm.report.json").read_text())["metrics"]
    assert (metrics["samples"], metrics["top1_agreement"]) == (9, 1.0) and metrics["max_abs_diff"] <= 1e-4
    assert metrics["artifact"]["backend"] == "tvm-arm"
    assert sorted(p.name for p in workdir.iterdir()) == sorted(
        ["q.ckpt", "imgs", "art", "art.report.json", "art.verify.report.json", "q.ckpt.verify-tvm-arm.report.json"]
    )  # the temporary build is gone


def test_convert_passes_kernel_options_to_the_backend(workdir: Path, capsys) -> None:
    args = ["convert", "q.ckpt", "--backend", "tvm-llvm", "-o", "host.json", "--num-threads", "1",
            "--kernel", "conv1=direct,dw=direct,*=dot", "--cost-model", "model"]
    assert main(args) == 0
    manifest = json.loads(Path("host.json").read_text())
    assert manifest["options"]["kernel"] == {"conv1": "direct", "dw": "direct", "*": "dot"}
    assert manifest["options"]["num_threads"] == 1 and manifest["options"]["cost_model"] == "model"
    kernels = {e["name"]: e["kernel"] for e in manifest["layers"]}
    assert kernels["conv1"] == "direct" and kernels["fc"] == "dot"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--backend", "torch", "--kernel", "dot"], "--kernel: only for the TVM backends, not --backend torch"),
        (["--backend", "tvm-llvm", "--kernel", "conv1=,x"], "--kernel 'conv1=,x': expected FAMILY or LAYER=FAMILY"),
        (["--backend", "tvm-llvm", "--kernel", "fastest"], "kernel='fastest' is invalid"),
        (["--backend", "tvm-arm", "--cpu", "cortex-x9"], "cpu='cortex-x9' is invalid"),
        (["--backend", "torch", "--batch-size", "1,8"], "--batch-size: only for the TVM backends"),
    ],
)
def test_convert_rejects_bad_kernel_options(workdir: Path, capsys, extra: list[str], message: str) -> None:
    assert main(["convert", "q.ckpt", "-o", "out", *extra]) == 1
    assert message in capsys.readouterr().err
    assert not Path("out").exists()


@pytest.mark.parametrize("value,message", [("1,1", "a batch size is listed twice"), ("0", "0 is not a positive"),
                                           ("4,x", "expected a positive integer or a list such as 1,8")])
def test_convert_rejects_bad_batch_sizes(workdir: Path, capsys, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "q.ckpt", "-o", "out", "--backend", "tvm-llvm", "--batch-size", value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_convert_compiles_several_batch_sizes(workdir: Path) -> None:
    args = ["convert", "q.ckpt", "--backend", "tvm-llvm", "-o", "host.json", "--batch-size", "1,3",
            "--cost-model", "model"]
    assert main(args) == 0
    manifest = json.loads(Path("host.json").read_text())
    assert manifest["batch_sizes"] == [1, 3] and manifest["batch_variants"][0]["function"] == "main_b3"
