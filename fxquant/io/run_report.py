"""The JSON report every pipeline command writes, success or failure.

Everything in a report is a function of the inputs, the arguments and the installed versions, so two runs
with the same inputs and seed give byte-identical reports, except the ``timings`` section (wall-clock
times and timestamps), which is kept apart so that a pipeline can diff the rest.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fxquant.io.output_files import sha256_path, write_text_atomic
from fxquant.tvm_host import default_threads, pool_size
from fxquant.version import __version__

__all__ = ["REPORT_FORMAT", "RunReport", "versions", "thread_counts", "jsonable"]

REPORT_FORMAT = "fxquant.io.run_report/1"
#: distribution name -> report key; tvm is looked up without importing it (that takes seconds)
_DISTRIBUTIONS = {"torch": "torch", "torchvision": "torchvision", "apache-tvm": "tvm", "numpy": "numpy"}


def versions() -> dict[str, str | None]:
    """Versions of fxquant, Python and the libraries that shape the numbers (``None`` when not installed)."""
    out: dict[str, str | None] = {"fxquant": __version__, "python": platform.python_version()}
    for dist, key in _DISTRIBUTIONS.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def thread_counts() -> dict[str, int | None]:
    """The thread counts the numbers may depend on (float reductions are summed in another order with more
    threads): torch's intra-op pool, the TVM pool as sized by this run (None when unused), and the CPUs."""
    import torch

    return {"torch": torch.get_num_threads(), "tvm": pool_size(), "cpus": default_threads()}


def jsonable(value: Any) -> Any:
    """Plain JSON data: paths as given, tuples as lists, non-finite floats as ``None``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class RunReport:
    """Collects what a command read, wrote and measured; :meth:`write` stores it as sorted JSON.

    Example::

        report = RunReport("train", {"steps": 10})
        report.add_input("checkpoint", "prepared.ckpt")
        with report.phase("train"):
            ...
        report.metrics["train_loss"] = 0.41
        report.write("trained.ckpt.report.json")
    """

    def __init__(self, command: str, arguments: Mapping[str, Any]):
        self.command = command
        self.arguments = jsonable(arguments)
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.exit_status: int | None = None
        self.error: dict[str, str] | None = None
        self._seconds: dict[str, float] = {}
        self._started_at = _now()
        self._t0 = time.perf_counter()

    def add_input(self, role: str, path: str | os.PathLike, **facts: Any) -> None:
        self.inputs[role] = {"path": os.fspath(path), "sha256": sha256_path(path), **jsonable(facts)}

    def add_output(self, role: str, path: str | os.PathLike, **facts: Any) -> None:
        self.outputs[role] = {"path": os.fspath(path), "sha256": sha256_path(path), **jsonable(facts)}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the command (reported under ``timings.seconds``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0

    def fail(self, exc: BaseException, exit_status: int = 1) -> None:
        self.exit_status = exit_status
        self.error = {"type": type(exc).__name__, "message": str(exc)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "command": self.command,
            "arguments": self.arguments,
            "exit_status": self.exit_status,
            "error": self.error,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "settings": jsonable(self.settings),
            "metrics": jsonable(self.metrics),
            "versions": versions(),
            "threads": thread_counts(),
            "timings": {
                "started_at": self._started_at,
                "finished_at": _now(),
                "seconds": {"total": time.perf_counter() - self._t0, **self._seconds},
            },
        }

    def write(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
