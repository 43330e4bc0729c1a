"""The ``"tvm-arm"`` artifact folder: ``model.so`` (aarch64), ``manifest.json`` and ``run_model.py``.

The folder is built in a temporary sibling and swapped into place (:func:`fxquant.io.output_files.publish_folder`),
so a reader never sees half an artifact; an existing folder is replaced only with ``force=True`` and only when
it holds nothing but an artifact's files (:func:`artifact_owner`), so ``force`` never deletes a user's files.
The manifest records the sha256 of ``model.so`` and every reader checks it, so a truncated or corrupted
copy fails with the file's name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm.support import cc

from fxquant.backends.tvm.build import ARM_TRIPLE
from fxquant.backends.tvm.manifest import FORMAT, manifest_json, report, sha256_file
from fxquant.errors import BackendError
from fxquant.io.output_files import manifest_owner, publish_folder, staging_folder

__all__ = ["Artifact", "export_artifact", "load_manifest", "verify_artifact", "cross_compiler_name", "ARTIFACT_FILES",
           "artifact_owner"]

ARTIFACT_FILES = ("model.so", "manifest.json", "run_model.py")
#: why a folder is not an artifact folder fxquant wrote (None when it is): the check before ``force`` replaces it
artifact_owner = manifest_owner(ARTIFACT_FILES, (FORMAT,))
_RUNNER = Path(__file__).with_name("run_model.py")


def cross_compiler_name() -> str:
    return f"{ARM_TRIPLE}-g++"


@dataclass(frozen=True)
class Artifact:
    """A written artifact folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def library(self) -> Path:
        return self.path / "model.so"

    def report(self) -> str:
        return report(self.manifest)


def _export_library(executable: tvm.runtime.Executable, path: Path, workspace: Path) -> None:
    compiler = cross_compiler_name()
    if shutil.which(compiler) is None:
        raise BackendError(f"{compiler} not found: install g++-aarch64-linux-gnu (see .ci/setup-arm)")
    try:
        executable.export_library(str(path), fcompile=cc.cross_compiler(compiler), workspace_dir=str(workspace))
    except Exception as exc:
        raise BackendError(f"exporting {path.name} with {compiler} failed: {exc}") from exc


def export_artifact(
    executable: tvm.runtime.Executable, manifest: dict[str, Any], output_dir: Path, force: bool = False
) -> Artifact:
    """Write the folder atomically; refuse to replace an existing one unless ``force``.

    Example::

        art = export_artifact(build.executable, manifest, Path("artifacts/resnet"))
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise BackendError(f"output_dir {output_dir} already exists; pass force=True to replace it")
    if output_dir.exists() and (why := artifact_owner(output_dir)) is not None:
        raise BackendError(f"refusing to replace output_dir {output_dir}: {why}")
    staging = staging_folder(output_dir)
    try:
        library = staging / "model.so"
        workspace = staging_folder(output_dir)  # object files; a killed run's are removed by the next run
        try:
            _export_library(executable, library, workspace)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        shutil.copyfile(_RUNNER, staging / "run_model.py")
        recorded = {"sha256": sha256_file(library), "bytes": library.stat().st_size}
        manifest = {**manifest, "files": {"model.so": recorded}}
        (staging / "manifest.json").write_text(manifest_json(manifest))
        publish_folder(staging, output_dir, artifact_owner)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Artifact(output_dir, manifest)


def load_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BackendError(f"{path} is missing: not an fxquant TVM artifact") from exc
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # JSON and UTF-8 decoding errors
        raise BackendError(f"{path} is not valid JSON: {' '.join(str(exc).split())}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BackendError(f"{path} is not an fxquant TVM artifact manifest (format {got!r}, expected {FORMAT!r})")
    return manifest


def verify_artifact(artifact_dir: str | Path) -> dict[str, Any]:
    """The manifest, after checking that every file exists and model.so matches its recorded sha256."""
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    for name in ARTIFACT_FILES:
        if not (artifact_dir / name).is_file():
            raise BackendError(f"{artifact_dir / name} is missing")
    library = artifact_dir / "model.so"
    recorded = manifest.get("files")
    recorded = recorded.get("model.so") if isinstance(recorded, dict) else None
    if not isinstance(recorded, dict):
        raise BackendError(f"{artifact_dir / 'manifest.json'} is malformed: it has no files.model.so entry")
    actual = sha256_file(library)
    if actual != recorded.get("sha256"):
        size = library.stat().st_size
        raise BackendError(
            f"{library} does not match manifest.json (sha256 {actual[:12]}… vs {str(recorded.get('sha256'))[:12]}…, "
            f"{size} vs {recorded.get('bytes')} bytes): truncated or corrupted"
        )
    return manifest
