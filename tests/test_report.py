"""Run reports: everything but the timings section is a function of the inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fxquant.errors import ConfigError
from fxquant.io.run_report import RunReport, jsonable


def make(tmp_path: Path, name: str) -> dict:
    (tmp_path / "in.txt").write_text("data")
    report = RunReport("train", {"output": Path("out.ckpt"), "lr": 0.1, "shape": (1, 28, 28)})
    report.add_input("data", tmp_path / "in.txt")
    with report.phase("work"):
        report.metrics["loss"] = 0.25
    report.exit_status = 0
    report.write(tmp_path / name)
    return json.loads((tmp_path / name).read_text())


def test_reports_differ_only_in_timings(tmp_path: Path) -> None:
    first, second = make(tmp_path, "a.json"), make(tmp_path, "b.json")
    assert set(first["timings"]["seconds"]) == {"total", "work"}
    first.pop("timings"), second.pop("timings")
    assert first == second
    assert first["arguments"] == {"output": "out.ckpt", "lr": 0.1, "shape": [1, 28, 28]}
    assert first["inputs"]["data"]["sha256"] == hashlib.sha256(b"data").hexdigest()
    assert first["versions"]["fxquant"] and first["versions"]["torch"]


def test_failure_records_the_error() -> None:
    report = RunReport("prepare", {})
    report.fail(ConfigError("weight_bits=0 is invalid"))
    data = report.to_dict()
    assert (data["exit_status"], data["error"]) == (1, {"type": "ConfigError", "message": "weight_bits=0 is invalid"})


def test_jsonable_makes_non_finite_floats_null() -> None:
    assert jsonable({"a": float("nan"), "b": [float("inf"), 1.5], 3: Path("x")}) == {"a": None, "b": [None, 1.5],
                                                                                      "3": "x"}
