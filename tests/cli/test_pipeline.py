"""End to end, as a pipeline drives it: separate ``fxquant`` processes for prepare -> train (and resume) ->
convert -> verify -> inspect, checked by exit codes, files and report contents; plus byte-identical
outputs for identical inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxquant.data.fashion_mnist import FASHION_MNIST_DIR
from fxquant.io.checkpoint import read_checkpoint

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist is not installed"
)

MODEL = "fxquant.models:resnet_small"
# 64 training images in batches of 16: 4 steps per epoch
TRAIN = ["--data", "fashion-mnist", "--train-subset", "64", "--batch-size", "16", "--epochs", "1", "--no-progress"]
CONFIG = "quantizer: dsq\nweight_bits: 4\nact_bits: 4\nfirst_last_bits: 8\n"


def fxquant(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # one thread per process: a 16-image batch gains nothing from two, and the stages run one after another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fxquant", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def without_timings(path: Path) -> dict:
    data = report(path)
    data.pop("timings")
    return data


def prepare_in(folder: Path) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quant.yaml").write_text(CONFIG)
    return fxquant(folder, "prepare", "--model", MODEL, "--config", "quant.yaml", "--calibration-batch", "8",
                   "-o", "prepared.ckpt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline, once; each test below checks a part of what it left."""
    d = tmp_path_factory.mktemp("pipeline")
    ok(prepare_in(d))
    ok(fxquant(d, "train", "prepared.ckpt", "-o", "half.ckpt", "--steps", "2", "--test-subset", "32", *TRAIN))
    ok(fxquant(d, "train", "half.ckpt", "-o", "trained.ckpt", "--test-subset", "32", "--no-progress"))
    ok(fxquant(d, "train", "prepared.ckpt", "-o", "straight.ckpt", "--no-eval", *TRAIN))
    ok(fxquant(d, "convert", "trained.ckpt", "--backend", "torch", "-o", "reference.ckpt"))
    ok(fxquant(d, "verify", "reference.ckpt", "--reference", "trained.ckpt", "--test-subset", "48",
               "--batch-size", "16"))
    ok(fxquant(d, "inspect", "trained.ckpt", "--json", "layers.json", "--plot", "layers.png"))
    return d


def test_every_stage_writes_its_output_and_a_successful_report(run_dir: Path) -> None:
    stages = {
        "prepared.ckpt.report.json": ("prepare", "prepared.ckpt"),
        "half.ckpt.report.json": ("train", "half.ckpt"),
        "trained.ckpt.report.json": ("train", "trained.ckpt"),
        "reference.ckpt.report.json": ("convert", "reference.ckpt"),
        "layers.json.report.json": ("inspect", "layers.json"),
    }
    for name, (command, output) in stages.items():
        data = report(run_dir / name)
        assert (data["command"], data["exit_status"], data["error"]) == (command, 0, None)
        assert output in [o["path"] for o in data["outputs"].values()]
        written = next(o for o in data["outputs"].values() if o["path"] == output)
        assert written["sha256"] == hashlib.sha256((run_dir / output).read_bytes()).hexdigest()
        assert set(data["versions"]) >= {"fxquant", "torch", "python", "tvm"}
        assert set(data["timings"]) == {"started_at", "finished_at", "seconds"}


def test_reports_chain_by_hash(run_dir: Path) -> None:
    """Each stage's input hash is the previous stage's output hash: the lineage of an artifact."""
    prepared = report(run_dir / "prepared.ckpt.report.json")
    half = report(run_dir / "half.ckpt.report.json")
    trained = report(run_dir / "trained.ckpt.report.json")
    converted = report(run_dir / "reference.ckpt.report.json")
    assert half["inputs"]["checkpoint"]["sha256"] == prepared["outputs"]["checkpoint"]["sha256"]
    assert trained["inputs"]["checkpoint"]["sha256"] == half["outputs"]["checkpoint"]["sha256"]
    assert converted["inputs"]["checkpoint"]["sha256"] == trained["outputs"]["checkpoint"]["sha256"]
    assert prepared["inputs"]["config"]["path"] == "quant.yaml"
    assert prepared["settings"]["config"]["weight_bits"] == 4


def test_training_resumes_where_it_stopped(run_dir: Path) -> None:
    half = report(run_dir / "half.ckpt.report.json")["metrics"]
    trained = report(run_dir / "trained.ckpt.report.json")
    assert (half["steps_run"], half["global_step"], half["total_steps"], half["finished"]) == (2, 2, 4, False)
    assert trained["settings"]["resumed"] is True
    assert trained["settings"]["training"]["train_subset"] == 64  # the stored settings, not re-given
    metrics = trained["metrics"]
    assert (metrics["steps_run"], metrics["global_step"], metrics["finished"]) == (2, 4, True)
    assert 0.0 <= metrics["test_accuracy"] <= 100.0
    agreement = metrics["train_eval_agreement"]  # the end-of-schedule check, only once the schedule is done
    assert "train_eval_agreement" not in half and agreement["samples"] == 64
    assert agreement["gap"] == abs(agreement["train_accuracy"] - agreement["eval_accuracy"])
    # 2 + 2 resumed steps give exactly the checkpoint of 4 uninterrupted steps (weights, optimizer, RNG, all)
    assert (run_dir / "trained.ckpt").read_bytes() == (run_dir / "straight.ckpt").read_bytes()
    assert read_checkpoint(run_dir / "trained.ckpt").training["epoch"] == 1


def test_verify_reports_exact_agreement(run_dir: Path) -> None:
    data = report(run_dir / "reference.ckpt.verify.report.json")
    assert (data["command"], data["exit_status"]) == ("verify", 0)
    metrics = data["metrics"]
    assert metrics["samples"] == 48
    assert metrics["max_abs_diff"] == 0.0
    assert metrics["top1_agreement"] == 1.0
    assert metrics["candidate_accuracy"] == metrics["reference_accuracy"]


def test_inspect_table_json_and_png(run_dir: Path) -> None:
    table = json.loads((run_dir / "layers.json").read_text())
    layers = {row["name"]: row for row in table["layers"]}
    assert table["model"]["target"] == MODEL
    assert len(layers) == 10  # 7 convs + 2 shortcut convs + fc
    assert (layers["conv1"]["weight_bits"], layers["fc"]["act_bits"]) == (8, 8)  # first_last_bits
    assert {r["weight_bits"] for n, r in layers.items() if n not in ("conv1", "fc")} == {4}
    for row in layers.values():
        assert row["scheme"] == "dsq"
        assert 0 < row["weight_scale_min"] <= row["weight_scale_max"]
        assert row["act_low"] < row["act_high"]
        assert row["weight_sqnr_db"] > 0
    # a 4-bit grid keeps less of the weight than an 8-bit one (about 6 dB per bit on a uniform grid)
    assert layers["layer1.0.conv1"]["weight_sqnr_db"] < layers["fc"]["weight_sqnr_db"]
    png = (run_dir / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    rep = report(run_dir / "layers.json.report.json")
    assert rep["metrics"]["quantized_layers"] == 10
    assert rep["metrics"]["layers"] == table["layers"]


def test_same_inputs_give_identical_checkpoints_and_reports(run_dir: Path, tmp_path: Path) -> None:
    """The same command in another folder: the checkpoint is byte-identical, the report too outside timings."""
    ok(prepare_in(tmp_path))
    assert (tmp_path / "prepared.ckpt").read_bytes() == (run_dir / "prepared.ckpt").read_bytes()
    assert without_timings(tmp_path / "prepared.ckpt.report.json") == without_timings(
        run_dir / "prepared.ckpt.report.json"
    )


def test_same_seed_gives_a_byte_identical_trained_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    """Training is deterministic for a seed: another process writes the very same bytes."""
    shutil.copyfile(run_dir / "prepared.ckpt", tmp_path / "prepared.ckpt")
    ok(fxquant(tmp_path, "train", "prepared.ckpt", "-o", "straight.ckpt", "--no-eval", *TRAIN))
    assert (tmp_path / "straight.ckpt").read_bytes() == (run_dir / "straight.ckpt").read_bytes()


def test_search_writes_a_plan_within_budget_that_prepare_applies(tmp_path: Path) -> None:
    ok(fxquant(tmp_path, "search", "--model", MODEL, "--budget", "avg_weight_bits=3", "--train-subset", "64",
               "--batch-size", "16", "--steps", "6", "--no-progress", "-o", "plan.json",
               "--weights-out", "searched.pt"))
    plan = report(tmp_path / "plan.json")
    run = report(tmp_path / "plan.json.report.json")
    assert run["exit_status"] == 0 and run["metrics"]["achieved"] <= 3.0
    assert set(run["outputs"]) == {"plan", "weights"}
    searched = torch.load(tmp_path / "searched.pt", weights_only=True)
    counts = {k: int(v) for k, v in searched.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {6}  # every batch norm trained through the 6 search steps
    assert run["metrics"]["bits"] == plan["bits"]
    weight_bits = {name: wa[0] for name, wa in plan["bits"].items()}
    assert weight_bits["conv1"] == 8 and weight_bits["fc"] == 8  # first/last layers stay at 8 by default
    assert min(weight_bits.values()) < 8  # the budget forced the inner layers down
    (tmp_path / "quant.yaml").write_text(CONFIG)
    ok(fxquant(tmp_path, "prepare", "--model", MODEL, "--config", "quant.yaml", "--plan", "plan.json",
               "--weights", "searched.pt", "--calibration-batch", "8", "-o", "planned.ckpt"))
    ok(fxquant(tmp_path, "inspect", "planned.ckpt", "--json", "layers.json"))
    layers = {row["name"]: row for row in report(tmp_path / "layers.json")["layers"]}
    assert {name: row["weight_bits"] for name, row in layers.items()} == weight_bits
