"""Two processes writing one output path: every read, during and after, sees one complete file, never a mix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import fxquant
from fxquant.io.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from fxquant.io.model_spec import ModelSpec
from tests.conftest import TinyNet

WRITER = textwrap.dedent("""\
    import sys
    from fxquant.io.checkpoint import read_checkpoint, save_checkpoint
    source, target, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    checkpoint = read_checkpoint(source)
    print("ready", flush=True)
    sys.stdin.readline()  # both writers start together
    for _ in range(rounds):
        save_checkpoint(checkpoint, target, force=True)
    """)


def test_two_writers_leave_one_complete_checkpoint(tmp_path: Path) -> None:
    sources = []
    for classes in (3, 4):  # two different checkpoints, so a mix of them would show
        qmodel = fxquant.prepare(TinyNet(classes=classes), (torch.randn(2, 3, 8, 8),), fxquant.QuantConfig())
        sources.append(tmp_path / f"source{classes}.ckpt")
        save_checkpoint(Checkpoint.from_prepared(qmodel, (3, 8, 8), ModelSpec("tests.conftest:TinyNet")), sources[-1])
    contents = {p.read_bytes() for p in sources}
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(target), "12"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
        for src in sources
    ]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    reads = 0
    while any(w.poll() is None for w in writers):
        if target.exists():
            assert target.read_bytes() in contents  # a reader never sees half a file or a mix
            reads += 1
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert target.read_bytes() in contents and reads > 0
    assert read_checkpoint(target).kind == "prepared"  # header, length and hash all check out
    assert [p.name for p in out.iterdir()] == ["model.ckpt"]  # no temporary file left behind
