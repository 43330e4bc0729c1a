"""Canonical encoding of nested state: equal state gives equal text, whatever the insertion order."""

from __future__ import annotations

import pytest
import torch

from fxquant.io.state_codec import decode_state, encode_state


def test_round_trip_keeps_types() -> None:
    state = {"state": {1: {"buf": torch.arange(3.0)}, 0: {"buf": torch.ones(2, dtype=torch.int64)}},
             "groups": [{"params": [0, 1], "betas": (0.9, 0.99), "nesterov": True, "name": None}],
             "lr": float("inf")}
    text, tensors = encode_state(state)
    out = decode_state(text, tensors)
    assert set(out["state"]) == {0, 1}
    assert torch.equal(out["state"][1]["buf"], torch.arange(3.0))
    assert out["state"][0]["buf"].dtype == torch.int64
    assert out["groups"] == [{"params": [0, 1], "betas": (0.9, 0.99), "nesterov": True, "name": None}]
    assert out["lr"] == float("inf")


def test_insertion_order_does_not_change_the_encoding() -> None:
    a = {"x": 1, "y": {2: torch.zeros(1), 1: torch.ones(1)}}
    b = {"y": {1: torch.ones(1), 2: torch.zeros(1)}, "x": 1}
    (text_a, tensors_a), (text_b, tensors_b) = encode_state(a), encode_state(b)
    assert text_a == text_b
    assert all(torch.equal(p, q) for p, q in zip(tensors_a, tensors_b, strict=True))


def test_unsupported_values_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot store a set in a checkpoint"):
        encode_state({"s": {1, 2}})
