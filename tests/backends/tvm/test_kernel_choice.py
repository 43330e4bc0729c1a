"""Per-layer kernel choice end to end: forced kernels agree bit for bit, timings are cached, options checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends.tvm.build import host_target_dict, make_target
from fxquant.backends.tvm.cost import cost_cache_path, host_identity
from fxquant.backends.tvm.integer_layers import CONSTANT_INPUT
from fxquant.backends.tvm.kernels.dot import select_dot_isa
from fxquant.backends.tvm.selection import bitserial_module
from tests.backends.tvm.helpers import assert_matches_reference, quantized


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


_TILING_FIELDS = {
    "bitserial": {"tile_w", "vec_blocks", "paired"},
    "dot": {"tile_w", "oc_vectors", "channel_block", "fold_columns", "chain_blocks", "chain_rows"},
    "direct": {"layout", "lanes", "row_tile"},
}


@pytest.fixture(scope="module")
def model() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    return quantized(_Net(), x, weight_bits=2, act_bits=2, first_last_bits=8), x


def test_every_forced_kernel_gives_identical_outputs(model) -> None:
    q, x = model
    ref = fxquant.convert(q, backend="torch")
    families = ["dot", "direct"] + (["bitserial"] if bitserial_module() is not None else [])
    outputs = {}
    for family in families:
        mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, kernel={"conv2": family})
        assert_matches_reference(mod, ref, x)
        entry = next(e for e in mod.manifest["layers"] if e["name"] == "conv2")
        assert entry["kernel"] == family and "forced" in entry["reason"]
        assert set(entry["tiling"]) == _TILING_FIELDS[family]  # the chosen tiling, recorded as data
        assert mod.manifest["options"]["kernel"] == {"conv2": family}
        outputs[family] = mod(x)
    first = outputs[families[0]]
    assert all(torch.equal(first, out) for out in outputs.values())


def test_auto_records_costs_and_reuses_the_cache(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q, x = model
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    mod = fxquant.convert(q, backend="tvm-llvm", num_threads=1)
    layers = {e["name"]: e for e in mod.manifest["layers"]}
    conv2 = layers["conv2"]
    assert conv2["cost_model"] == "measure" and conv2["kernel"] in conv2["kernel_costs_us"]
    assert conv2["estimate_us"] == min(conv2["kernel_costs_us"].values())
    assert "dot" in conv2["kernel_costs_us"] and "direct" in conv2["kernel_costs_us"]
    assert mod.manifest["options"]["num_threads"] == 1 and mod.num_threads == 1
    cache = json.loads(cost_cache_path().read_text())
    keys = sorted(cache["entries"])
    assert keys and all(k.startswith(host_identity() + "|t1|") for k in keys)
    stamp = os.stat(cost_cache_path()).st_mtime_ns
    again = fxquant.convert(q, backend="tvm-llvm", num_threads=1)  # everything cached: nothing is timed
    assert os.stat(cost_cache_path()).st_mtime_ns == stamp
    assert [e["kernel"] for e in again.manifest["layers"]] == [e["kernel"] for e in mod.manifest["layers"]]
    assert torch.equal(again(x), mod(x))


def test_static_model_ranks_without_timing(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q, x = model
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    mod = fxquant.convert(q, backend="tvm-llvm", cost_model="model")
    assert not cost_cache_path().exists()
    for entry in mod.manifest["layers"]:
        assert entry["cost_model"] == "model" and entry["estimate_us"] == min(entry["kernel_costs_us"].values())
    want = fxquant.convert(q, backend="torch")(x)
    torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"kernel": "fast"}, r"kernel='fast' is invalid: expected one of auto, bitserial, dot, direct"),
        ({"kernel": {"conv2": "popcount"}}, r"kernel\['conv2'\]='popcount' is invalid"),
        ({"kernel": {3: "dot"}}, r"kernel: layer key 3 is invalid"),
        ({"cost_model": "guess"}, r"cost_model='guess' is invalid: expected one of measure, model"),
        ({"num_threads": 0}, r"num_threads=0 is invalid"),
        ({"num_threads": True}, r"num_threads=True is invalid"),
    ],
)
def test_bad_kernel_options(model, options: dict, match: str) -> None:
    with pytest.raises(fxquant.ConfigError, match=match):
        fxquant.convert(model[0], backend="tvm-llvm", **options)


def test_forcing_a_kernel_a_layer_cannot_take(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    q = quantized(net, x, weight_bits=2, act_bits=2, first_last_bits=None)
    with pytest.raises(fxquant.BackendError, match=r"layer 2: kernel='dot' was forced but cannot run it: groups=8"):
        fxquant.convert(q, backend="tvm-llvm", kernel={"2": "dot"})


class _ConstantBias(nn.Module):
    """Swin v2's position-bias MLP in small: two linear layers on a buffer (their input is a build-time
    constant) ending in 3 outputs, added to a linear layer on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(1, 5, 5, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 25, 8)
        return self.fc(x) + self.mlp(self.table).view(25, 3)


_HOST_DOT = select_dot_isa(make_target(host_target_dict(), None), (0, 255), (-128, 127)).name
_HASWELL = {"mcpu": "haswell"}


@pytest.mark.parametrize(
    "target,bits,isas",
    [
        (None, 2, {"avx512-vnni"}),
        (None, 8, {"avx512-vnni-halved", "avx2"}),  # 8-bit bipolar weights: halved, costed against avx2
        (_HASWELL, 2, {"avx2-u8s8"}),
        (_HASWELL, 8, {"avx2"}),
    ],
)
def test_constant_input_layers_take_the_portable_kernel(target: dict | None, bits: int, isas: set[str]) -> None:
    """A layer whose input is computed from buffers only is folded while building, by TVM's FoldConstant
    compiling for a generic CPU where every dot choice (and LLVM with it) aborts: it is offered the direct
    kernel only, with the reason; a layer on the input keeps the target's dot instructions."""
    if not (_HOST_DOT == "avx512-vnni" if target is None else _HOST_DOT != "generic"):
        pytest.skip(f"this host cannot run the {sorted(isas)} kernels")
    torch.manual_seed(0)
    x = torch.randn(2, 25, 8)
    q = quantized(_ConstantBias(), x, weight_bits=bits, act_bits=bits, first_last_bits=None)
    options = {"cost_model": "model", **({"target": target} if target else {})}
    mod = fxquant.convert(q, backend="tvm-llvm", debug_accumulators=True, kernel={"fc": "dot"}, **options)
    assert_matches_reference(mod, fxquant.convert(q, backend="torch"), x)
    layers = {e["name"]: e for e in mod.manifest["layers"]}
    for name in ("mlp.0", "mlp.2"):
        entry = layers[name]
        assert entry["kernel"] == "direct" and entry["constant_input"]
        assert f"no dot: {CONSTANT_INPUT}" in entry["reason"] and f"no bitserial: {CONSTANT_INPUT}" in entry["reason"]
    assert layers["fc"]["kernel"] == "dot" and layers["fc"]["layout"] in isas and "constant_input" not in layers["fc"]
    with pytest.raises(fxquant.BackendError, match=r"layer mlp.2: kernel='dot' was forced but cannot run it: input is"):
        fxquant.convert(q, backend="tvm-llvm", kernel={"mlp.2": "dot"}, **options)


def test_arm_options(model, tmp_path: Path) -> None:
    with pytest.raises(fxquant.ConfigError, match=r"cpu='cortex-x9' is invalid"):
        fxquant.convert(model[0], backend="tvm-arm", output_dir=tmp_path / "a", cpu="cortex-x9")
    with pytest.raises(fxquant.ConfigError, match=r"cost_model must be 'model'"):
        fxquant.convert(model[0], backend="tvm-arm", output_dir=tmp_path / "a", cost_model="measure")
    assert not (tmp_path / "a").exists()
