"""Outputs are written atomically and never replaced without force; folders hash by names and contents."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fxquant.io.output_files import (
    STALE_AFTER_S,
    Output,
    OutputError,
    OutputExistsError,
    check_outputs,
    check_writable,
    clean_stale_temps,
    manifest_owner,
    output_lock,
    publish_folder,
    recover_folder,
    sha256_path,
    staging_folder,
    write_bytes_atomic,
)


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_check_writable_names_every_existing_output(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").write_text("x")
    check_writable([tmp_path / "c"], force=False)
    check_writable([tmp_path / "a"], force=True)
    with pytest.raises(OutputExistsError, match=r"outputs .*a, .*b already exist; pass --force to overwrite"):
        check_writable([tmp_path / "a", tmp_path / "b", tmp_path / "c"], force=False)


def test_folder_hash_depends_on_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "d" / "x").mkdir(parents=True)
    (tmp_path / "d" / "x" / "f").write_bytes(b"1")
    first = sha256_path(tmp_path / "d")
    assert sha256_path(tmp_path / "d") == first
    (tmp_path / "d" / "x" / "f").write_bytes(b"2")
    second = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "x" / "f").rename(tmp_path / "d" / "x" / "g")
    assert len({first, second, sha256_path(tmp_path / "d")}) == 3


# -- outputs checked before the work ------------------------------------------------------------------------


def _out(path: Path, role: str = "-o", **kw) -> Output:
    return Output(path, role, **kw)


def test_outputs_that_collide_with_each_other_or_an_input_are_refused(tmp_path: Path) -> None:
    (tmp_path / "in.ckpt").write_bytes(b"input")
    (tmp_path / "link.ckpt").symlink_to(tmp_path / "in.ckpt")
    with pytest.raises(OutputError, match=r"--report .*x\.json and -o .*x\.json name the same path"):
        check_outputs([_out(tmp_path / "x.json", "--report"), _out(tmp_path / "sub" / ".." / "x.json")], [], False)
    with pytest.raises(OutputError, match=r"-o .*link\.ckpt is the input checkpoint .*in\.ckpt"):
        check_outputs([_out(tmp_path / "link.ckpt")], [("checkpoint", tmp_path / "in.ckpt")], True)
    os.link(tmp_path / "in.ckpt", tmp_path / "hard.ckpt")
    with pytest.raises(OutputError, match=r"-o .*hard\.ckpt is the input checkpoint"):
        check_outputs([_out(tmp_path / "hard.ckpt")], [("checkpoint", tmp_path / "in.ckpt")], True)
    with pytest.raises(OutputError, match=r"-o .* holds the input checkpoint"):
        check_outputs([_out(tmp_path, folder=True)], [("checkpoint", tmp_path / "in.ckpt")], True)
    check_outputs([_out(tmp_path / "a"), _out(tmp_path / "b", "--report")], [("checkpoint", tmp_path / "in.ckpt")],
                  False)


def test_folders_files_and_unwritable_parents_are_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"-o \. is a folder; expected a file path"):
        monkeypatch.chdir(tmp_path)
        check_outputs([_out(Path("."))], [], True)
    with pytest.raises(OutputError, match=r"-o .*file is a file; expected a folder"):
        check_outputs([_out(tmp_path / "file", folder=True)], [], True)
    with pytest.raises(OutputError, match=r"file is not a folder"):
        check_outputs([_out(tmp_path / "file" / "out.ckpt")], [], False)
    real_access = os.access  # root may write anywhere: make the folder read-only as seen by os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(OutputError, match=r"-o .*ro/new/out\.ckpt: folder .*ro is not writable"):
        check_outputs([_out(tmp_path / "ro" / "new" / "out.ckpt")], [], False)


def test_force_replaces_only_folders_the_owner_check_accepts(tmp_path: Path) -> None:
    owned = manifest_owner(("model.so", "manifest.json"), ("fmt/1",))
    target = tmp_path / "art"
    target.mkdir()
    (target / "model.so").write_bytes(b"old")
    (target / "manifest.json").write_text(json.dumps({"format": "fmt/1"}))
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"refusing to replace -o .*art: it holds files fxquant did not write "
                                          r"\(notes\.txt\)"):
        check_outputs([_out(target, folder=True, owned=owned)], [], True)
    staging = staging_folder(target)
    (staging / "model.so").write_bytes(b"new")
    with pytest.raises(OutputError, match="notes.txt"):
        publish_folder(staging, target, owned)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    publish_folder(staging, target, owned)
    assert (target / "model.so").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging or backup left


def test_folder_replacement_interrupted_between_renames_is_recovered(tmp_path: Path, monkeypatch) -> None:
    """Without an atomic exchange the old folder is moved aside first; a crash before the new one is moved in
    leaves no folder at the path, and the next run puts the old one back."""
    from fxquant.io import output_files

    target = tmp_path / "art"
    target.mkdir()
    (target / "a").write_text("old")
    staging = staging_folder(target)
    monkeypatch.setattr(output_files, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_the_second_rename(src, dst):
        if Path(src) == staging:
            raise KeyboardInterrupt  # the process dies here
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(staging, target, lambda p: None)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()
    recover_folder(target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", staging.name])  # staging: removed when stale


def test_the_atomic_exchange_swaps_folders(tmp_path: Path) -> None:
    from fxquant.io.output_files import _exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    assert (tmp_path / "b" / "x").read_text() == "a" and not (tmp_path / "a" / "x").exists()


def test_stale_temporaries_of_dead_or_old_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.ckpt"
    dead = 2**22 + 12345  # above pid_max on default kernels
    stale_file = tmp_path / f".out.ckpt.fxq-{dead}-abc.tmp"
    stale_dir = tmp_path / f".out.ckpt.fxq-{dead}-xyz"
    live = tmp_path / f".out.ckpt.fxq-{os.getppid()}-live.tmp"
    old_live = tmp_path / f".out.ckpt.fxq-{os.getppid()}-old.tmp"
    other = tmp_path / f".other.ckpt.fxq-{dead}-abc.tmp"
    for path in (stale_file, live, old_live, other):
        path.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "model.so").write_bytes(b"x")
    os.utime(old_live, (time.time() - STALE_AFTER_S - 10,) * 2)
    assert sorted(p.name for p in clean_stale_temps(out)) == sorted([stale_file.name, stale_dir.name, old_live.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_an_output_is_locked_for_one_run_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "out.ckpt"
    with output_lock([out]):
        with pytest.raises(OutputError, match=rf"{out} is being written by another fxquant run \(pid {os.getpid()}\)"):
            with output_lock([out, tmp_path / "other"]):
                pass
        assert not (tmp_path / ".other.fxq-lock").exists()  # the failed attempt released what it took
    assert list(tmp_path.iterdir()) == []
    with output_lock([out]):
        pass


def test_write_failures_name_the_file_and_keep_the_old_one(tmp_path: Path, monkeypatch) -> None:
    import errno

    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(OutputError, match=r"cannot write .*folder: Is a directory"):
        (tmp_path / "folder").mkdir()
        write_bytes_atomic(tmp_path / "folder", b"x")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputError, match=r"cannot write .*out\.bin: No space left on device"):
        write_bytes_atomic(tmp_path / "out.bin", b"new")
    assert (tmp_path / "out.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.bin"]
