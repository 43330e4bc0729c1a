"""Bad input to the pipeline commands: each fails with exit status 1 and one line that says what is wrong
(usage errors: 2), writes a report holding the error, and leaves no output behind."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxquant
from fxquant.cli.main import main
from fxquant.data.fashion_mnist import FASHION_MNIST_DIR
from fxquant.io.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from fxquant.io.model_spec import ModelSpec
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

        def build() -> nn.Module:
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
        # overrides are checked as strictly as the top-level options
        ("ex.yaml", "overrides:\n  fc: {exclude: 'false'}\n",
         "ex.yaml: overrides['fc']: LayerOverride.exclude='false' is invalid: expected True or False"),
        ("pc.yaml", "overrides:\n  'layer1.*': {per_channel: 'no'}\n",
         "pc.yaml: overrides['layer1.*']: LayerOverride.per_channel='no' is invalid: expected True, False or None"),
        ("int.yaml", "overrides:\n  1: {weight_bits: 2}\n", "int.yaml: overrides key 1 is invalid: expected a layer"),
        ("flat.yaml", "overrides:\n  exclude: 'false'\n", "flat.yaml: overrides['exclude']='false' is invalid"),
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
        (lambda raw: raw.replace(b"fxquant.io.checkpoint/1", b"fxquant.io.checkpoint/9", 1),
         r"checkpoint format 'fxquant.io.checkpoint/9' \(written by fxquant [\d.]+\) is not supported"),
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
    # the refused rerun does not replace the successful run's report with its failure
    code, err = run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")
    assert code == 1 and "output ref.ckpt already exists" in err
    assert json.loads(Path("ref.ckpt.report.json").read_text())["exit_status"] == 0


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


@needs_fashion_mnist
def test_latency_budget_that_cannot_be_met_names_the_lowest_latency(workdir: Path, capsys) -> None:
    code, err = run(capsys, "search", "--model", SPEC.target, "--budget", "latency_ms=1e-6", "--target", "host",
                    "--cost-model", "model", "--train-subset", "16", "--batch-size", "16", "-o", "plan.json")
    assert code == 1
    assert re.search(r"budget latency_ms=1e-06 cannot be met: the minimum achievable latency_ms is [\d.]+", err)
    assert not Path("plan.json").exists()
    code, err = run(capsys, "search", "--model", SPEC.target, "--budget", "latency_ms=1", "--target", "cortex-x9",
                    "--train-subset", "16", "-o", "plan.json")
    assert code != 0 and "Budget.target='cortex-x9' is invalid" in err


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


# -- outputs: never lost, never colliding, checked before the work ------------------------------------------


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its contents (to show that nothing was lost or changed)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def nothing_lost(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every file is still there, unchanged; the only new files are reports of the failed run."""
    assert {k: after.get(k) for k in before} == before
    for name in set(after) - set(before):
        assert name.endswith(".report.json") and json.loads(after[name])["exit_status"] == 1, name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "prepared.ckpt", "-o", "x.ckpt", "--report", "x.ckpt"],
         "-o x.ckpt and --report x.ckpt name the same path"),
        (["convert", "prepared.ckpt", "-o", "prepared.ckpt", "--force"], "-o prepared.ckpt is the input checkpoint"),
        (["convert", "prepared.ckpt", "-o", "link.ckpt", "--force"], "-o link.ckpt is the input checkpoint"),
        (["convert", "prepared.ckpt", "-o", "ref.ckpt", "--report", "prepared.ckpt", "--force"],
         "--report prepared.ckpt is the input checkpoint"),
        (["train", "prepared.ckpt", "-o", "prepared.ckpt", "--force"], "-o prepared.ckpt is the input checkpoint"),
        (["inspect", "prepared.ckpt", "--json", "t.out", "--plot", "t.out"],
         "--json t.out and --plot t.out name the same path"),
        (["search", "--model", SPEC.target, "--budget", "avg_weight_bits=3", "-o", "p.json", "--weights-out", "p.json"],
         "-o p.json and --weights-out p.json name the same path"),
        (["prepare", "--model", SPEC.target, "--config", "q.yaml", "-o", "q.yaml", "--force"],
         "-o q.yaml is the input --config q.yaml"),
        (["convert", "prepared.ckpt", "-o", "."], "-o . is a folder; expected a file path"),
        (["convert", "prepared.ckpt", "-o", "sub"], "-o sub is a folder; expected a file path"),
        (["convert", "prepared.ckpt", "-o", "q.yaml/ref.ckpt"], "q.yaml is not a folder"),
        (["verify", "prepared.ckpt", "--reference", "prepared.ckpt", "--report", "prepared.ckpt"],
         "--report prepared.ckpt is the input artifact prepared.ckpt"),
    ],
)
def test_outputs_colliding_with_outputs_or_inputs_are_refused(prepared: Path, capsys, args, message) -> None:
    Path("q.yaml").write_text("weight_bits: 4\n")
    Path("link.ckpt").symlink_to("prepared.ckpt")
    Path("sub").mkdir()
    before = files(prepared.parent)
    code, err = run(capsys, *args)
    assert code == 1
    assert message in err, err
    nothing_lost(before, files(prepared.parent))


def test_unwritable_output_folder_fails_before_the_work(prepared: Path, capsys, monkeypatch) -> None:
    """os.access says the folder is read-only (as it would for a non-root user of a 0555 folder)."""
    import os

    Path("ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p).resolve() == Path("ro").resolve()
                        else real_access(p, m))
    monkeypatch.setattr("fxquant.cli.convert.read_checkpoint", lambda path: pytest.fail("the work started"))
    code, err = run(capsys, "convert", "prepared.ckpt", "-o", "ro/ref.ckpt", "--report", "r.json")
    assert code == 1 and err.endswith("-o ro/ref.ckpt: folder ro is not writable"), err


def test_a_full_disk_gives_one_line_and_keeps_the_old_output(prepared: Path, capsys, monkeypatch) -> None:
    import errno
    import os

    assert run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")[0] == 0
    before = files(prepared.parent)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    code, err = run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt", "--force")
    assert (code, err) == (1, "fxquant convert: error: cannot write ref.ckpt: No space left on device")
    assert files(prepared.parent) == before


def test_force_never_replaces_a_folder_fxquant_did_not_write(prepared: Path, capsys) -> None:
    pytest.importorskip("fxquant.backends.tvm")
    Path("build").mkdir()
    Path("build/notes.txt").write_text("mine")
    Path("build/manifest.json").write_text('{"format": "fxquant-tvm-artifact/1"}')
    before = files(prepared.parent)
    code, err = run(capsys, "convert", "prepared.ckpt", "--backend", "tvm-arm", "-o", "build", "--force")
    assert code == 1
    assert err.endswith("refusing to replace -o build: it holds files fxquant did not write (notes.txt); "
                        "remove it yourself or choose another path"), err
    Path("build/notes.txt").unlink()
    Path("prepared.ckpt").rename("build/prepared.ckpt")  # the input inside the folder it would replace
    code, err = run(capsys, "convert", "build/prepared.ckpt", "--backend", "tvm-arm", "-o", "build", "--force")
    assert code == 1 and err.endswith("-o build holds the input checkpoint build/prepared.ckpt; write the output "
                                      "elsewhere"), err
    Path("build/prepared.ckpt").rename("prepared.ckpt")
    Path("build/notes.txt").write_text("mine")
    nothing_lost(before, files(prepared.parent))


def test_a_second_run_on_a_locked_output_fails_at_once_and_writes_nothing(prepared: Path, capsys) -> None:
    from fxquant.io.output_files import output_lock

    assert run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")[0] == 0
    before = files(prepared.parent)
    with output_lock([Path("ref.ckpt")]):  # another run is writing ref.ckpt
        code, err = run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt", "--force")
        assert code == 1 and "ref.ckpt is being written by another fxquant run (pid " in err, err
    assert files(prepared.parent) == before  # in particular, the winner's report is untouched


def test_report_describes_the_published_output_and_the_threads(prepared: Path, capsys) -> None:
    """The report's sha256 is that of the file at the output path, and stale temporaries of a killed run
    (dead process id) are removed by the next run on the same output."""
    import hashlib

    stale = Path(".ref.ckpt.fxq-4206969-dead.tmp")
    stale.write_bytes(b"half a checkpoint")
    assert run(capsys, "convert", "prepared.ckpt", "-o", "ref.ckpt")[0] == 0
    data = json.loads(Path("ref.ckpt.report.json").read_text())
    assert data["outputs"]["reference"]["sha256"] == hashlib.sha256(Path("ref.ckpt").read_bytes()).hexdigest()
    assert data["threads"]["torch"] == torch.get_num_threads() and data["threads"]["cpus"] >= 1
    assert not stale.exists()
    assert sorted(p.name for p in Path().iterdir()) == ["prepared.ckpt", "ref.ckpt", "ref.ckpt.report.json"]


def test_inspect_and_verify_rerun_over_their_own_reports(prepared: Path, capsys) -> None:
    from PIL import Image

    for label in ("a", "b"):
        Path("imgs", label).mkdir(parents=True)
        Image.new("L", (28, 28), color=100).save(Path("imgs", label, "0.png"))
    for _ in range(2):
        assert run(capsys, "inspect", "prepared.ckpt")[0] == 0
        assert run(capsys, "verify", "prepared.ckpt", "--reference", "prepared.ckpt", "--data", "imgs")[0] == 0
    assert json.loads(Path("prepared.ckpt.inspect.report.json").read_text())["exit_status"] == 0
    Path("other.json").write_text("not a report")  # a file that is not its own report still needs --force
    code, err = run(capsys, "inspect", "prepared.ckpt", "--report", "other.json")
    assert code == 1 and "output other.json already exists" in err
    assert Path("other.json").read_text() == "not a report"


# -- inputs that used to end in a traceback -----------------------------------------------------------------


def test_non_utf8_config_and_plan(workdir: Path, capsys) -> None:
    Path("q.yaml").write_bytes(b"weight_bits: 4\n# \xff\xfe\n")
    Path("plan.json").write_bytes(b'{"format": "\xff"}')
    args = ["prepare", "--model", SPEC.target, "--input-shape", "1,28,28", "-o", "p.ckpt"]
    code, err = run(capsys, *args, "--config", "q.yaml")
    assert code == 1 and "q.yaml: not UTF-8 text" in err, err
    code, err = run(capsys, *args, "--plan", "plan.json")
    assert code == 1 and "cannot read bitwidth plan plan.json: 'utf-8' codec can't decode" in err, err
    Path("plan.json").write_text('["not", "a", "plan"]')
    code, err = run(capsys, *args, "--plan", "plan.json")
    assert code == 1 and "bitwidth plan plan.json: expected a JSON object, got list" in err, err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from torch import nn\ndef build() -> nn.Module:\n    raise RuntimeError('no weights here')\n",
         "model spec {name}:build: the builder raised RuntimeError: no weights here"),
        ("def build(:\n", r"importing module '{name}' failed \(.*{name}\.py:1\): SyntaxError"),
        ("raise ValueError('at import')\ndef build(): pass\n",
         "importing module '{name}' failed: ValueError: at import"),
    ],
)
def test_model_builder_that_fails(workdir: Path, capsys, source: str, message: str) -> None:
    name = f"broken_net_{abs(hash(source))}"  # one module per case: sys.path keeps earlier test folders
    (workdir / f"{name}.py").write_text(source)
    code, err = run(capsys, "prepare", "--model", f"{name}:build", "--input-shape", "1,8,8", "-o", "p.ckpt")
    assert code == 1 and re.search(message.format(name=name), err), err


def test_a_damaged_image_in_the_data_folder_is_named(prepared: Path, capsys) -> None:
    from PIL import Image

    Path("imgs/a").mkdir(parents=True)
    Image.new("L", (28, 28)).save("imgs/a/0.png")
    Path("imgs/a/1.png").write_bytes(b"not a png")
    code, err = run(capsys, "verify", "prepared.ckpt", "--reference", "prepared.ckpt", "--data", "imgs")
    assert code == 1 and "data folder imgs: cannot read image imgs/a/1.png: UnidentifiedImageError" in err, err


def test_a_checkpoint_with_a_bad_input_shape(prepared: Path, capsys) -> None:
    checkpoint = read_checkpoint(prepared)
    save_checkpoint(dataclasses.replace(checkpoint, input_shape=(1, 0, 28)), "bad.ckpt")
    code, err = run(capsys, "convert", "bad.ckpt", "-o", "ref.ckpt")
    assert code == 1 and err.endswith("bad.ckpt: input_shape [1, 0, 28] is invalid: expected positive integers like "
                                      "[1, 28, 28]"), err


def test_a_malformed_artifact_manifest(prepared: Path, capsys) -> None:
    pytest.importorskip("fxquant.backends.tvm")
    Path("art").mkdir()
    for name in ("model.so", "run_model.py"):
        Path("art", name).write_bytes(b"x")
    for text, message in [("[1, 2]", "is not an fxquant TVM artifact manifest (format 'list'"),
                          ('{"format": "fxquant-tvm-artifact/1", "files": []}', "has no files.model.so entry"),
                          ("{", "is not valid JSON")]:
        Path("art/manifest.json").write_text(text)
        code, err = run(capsys, "verify", "art", "--reference", "prepared.ckpt", "--integrity-only")
        assert code == 1 and message in err, err


# -- NaN and Inf --------------------------------------------------------------------------------------------


def test_nan_weights_are_refused_at_convert_naming_the_layer(prepared: Path, capsys) -> None:
    checkpoint = read_checkpoint(prepared)
    state = dict(checkpoint.state_dict)
    key = next(k for k in state if k.startswith("layer1.0.conv1.") and k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_checkpoint(dataclasses.replace(checkpoint, state_dict=state), "nan.ckpt")
    code, err = run(capsys, "convert", "nan.ckpt", "-o", "ref.ckpt")
    assert code == 1 and re.search(r"layer 'layer1\.0\.conv1': \w+ holds \d+ non-finite value", err), err
    assert not Path("ref.ckpt").exists()


def test_non_finite_inputs_are_refused_by_the_reference_and_at_calibration(prepared_bytes: bytes) -> None:
    reference = fxquant.convert(Checkpoint.from_bytes(prepared_bytes).build_prepared())
    from fxquant.input_guard import InputGuard

    guarded = InputGuard(reference, (1, 28, 28))
    x = torch.zeros(2, 1, 28, 28)
    guarded(x)
    x[1, 0, 3, 3] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(fxquant.errors.InputError, match=r"the input holds 2 non-finite value\(s\) \(1 NaN, 1 Inf\)"):
        guarded(x)
    with pytest.raises(fxquant.errors.InputError, match=r"example input 0 \(calibration data\) holds 1 non-finite"):
        fxquant.prepare(SPEC.build(), (torch.where(x.isinf(), 0.0, x),))


def test_the_tvm_module_refuses_non_finite_inputs() -> None:
    pytest.importorskip("fxquant.backends.tvm")
    from fxquant.backends.tvm.lower import TensorSpec
    from fxquant.backends.tvm.runtime import check_inputs

    spec = TensorSpec("x", (1, 2), "float32")
    check_inputs([spec], (torch.zeros(1, 2),))
    with pytest.raises(fxquant.errors.InputError, match=r"input 'x' holds 1 non-finite value\(s\) \(1 NaN, 0 Inf\)"):
        check_inputs([spec], (torch.tensor([[0.0, float("nan")]]),))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.write_bytes(b"not an array"), "input x: cannot read x.npy as a .npy array: "),
        (lambda path: np.save(path, np.array([{"a": 1}], dtype=object)), "input x: cannot read x.npy as a .npy array"),
        (lambda path: None, "input x: cannot read x.npy as a .npy array: [Errno 2] No such file or directory"),
        (lambda path: np.save(path, np.zeros((1, 3), np.float32)),
         "input x: expected [1, 2] float32, got [1, 3] float32"),
        (lambda path: np.save(path, np.array([[0, np.nan]], np.float32)), "input x: x.npy holds NaN or Inf values"),
    ],
)
def test_run_model_exits_2_with_one_line_on_a_bad_npy(workdir: Path, capsys, monkeypatch, make, message) -> None:
    """The device runner checks its inputs before it loads model.so (a stand-in here)."""
    pytest.importorskip("tvm")
    import hashlib

    from fxquant.backends.tvm import run_model

    monkeypatch.setenv("TVM_USE_RUNTIME_LIB", "1")  # run() sets it for its own process; keep it out of this one
    Path("art").mkdir()
    Path("art/model.so").write_bytes(b"stand-in")
    manifest = {"files": {"model.so": {"sha256": hashlib.sha256(b"stand-in").hexdigest()}},
                "inputs": [{"name": "x", "shape": [1, 2], "dtype": "float32"}]}
    Path("art/manifest.json").write_text(json.dumps(manifest))
    make(Path("x.npy"))
    with pytest.raises(SystemExit) as exc:
        run_model.main(["--artifact", "art", "--input", "x.npy", "--output-dir", "out"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"run_model: {message}"), err
    assert not Path("out").exists()
