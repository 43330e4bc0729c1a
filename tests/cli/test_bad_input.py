"""Bad input to the pipeline commands: each fails with exit status 1 and one line that says what is wrong
(usage errors: 2), writes a report holding the error, and leaves no output behind."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from fxquant.cli import main
from fxquant.data import FASHION_MNIST_DIR
from fxquant.model_spec import ModelSpec
from fxquant.quantizers.registry import available_quantizers

SPEC = ModelSpec("fxquant.models:resnet_small")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist is not installed"
)


@pytest.fixture(scope="module")
def prepared_bytes() -> bytes:
    """A small prepared checkpoint (random calibration, no data needed), as file contents."""
    torch.manual_seed(0)
    qmodel = fxquant.prepare(SPEC.build(), (torch.randn(4, 1, 28, 28),), fxquant.QuantConfig())
    return Checkpoint.from_prepared(qmodel, (1, 28, 28), SPEC).to_bytes()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def prepared(workdir: Path, prepared_bytes: bytes) -> Path:
    path = workdir / "prepared.ckpt"
    path.write_bytes(prepared_bytes)
    return path


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Exit status and the error line of ``fxquant ARGS`` (checked to be exactly one line)."""
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    if code != 0:
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"fxquant {args[0]}: error: ")
    return code, err


def failed_report(path: Path, error_type: str) -> dict:
    data = json.loads(path.read_text())
    assert data["exit_status"] == 1
    assert data["error"]["type"] == error_type
    return data


def test_untraceable_model_names_the_offending_line(workdir: Path, capsys) -> None:
    (workdir / "branchy_net.py").write_text(textwrap.dedent("""\
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3)

            def forward(self, x):
                if x.sum() > 0:
                    return self.conv(x)
                return self.conv(-x)

        def build():
            return Branchy()
        """))
    code, err = run(capsys, "prepare", "--model", "branchy_net:build", "--input-shape", "1,8,8", "-o", "p.ckpt")
    assert code == 1
    assert "cannot trace Branchy" in err
    assert re.search(r"branchy_net\.py:10 in forward\(\): `if x\.sum\(\) > 0:`", err), err
    assert not (workdir / "p.ckpt").exists()
    assert "branchy_net.py:10" in failed_report(workdir / "p.ckpt.report.json", "TracingError")["error"]["message"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bits.yaml", "weight_bits: 0\n", "bits.yaml: weight_bits=0 is invalid: expected an integer from 1 to 8"),
        ("bits.toml", "act_bits = 9\n", "bits.toml: act_bits=9 is invalid: expected an integer from 1 to 8"),
        ("q.toml", 'quantizer = "foo"\n',
         f"q.toml: quantizer='foo' is not a known quantizer; allowed: {', '.join(available_quantizers())}"),
        ("over.yaml", "overrides:\n  'layer1.*': {weight_bits: 12}\n",
         "over.yaml: overrides['layer1.*']: LayerOverride.weight_bits=12 is invalid: expected an integer from 1 to 8"),
        ("key.json", '{"weight_bit": 4}', "key.json: unknown config key(s) ['weight_bit']; allowed: act_bits, "),
        ("ex.yaml", "exclude: fc\n", "ex.yaml: exclude='fc' is invalid: expected a list of layer names or patterns"),
        ("syntax.yaml", "weight_bits: [4\n", "syntax.yaml: syntax error: "),
    ],
)
def test_bad_config_file_names_the_key_and_allowed_values(workdir: Path, capsys, name, text, message) -> None:
    (workdir / name).write_text(text)
    code, err = run(capsys, "prepare", "--model", SPEC.target, "--config", name, "--input-shape", "1,28,28",
                    "-o", "p.ckpt")
    assert code == 1
    assert err.startswith(f"fxquant prepare: error: {message}"), err
    assert not (workdir / "p.ckpt").exists()
    failed_report(workdir / "p.ckpt.report.json", "ConfigError")


def test_yaml_syntax_error_gives_the_line(workdir: Path, capsys) -> None:
    (workdir / "q.yaml").write_text("quantizer: dsq\nweight_bits: 4\nact_bits: [4\n")
    code, err = run(capsys, "prepare", "--model", SPEC.target, "--config", "q.yaml", "--input-shape", "1,28,28",
                    "-o", "p.ckpt")
    assert code == 1 and re.search(r"line \d+", err), err


def test_unknown_model_module_says_it_must_be_importable(workdir: Path, capsys) -> None:
    code, err = run(capsys, "prepare", "--model", "no_such_pkg.nets:build", "--input-shape", "1,8,8", "-o", "p.ckpt")
    assert code == 1
    assert "cannot import module 'no_such_pkg.nets'" in err and "PYTHONPATH" in err


def test_checkpoint_from_another_architecture_lists_the_differences(prepared: Path, capsys) -> None:
    """The spec's builder now makes another network (code changed since): refused, with the keys named."""
    checkpoint = read_checkpoint(prepared)
    other = dataclasses.replace(checkpoint, model=ModelSpec("fxquant.models:resnet20", {"in_channels": 1}))
    save_checkpoint(other, "other.ckpt")
    code, err = run(capsys, "convert", "other.ckpt", "-o", "ref.ckpt")
    assert code == 1
    assert "does not match the model built from fxquant.models:resnet20" in err
    assert re.search(r"\d+ key\(s\) missing from the checkpoint: layer1\.1\.", err), err
    assert "(+" in err  # only the first few keys are listed
    assert not Path("ref.ckpt").exists()
    failed_report(Path("ref.ckpt.report.json"), "CheckpointError")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], r"is truncated: the payload has \d+ bytes, the header says \d+"),
        (lambda raw: raw[:-100] + bytes(b ^ 0xFF for b in raw[-100:]), r"is corrupted: payload sha256 \w+"),
        (lambda raw: raw.replace(b"fxquant.checkpoint/1", b"fxquant.checkpoint/9", 1),
         r"checkpoint format 'fxquant.checkpoint/9' \(written by fxquant [\d.]+\) is not supported"),
        (lambda raw: raw[:30], r"header is truncated or corrupted"),
        (lambda raw: b"PK\x03\x04" + raw[4:], r"is not an fxquant checkpoint \(a plain torch.save file"),
        (lambda raw: b"", r"is not an fxquant checkpoint \(an empty file"),
    ],
)
def test_damaged_checkpoint_is_refused(prepared: Path, capsys, damage, message) -> None:
    prepared.write_bytes(damage(prepared.read_bytes()))
    code, err = run(capsys, "train", "prepared.ckpt", "-o", "t.ckpt")
    assert code == 1
    assert re.search(message, err), err
    assert not Path("t.ckpt").exists()


def test_input_of_the_wrong_shape_reaches_the_converted_model(prepared: Path, capsys) -> None:
    """An ImageFolder of 8x8 images against a model prepared for 28x28: InputError from the reference."""
    from PIL import Image

    for label in ("a", "b"):
        (prepared.parent / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=60 * i + 10).save(prepared.parent / "imgs" / label / f"{i}.png")
    assert run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")[0] == 0
    code, err = run(capsys, "verify", "ref.ckpt", "--reference", "prepared.ckpt", "--data", "imgs")
    assert code == 1
    assert err.endswith("expected input of shape (N, 1, 28, 28) float32, got shape (4, 1, 8, 8)"), err
    failed_report(Path("ref.ckpt.verify.report.json"), "InputError")


@needs_fashion_mnist
def test_nan_during_qat_is_reported_with_the_layer(prepared: Path, capsys) -> None:
    code, err = run(capsys, "train", "prepared.ckpt", "-o", "t.ckpt", "--lr", "1e30", "--train-subset", "32",
                    "--batch-size", "16", "--no-eval")
    assert code == 1
    assert re.search(r"loss became nan at step \d+; first non-finite output in layer '[\w.]+'", err), err
    assert not Path("t.ckpt").exists()
    failed_report(Path("t.ckpt.report.json"), "NumericsError")


def test_existing_output_needs_force(prepared: Path, capsys) -> None:
    Path("ref.ckpt").write_text("an earlier result")
    code, err = run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")
    assert (code, err) == (1, "fxquant convert: error: output ref.ckpt already exists; pass --force to overwrite")
    assert Path("ref.ckpt").read_text() == "an earlier result"
    assert run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt", "--force")[0] == 0
    assert read_checkpoint("ref.ckpt").kind == "reference"
    # the successful run's report is now protected as well
    code, err = run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")
    assert code == 1 and "ref.ckpt, ref.ckpt.report.json already exist" in err


def test_a_failed_runs_report_does_not_block_a_retry(prepared: Path, capsys) -> None:
    Path("bits.yaml").write_text("weight_bits: 0\n")
    args = ["prepare", "--model", SPEC.target, "--input-shape", "1,28,28", "--calibration-batch", "2", "-o", "p.ckpt"]
    assert run(capsys, *args, "--config", "bits.yaml")[0] == 1
    Path("bits.yaml").write_text("weight_bits: 3\n")
    assert run(capsys, *args, "--config", "bits.yaml")[0] == 0
    assert json.loads(Path("p.ckpt.report.json").read_text())["exit_status"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["prepare", "--model", SPEC.target, "--model-kwargs", "[1, 2]", "-o", "p.ckpt"],
        ["prepare", "--model", SPEC.target, "--input-shape", "1,x,28", "-o", "p.ckpt"],
        ["train", "prepared.ckpt", "-o", "t.ckpt", "--steps", "0"],
        ["verify", "ref.ckpt"],
        ["convert", "prepared.ckpt", "--backend", "no-such-backend", "-o", "x"],
        ["search", "--model", SPEC.target, "--budget", "3", "-o", "plan.json"],
    ],
)
def test_usage_errors_exit_2(workdir: Path, capsys, args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not list(workdir.iterdir())  # not even a report


@needs_fashion_mnist
def test_budget_that_cannot_be_met(workdir: Path, capsys) -> None:
    code, err = run(capsys, "search", "--model", SPEC.target, "--budget", "avg_weight_bits=1", "--train-subset", "16",
                    "--batch-size", "16", "-o", "plan.json")
    assert code == 1
    assert re.search(r"budget avg_weight_bits=1 cannot be met: the minimum achievable avg_weight_bits is [\d.]+", err)
    assert not Path("plan.json").exists()
    failed_report(Path("plan.json.report.json"), "BudgetError")


class CumsumNet(nn.Module):
    """A conv, then an op the TVM backends do not lower (logcumsumexp), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.logcumsumexp(torch.relu(self.conv(x)), dim=1)
        return self.fc(x.mean((2, 3)))


def build_cumsum_net() -> CumsumNet:
    return CumsumNet()


def test_op_no_backend_supports_is_listed(workdir: Path, capsys) -> None:
    pytest.importorskip("fxquant.backends.tvm")
    spec = ModelSpec(f"{__name__}:build_cumsum_net")
    qmodel = fxquant.prepare(spec.build(), (torch.randn(2, 1, 8, 8),), fxquant.QuantConfig())
    save_checkpoint(Checkpoint.from_prepared(qmodel, (1, 8, 8), spec), "cumsum.ckpt")
    code, err = run(capsys, "convert", "cumsum.ckpt", "--backend", "tvm-llvm", "-o", "build.json")
    assert code == 1
    assert re.search(r"1 unsupported op\(s\): - .*logcumsumexp", err), err
    assert not Path("build.json").exists()
    failed_report(Path("build.json.report.json"), "UnsupportedOpError")
