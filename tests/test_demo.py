"""The demo pipeline on real Fashion-MNIST data, shrunk to a few hundred images."""

import json

import pytest

from fxquant.cli.demo import DemoSettings, run_demo
from fxquant.cli.main import main
from fxquant.data.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist is not installed"
)


def test_fashion_mnist_loader_reads_real_idx_files():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert abs(float(images.mean())) < 0.05 and 0.9 < float(images.std()) < 1.1  # normalised


def test_demo_pipeline_learns_and_reference_matches(capsys):
    settings = DemoSettings(float_epochs=1, qat_epochs=1, train_subset=1024, test_subset=512, batch_size=32)
    result = run_demo(settings, progress=False)
    assert result["float_accuracy"] > 30.0  # 10 classes: chance is 10%
    assert result["qat_eval_accuracy"] > 30.0
    assert result["integer_reference_accuracy"] == result["qat_eval_accuracy"]
    assert result["reference_matches_prepared_bitwise"] is True
    assert "integer reference" in capsys.readouterr().out


def test_cli_demo_writes_report(tmp_path):
    report = tmp_path / "demo.json"
    code = main(["demo", "--float-epochs", "1", "--qat-epochs", "1", "--train-subset", "256", "--test-subset", "128",
                 "--report", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["settings"]["weight_bits"] == 4 and data["reference_matches_prepared_bitwise"] is True
