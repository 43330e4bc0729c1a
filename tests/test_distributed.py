"""``torchrun --nproc-per-node 2`` with gloo on the CPU: ranks stay identical after every step, the result equals
a one-process run of the same global batches, and a ``fxquant train`` whose rank dies fails and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fxquant.data.fashion_mnist import FASHION_MNIST_DIR
from fxquant.io.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no gloo backend")

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "distributed_driver.py"
STEPS = 6  # more than one epoch of 5 batches, the last with 5 samples (3 and 2 on the ranks)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def test_ranks_stay_identical_and_match_one_process(tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    _run([sys.executable, str(DRIVER), str(single), str(STEPS)], tmp_path)
    _run(_torchrun(str(DRIVER), str(double), str(STEPS)), tmp_path)
    reference = torch.load(single / "rank0.pt")
    ranks = [torch.load(double / f"rank{r}.pt") for r in range(2)]
    assert len(reference) == len(ranks[0]) == len(ranks[1]) == STEPS
    for step, (one, r0, r1) in enumerate(zip(reference, *ranks, strict=True)):
        for name in one:
            assert torch.equal(r0[name], r1[name]), f"step {step}: {name} differs between the ranks"
            torch.testing.assert_close(r0[name], one[name], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: {name} differs from the one-process run")
    learned = [k for k in reference[0] if not torch.equal(reference[0][k], reference[-1][k])]
    for kind in ("weight_quant.alpha", "lcq", "step", "layer.weight"):  # DSQ alpha, LCQ, LSQ scales, weights
        if kind == "lcq":
            assert any(k.startswith("2.") and "_quant." in k for k in learned), learned
        else:
            assert any(kind in k for k in learned), (kind, learned)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_train_with_a_killed_rank_fails_and_resumes(tmp_path: Path) -> None:
    """Rank 1 is killed after the first periodic checkpoint: torchrun fails, the checkpoint on disk is the last
    whole one, no report claims success, and the run resumes from it in one process."""
    (tmp_path / "quant.yaml").write_text("quantizer: lsq\nweight_bits: 3\nact_bits: 3\nfirst_last_bits: null\n")
    _run([sys.executable, "-m", "fxquant", "prepare", "--model", "tests.distributed_driver:tiny_net", "--config",
          "quant.yaml", "--calibration-batch", "8", "-o", "prepared.ckpt"], tmp_path)
    train = ["-m", "fxquant", "train", "prepared.ckpt", "-o", "run.ckpt", "--data", "fashion-mnist",
             "--train-subset", "256", "--batch-size", "8", "--epochs", "50", "--save-every", "2", "--no-progress",
             "--no-eval", "--device", "cpu"]
    run = subprocess.Popen(_torchrun(*train), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "run.ckpt").exists():
            assert run.poll() is None and time.monotonic() < deadline, "no periodic checkpoint was written"
            time.sleep(0.05)
        workers = _children(run.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # rank 1, while rank 0 may be writing
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, output[-2000:]
    saved = read_checkpoint(tmp_path / "run.ckpt")  # whole (atomic writes), with the training state
    step = saved.training["epoch"] * 32 + saved.training["step_in_epoch"]
    assert step >= 2 and step % 2 == 0 and step < 50 * 32
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    _run([sys.executable, "-m", "fxquant", "train", "run.ckpt", "-o", "resumed.ckpt", "--steps", "2",
          "--no-progress", "--no-eval", "--device", "cpu"], tmp_path)
    resumed = read_checkpoint(tmp_path / "resumed.ckpt").training
    assert resumed["epoch"] * 32 + resumed["step_in_epoch"] == step + 2


def _children(pid: int) -> list[int]:
    """The worker processes torchrun started (its direct children), in rank order."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                environ = (entry / "environ").read_bytes().split(b"\0")
                rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
                found[rank] = int(entry.name)
    return [found[r] for r in sorted(found)]


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_search_under_torchrun_gives_the_one_process_plan(tmp_path: Path) -> None:
    (tmp_path / "quant.yaml").write_text("quantizer: lsq\nfirst_last_bits: null\n")
    search = ["-m", "fxquant", "search", "--model", "tests.distributed_driver:tiny_net", "--config", "quant.yaml",
              "--budget", "avg_weight_bits=3", "--train-subset", "64", "--batch-size", "16", "--steps", "8",
              "--no-progress", "--device", "cpu"]
    _run([sys.executable, *search, "-o", "one.json"], tmp_path)
    _run(_torchrun(*search, "-o", "two.json"), tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["bits"] == one["bits"]
    assert two["metadata"]["search_bits"] == one["metadata"]["search_bits"]
    for key, by_bits in one["metadata"]["keep_probability"].items():
        for bits, p in by_bits.items():
            assert abs(two["metadata"]["keep_probability"][key][bits] - p) < 1e-4, (key, bits)
    assert json.loads((tmp_path / "two.json.report.json").read_text())["settings"]["placement"]["processes"] == 2
