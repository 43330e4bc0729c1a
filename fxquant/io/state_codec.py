"""Nested state (dicts, lists, tuples, numbers, strings, tensors) as canonical JSON text plus a tensor list.

Pickling nested Python objects is not byte-stable: the pickle memo records which objects are *shared*, so
an optimizer state rebuilt from a file pickles differently from the one that was trained, though every
value is equal. Canonical JSON (sorted keys, explicit tuples and non-string keys) plus tensors in traversal
order encodes equal state as equal bytes, and needs no unpickling of arbitrary objects to read back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["encode_state", "decode_state"]


def _key_order(item: tuple[Any, Any]) -> tuple[str, Any]:
    return type(item[0]).__name__, item[0]


def encode_state(state: Any) -> tuple[str, list[torch.Tensor]]:
    """``(json_text, tensors)``; :func:`decode_state` inverts it.

    Example::

        text, tensors = encode_state(optimizer.state_dict())
        optimizer.load_state_dict(decode_state(text, tensors))
    """
    tensors: list[torch.Tensor] = []

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value.detach().clone().contiguous())
            return {"$tensor": len(tensors) - 1}
        if isinstance(value, Mapping):
            return {"$dict": [[k, encode(v)] for k, v in sorted(value.items(), key=_key_order)]}
        if isinstance(value, tuple):
            return {"$tuple": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint: {value!r}")

    return json.dumps(encode(state), sort_keys=True), tensors


def decode_state(text: str, tensors: list[torch.Tensor]) -> Any:
    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "$tensor" in value:
            return tensors[value["$tensor"]]
        if "$tuple" in value:
            return tuple(decode(v) for v in value["$tuple"])
        return {k: decode(v) for k, v in value["$dict"]}

    return decode(json.loads(text))
