"""Safe output files for pipeline stages: never overwrite without ``force``, never leave half a file, never
delete what the tool did not write.

What is atomic and what is recoverable:

* a file is written to a temporary sibling and moved into place with :func:`os.replace`, which is atomic on
  one file system: a crash or a full disk leaves the previous file (or none), never a truncated one;
* a folder is built in a staging sibling and swapped with the old one by ``renameat2(RENAME_EXCHANGE)``,
  atomic where the kernel and file system offer it (Linux ext4, xfs, btrfs, tmpfs). Elsewhere the old folder
  is renamed to ``.NAME.fxq-old`` before the new one is renamed in; a crash between the two renames is
  recovered by the next run (:func:`recover_folder`), which puts the old folder back;
* temporaries are named ``.NAME.fxq-PID-*``: the next run on the same output removes those whose process
  is gone or that are older than :data:`STALE_AFTER_S` (:func:`clean_stale_temps`).

Content hashes (:func:`sha256_path`) let reports tie each output to the exact inputs that made it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fxquant.errors import FxQuantError

__all__ = [
    "OutputExistsError",
    "OutputError",
    "Output",
    "STALE_AFTER_S",
    "check_writable",
    "check_outputs",
    "output_lock",
    "write_bytes_atomic",
    "write_text_atomic",
    "torch_save_atomic",
    "staging_folder",
    "publish_folder",
    "recover_folder",
    "clean_stale_temps",
    "manifest_owner",
    "sha256_path",
]

_CHUNK = 1 << 20
#: temporaries older than this are removed even when their process id is alive (it may have been reused)
STALE_AFTER_S = 24 * 3600
_TEMP_TAG = "fxq-"
_TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.{_TEMP_TAG}(?P<pid>\d+)-[^/]*$")


class OutputExistsError(FxQuantError):
    """An output path already exists and overwriting was not asked for."""


class OutputError(FxQuantError):
    """An output cannot be written: it collides with another path, its folder is not writable, or it would
    replace something the tool did not write."""


@dataclass(frozen=True)
class Output:
    """One path a command writes: ``role`` is the option that names it (for messages); a ``folder`` output may
    replace an existing folder only when ``owned`` says the tool wrote it."""

    path: Path
    role: str
    folder: bool = False
    owned: Callable[[Path], str | None] | None = None


def check_writable(paths: Iterable[str | os.PathLike], force: bool) -> None:
    """Fail before any work is done when an output exists (a pipeline must not lose an earlier result)."""
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing and not force:
        what = f"output {existing[0]} already exists" if len(existing) == 1 else (
            f"outputs {', '.join(existing)} already exist")
        raise OutputExistsError(f"{what}; pass --force to overwrite")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _writable_parent(output: Output) -> None:
    """The nearest existing ancestor must be a folder this process may create entries in."""
    parent = Path(output.path).parent  # as the user wrote it, for the message
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{output.role} {output.path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{output.role} {output.path}: folder {parent} is not writable")


def check_outputs(
    outputs: Sequence[Output], inputs: Sequence[tuple[str, Path]], force: bool, rewritable: Sequence[Path] = ()
) -> None:
    """Everything that can be known about the outputs before the work starts.

    Two outputs, or an output and an input, that resolve to the same file (symlinks followed, hard links
    found by inode), or an input
    inside an output folder; a folder where a file goes or the reverse; a parent that is not writable; an
    existing output without ``force`` (except the ``rewritable`` ones); an existing folder the tool did not write.
    """
    resolved = [(o, Path(o.path).resolve()) for o in outputs]
    for i, (a, path_a) in enumerate(resolved):
        for b, path_b in resolved[i + 1:]:
            if path_a == path_b or (a.folder and _inside(path_b, path_a)) or (b.folder and _inside(path_a, path_b)):
                raise OutputError(f"{a.role} {a.path} and {b.role} {b.path} name the same path; give each its own")
        for role, path in inputs:
            path_in = Path(path).resolve()
            same = path_a == path_in or (path_a.is_file() and path_in.is_file() and os.path.samefile(path_a, path_in))
            if same or (a.folder and _inside(path_in, path_a)):
                where = "is" if same else "holds"
                raise OutputError(f"{a.role} {a.path} {where} the input {role} {path}; write the output elsewhere")
    for output in outputs:
        path = Path(output.path)
        if output.folder and path.exists() and not path.is_dir():
            raise OutputError(f"{output.role} {path} is a file; expected a folder (or a new path)")
        if not output.folder and path.is_dir():
            raise OutputError(f"{output.role} {path} is a folder; expected a file path")
        _writable_parent(output)
    check_writable([o.path for o in outputs if o.path not in rewritable], force)
    for output in outputs:
        if output.folder and Path(output.path).is_dir():
            _check_owned(output)


def _check_owned(output: Output) -> None:
    path = Path(output.path)
    why = "it is a symbolic link" if path.is_symlink() else (
        output.owned(path) if output.owned is not None else "it is not known to be an fxquant output")
    if why:
        raise OutputError(f"refusing to replace {output.role} {path}: {why}; remove it yourself or choose another path")


# -- locks --------------------------------------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.fxq-lock")


@contextmanager
def output_lock(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Hold an exclusive lock per output for a whole run, so that an output and its report are one unit.

    A second run on the same output fails at once (it does not wait, and writes nothing). Lock files are
    ``.NAME.fxq-lock`` next to the output and are removed on release; a lock is re-taken when another run
    removed its file in between (the inode check).
    """
    held: list[tuple[int, Path]] = []
    try:
        for path in sorted({_lock_path(Path(p)) for p in paths}):
            if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
                continue  # no lock without a writable folder: nobody else can write there either
            held.append((_acquire(path), path))
        yield
    finally:
        for fd, path in reversed(held):
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            output = path.with_name(path.name[1:].removesuffix(".fxq-lock"))
            raise OutputError(f"{output} is being written by another fxquant run (pid {owner}); "
                              "wait for it, or write elsewhere") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the holder released and removed it between our open and flock: take the new file


# -- files --------------------------------------------------------------------------------------------------


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_TEMP_TAG}{os.getpid()}-"


def _temp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and :func:`os.replace`.

    A failing write (full disk, read-only folder, a folder at ``path``) raises :class:`OutputError` naming
    ``path`` and leaves the previous file as it was.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        tmp = _temp_sibling(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        if tmp is not None:
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


# -- folders ------------------------------------------------------------------------------------------------


def staging_folder(path: str | os.PathLike) -> Path:
    """An empty folder next to ``path`` to build a folder output in (then :func:`publish_folder`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    except OSError as exc:
        raise OutputError(f"cannot create a folder next to {path}: {exc.strerror or exc}") from exc
    staging.chmod(0o755)  # mkdtemp makes it private; an output folder is meant to be copied and read
    return staging


def _backup(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.{_TEMP_TAG}old")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_folder(staging: Path, path: Path, owned: Callable[[Path], str | None]) -> None:
    """Move the finished ``staging`` folder to ``path``, replacing an old folder only when ``owned`` finds
    nothing foreign in it (``owned`` returns why not, or None)."""
    path = Path(path)
    recover_folder(path)
    try:
        if not os.path.lexists(path):
            os.rename(staging, path)
            return
        _check_owned(Output(path, "output", folder=True, owned=owned))
        if _exchange(staging, path):
            shutil.rmtree(staging)  # now the old folder
            return
        backup = _backup(path)
        os.rename(path, backup)
        os.rename(staging, path)  # a crash here: the next recover_folder puts the backup back
        shutil.rmtree(backup)
    except OSError as exc:
        raise OutputError(f"cannot publish {path}: {exc.strerror or exc}") from exc


def recover_folder(path: str | os.PathLike) -> None:
    """Finish a folder replacement a crash interrupted: restore the old folder when ``path`` is missing,
    else drop the leftover backup."""
    path = Path(path)
    backup = _backup(path)
    if not backup.is_dir():
        return
    if os.path.lexists(path):
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(backup, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove temporaries of ``path`` (``.NAME.fxq-PID-*`` files and staging folders) left by killed runs:
    those whose process is gone, or older than ``max_age_s``. Returns what was removed."""
    path = Path(os.path.abspath(path))
    removed = []
    now = time.time()
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.{_TEMP_TAG}*"):
        match = _TEMP_NAME.match(candidate.name)
        if match is None or match["name"] != path.name:
            continue
        pid = int(match["pid"])
        try:
            age = now - candidate.lstat().st_mtime
        except FileNotFoundError:
            continue
        if pid == os.getpid() or (_pid_alive(pid) and age < max_age_s):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def manifest_owner(files: Iterable[str], formats: tuple[str, ...]) -> Callable[[Path], str | None]:
    """An ``owned`` check for folders the tool writes: only ``files``, and a ``manifest.json`` of a format
    in ``formats`` (or nothing at all). Returns why a folder is not one (None when it is)."""
    allowed = set(files)

    def owned(folder: Path) -> str | None:
        entries = list(folder.iterdir())
        if not entries:
            return None  # an empty folder loses nothing
        foreign = sorted(p.name for p in entries if p.name not in allowed)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
            return f"it holds files fxquant did not write ({shown})"
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "it has no readable fxquant manifest.json"
        if not isinstance(manifest, dict) or manifest.get("format") not in formats:
            return "its manifest.json is not an fxquant artifact manifest"
        return None

    return owned


# -- hashes -------------------------------------------------------------------------------------------------


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
