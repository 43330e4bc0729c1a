"""Outputs are written atomically and never replaced without force; folders hash by names and contents."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxquant.output_files import OutputExistsError, check_writable, sha256_path, write_bytes_atomic


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
