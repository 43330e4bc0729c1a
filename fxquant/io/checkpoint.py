"""Checkpoints of prepared and converted models that a fresh process can reload without the training code.

A checkpoint holds data, never pickled classes: the model spec (``module:function`` + kwargs), the
QuantConfig (with its bitwidth plan), the input shape, the state dict, and optionally the trainer's state
(``"training"``) or the frozen integer state of a converted model (``kind="reference"``). Loading
rebuilds the architecture from the spec, prepares it with the config and loads the state dict strictly;
anything that does not fit raises :class:`~fxquant.errors.CheckpointError` instead of giving a wrong model.

File layout (``fxquant.io.checkpoint/1``)::

    FXQUANT-CHECKPOINT\\n
    {"format": ..., "kind": ..., "fxquant_version": ..., "payload_bytes": N, "payload_sha256": ...}\\n
    <payload: torch.save of {"meta": JSON text, "training": JSON text or None, "tensors": {name: tensor}}>

The hash is checked before unpickling and the payload is read with ``torch.load(weights_only=True)``;
it holds only strings and tensors. Tensors are stored in one flat dict in sorted key order
(``state_dict/...``, ``frozen_state_dict/...``, ``training/...``) and nested state as canonical JSON
(:mod:`fxquant.io.state_codec`), so equal contents give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxquant.api import _record_shapes, convert, prepare, quantizers_of
from fxquant.config import QuantConfig
from fxquant.errors import CheckpointError, ConfigError
from fxquant.input_guard import InputGuard
from fxquant.io.model_spec import ModelSpec, ModelTrust
from fxquant.io.output_files import check_writable, write_bytes_atomic
from fxquant.io.state_codec import decode_state, encode_state
from fxquant.plan import BitwidthPlan
from fxquant.version import __version__

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KINDS",
    "Checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "load_prepared",
    "load_reference",
    "describe_mismatch",
]

CHECKPOINT_FORMAT = "fxquant.io.checkpoint/1"
#: formats this version reads; a new format adds its tag here together with a reader for it
SUPPORTED_FORMATS = (CHECKPOINT_FORMAT,)
CHECKPOINT_KINDS = ("prepared", "reference")
MAGIC = b"FXQUANT-CHECKPOINT\n"
_SHOWN = 5
#: what a checkpoint's spec gets unless the caller says otherwise: the default allow-list only
UNTRUSTED = ModelTrust()


def _version() -> str:
    return __version__


def _sorted_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies in key order: shared or strided storages would change the bytes written,
    and a checkpoint saved from a GPU run loads on a CPU-only host (the trainer moves it to its device)."""
    return {k: state[k].detach().to("cpu", copy=True).contiguous() for k in sorted(state)}


def _first(items: Sequence[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``found`` cannot be loaded where ``expected`` lives (first few keys of each kind), or ``None``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    dtypes = [
        f"{k}: checkpoint {found[k].dtype} vs model {expected[k].dtype}"
        for k in expected
        if k in found and tuple(found[k].shape) == tuple(expected[k].shape) and found[k].dtype != expected[k].dtype
    ]
    parts = [
        f"{len(items)} {what}: {_first(items)}"
        for what, items in (
            ("key(s) missing from the checkpoint", missing),
            ("unexpected key(s) in the checkpoint", unexpected),
            ("shape mismatch(es)", shapes),
            ("dtype mismatch(es)", dtypes),
        )
        if items
    ]
    return "; ".join(parts) or None


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The contents of a checkpoint file. ``input_shape`` is one sample's shape (no batch dimension)."""

    kind: str
    config: QuantConfig
    state_dict: Mapping[str, torch.Tensor]
    input_shape: tuple[int, ...]
    model: ModelSpec | None = None
    training: Mapping[str, Any] | None = None
    frozen_state_dict: Mapping[str, torch.Tensor] | None = None
    fxquant_version: str = ""
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.kind not in CHECKPOINT_KINDS:
            raise CheckpointError(f"checkpoint kind={self.kind!r} is invalid; allowed: {', '.join(CHECKPOINT_KINDS)}")
        if (self.kind == "reference") != (self.frozen_state_dict is not None):
            raise CheckpointError(f"{self.source}: a reference checkpoint holds a frozen state dict, others do not")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "fxquant_version", self.fxquant_version or _version())

    @property
    def plan(self) -> BitwidthPlan | None:
        return self.config.plan

    @classmethod
    def from_prepared(
        cls,
        model: fx.GraphModule,
        input_shape: Sequence[int],
        spec: ModelSpec | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Capture a model returned by :func:`fxquant.prepare` (and possibly trained)."""
        config = getattr(model, "meta", {}).get("fxquant.config")
        if not isinstance(config, QuantConfig):
            raise CheckpointError("expected a model returned by fxquant.prepare() (it records its QuantConfig)")
        return cls("prepared", config, model.state_dict(), tuple(input_shape), spec, training)

    def to_reference(self, frozen: nn.Module) -> Checkpoint:
        """This checkpoint plus the frozen integer state of ``frozen`` (from ``fxquant.convert(..., "torch")``)."""
        return replace(self, kind="reference", training=None, frozen_state_dict=frozen.state_dict())

    # -- rebuilding -----------------------------------------------------------------------------------------

    def build_prepared(self, model: nn.Module | None = None, trust: ModelTrust = UNTRUSTED) -> fx.GraphModule:
        """The prepared model: ``model`` (or the spec's fresh one) prepared with the config, state loaded.

        The spec is a string from a file: it is imported and called only when ``trust`` allows its target.
        """
        if model is None:
            if self.model is None:
                raise CheckpointError(f"{self.source} records no model spec; pass the float model to rebuild it")
            with torch.random.fork_rng(devices=[]):  # the throw-away initial weights must not move the caller's RNG
                try:
                    model = self.model.build(trust, self.source)
                except ConfigError as exc:
                    raise CheckpointError(f"{self.source}: cannot rebuild its model: {exc}") from exc
            where = f"the model built from {self.model}"
        else:
            where = f"the given {type(model).__name__}"
        try:
            gm = prepare(model, None, self.config)
        except ConfigError as exc:
            raise CheckpointError(f"{self.source} does not fit {where}: {exc}") from exc
        mismatch = describe_mismatch(gm.state_dict(), self.state_dict)
        if mismatch:
            raise CheckpointError(f"{self.source} does not match {where} (another architecture?): {mismatch}")
        gm.load_state_dict(self.state_dict, strict=True)
        if all(bool(q.initialized) for q in quantizers_of(gm).values()):  # else a forward would calibrate
            training = gm.training
            _record_shapes(gm.eval(), (torch.zeros(1, *self.input_shape),))  # shapes for cost models and backends
            gm.train(training)
        return gm

    def build_reference(self, trust: ModelTrust = UNTRUSTED) -> InputGuard:
        """The integer reference of a ``kind="reference"`` checkpoint, checked against its stored frozen state."""
        if self.kind != "reference" or self.frozen_state_dict is None:
            raise CheckpointError(f"{self.source} is a {self.kind} checkpoint; convert it first (fxquant convert)")
        frozen = convert(self.build_prepared(trust=trust), backend="torch")
        expected = frozen.state_dict()
        mismatch = describe_mismatch(expected, self.frozen_state_dict)
        differs = [k for k in expected if not mismatch and not torch.equal(expected[k], self.frozen_state_dict[k])]
        if mismatch or differs:
            raise CheckpointError(
                f"{self.source}: its frozen integer state does not match what freezing its prepared state gives "
                f"with fxquant {_version()} (written by {self.fxquant_version}): {mismatch or _first(differs)}"
            )
        return InputGuard(frozen, self.input_shape)

    # -- serialisation --------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "fxquant_version": self.fxquant_version,
            "model": None if self.model is None else self.model.to_dict(),
            "config": self.config.to_dict(),
            "input_shape": list(self.input_shape),
            "input_dtype": "float32",
        }

    def to_bytes(self) -> bytes:
        training_text, training_tensors = (None, []) if self.training is None else encode_state(self.training)
        tensors = {f"state_dict/{k}": v for k, v in self.state_dict.items()}
        tensors.update({f"frozen_state_dict/{k}": v for k, v in (self.frozen_state_dict or {}).items()})
        tensors.update({f"training/{i:06d}": t for i, t in enumerate(training_tensors)})
        payload = io.BytesIO()
        torch.save(
            {"meta": json.dumps(self.meta(), sort_keys=True), "training": training_text,
             "tensors": _sorted_tensors(tensors)},
            payload,
        )
        body = payload.getvalue()
        header = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "fxquant_version": self.fxquant_version,
            "payload_bytes": len(body),
            "payload_sha256": hashlib.sha256(body).hexdigest(),
        }
        return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "<memory>") -> Checkpoint:
        body = _split(raw, source)
        try:
            data = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
            meta = json.loads(data["meta"])
            shape = meta["input_shape"]
            if not isinstance(shape, list) or not shape or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape
            ):
                raise CheckpointError(
                    f"{source}: input_shape {shape!r} is invalid: expected positive integers like [1, 28, 28]"
                )
            groups: dict[str, dict[str, torch.Tensor]] = {"state_dict": {}, "frozen_state_dict": {}, "training": {}}
            for key, tensor in data["tensors"].items():
                group, _, name = key.partition("/")
                groups[group][name] = tensor
            training = None
            if data["training"] is not None:
                training = decode_state(data["training"], [groups["training"][k] for k in sorted(groups["training"])])
            return cls(
                kind=meta["kind"],
                config=QuantConfig.from_dict(meta["config"]),
                state_dict=groups["state_dict"],
                input_shape=tuple(meta["input_shape"]),
                model=None if meta["model"] is None else ModelSpec.from_dict(meta["model"]),
                training=training,
                frozen_state_dict=groups["frozen_state_dict"] if meta["kind"] == "reference" else None,
                fxquant_version=meta["fxquant_version"],
                source=source,
            )
        except ConfigError as exc:
            raise CheckpointError(f"{source}: its config is not valid in this installation: {exc}") from exc
        except CheckpointError:
            raise
        except Exception as exc:  # unpickling and structure errors come in many types
            raise CheckpointError(f"{source}: cannot read the checkpoint payload: {type(exc).__name__}: {exc}") from exc


def _split(raw: bytes, source: str) -> bytes:
    """The payload of a checkpoint file, after checking its header, format, length and hash."""
    if not raw.startswith(MAGIC):
        what = "an empty file" if not raw else "a plain torch.save file" if raw.startswith(b"PK") else "another file"
        raise CheckpointError(f"{source} is not an fxquant checkpoint ({what}; no {MAGIC[:-1].decode()} header)")
    end = raw.find(b"\n", len(MAGIC))
    try:
        header = json.loads(raw[len(MAGIC): end]) if end >= 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: the checkpoint header is truncated or corrupted")
    fmt = header.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise CheckpointError(
            f"{source}: checkpoint format {fmt!r} (written by fxquant {header.get('fxquant_version', '?')}) is not "
            f"supported by fxquant {_version()}, which reads {', '.join(SUPPORTED_FORMATS)}"
        )
    body = raw[end + 1:]
    expected = header.get("payload_bytes")
    if len(body) != expected:
        problem = "truncated" if isinstance(expected, int) and len(body) < expected else "of the wrong length"
        raise CheckpointError(f"{source} is {problem}: the payload has {len(body)} bytes, the header says {expected}")
    digest = hashlib.sha256(body).hexdigest()
    if digest != header.get("payload_sha256"):
        raise CheckpointError(
            f"{source} is corrupted: payload sha256 {digest[:12]}... does not match the header's "
            f"{str(header.get('payload_sha256'))[:12]}..."
        )
    return body


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike, force: bool = False) -> None:
    """Write ``checkpoint`` atomically; an existing file is kept unless ``force``.

    Example::

        save_checkpoint(Checkpoint.from_prepared(qmodel, (1, 28, 28), ModelSpec("fxquant.models:resnet_small")),
                        "prepared.ckpt")
    """
    check_writable([path], force)
    write_bytes_atomic(path, checkpoint.to_bytes())


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint file (format, length, hash, structure); builds no model."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    return Checkpoint.from_bytes(raw, str(path))


def load_prepared(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    trust_model_code: bool = False,
    trusted_models: Sequence[str] = (),
) -> fx.GraphModule:
    """Rebuild the prepared model of a checkpoint in any process that can import its model spec.

    Without ``model``, the spec is imported and called only if trusted (see :class:`ModelTrust`): its target
    matches ``trusted_models``, ``$FXQUANT_TRUSTED_MODELS`` or the defaults, or ``trust_model_code=True``.

    Example::

        qmodel = fxquant.load_prepared("trained.ckpt")    # then train on, or fxquant.convert(qmodel)
        qmodel = fxquant.load_prepared("mine.ckpt", trusted_models=["mypkg.nets:*"])
    """
    return read_checkpoint(path).build_prepared(model, ModelTrust(trust_model_code, tuple(trusted_models)))


def load_reference(
    path: str | os.PathLike, *, trust_model_code: bool = False, trusted_models: Sequence[str] = ()
) -> InputGuard:
    """The integer reference saved by ``fxquant convert --backend torch``, guarded by its input shape."""
    return read_checkpoint(path).build_reference(ModelTrust(trust_model_code, tuple(trusted_models)))
