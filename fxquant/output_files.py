"""Safe output files for pipeline stages: never overwrite without ``force``, never leave half a file.

Every file is written to a temporary sibling and moved into place with :func:`os.replace`, which is atomic
on one file system: a crash or a full disk leaves the previous file (or none), never a truncated one.
Content hashes (:func:`sha256_path`) let reports tie each output to the exact inputs that made it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from fxquant.errors import FxQuantError

__all__ = [
    "OutputExistsError",
    "check_writable",
    "write_bytes_atomic",
    "write_text_atomic",
    "torch_save_atomic",
    "sha256_path",
]

_CHUNK = 1 << 20


class OutputExistsError(FxQuantError):
    """An output path already exists and overwriting was not asked for."""


def check_writable(paths: Iterable[str | os.PathLike], force: bool) -> None:
    """Fail before any work is done when an output exists (a pipeline must not lose an earlier result)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        what = f"output {existing[0]} already exists" if len(existing) == 1 else (
            f"outputs {', '.join(existing)} already exist")
        raise OutputExistsError(f"{what}; pass --force to overwrite")


def _temp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and :func:`os.replace`."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def torch_save_atomic(path: str | os.PathLike, obj: object) -> None:
    """``torch.save(obj, path)``, atomically (:func:`write_bytes_atomic`)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder (relative names and contents of its files, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            for chunk in _chunks(file):
                digest.update(chunk)
            digest.update(b"\0")
    else:
        for chunk in _chunks(path):
            digest.update(chunk)
    return digest.hexdigest()
