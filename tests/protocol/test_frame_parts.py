"""Parts in a frame (`Policy.merge_scope` weights or model): `<layer>@weight`, `@bias`,
`@model:<path>` entries next to their layer's tether, validated by `decode_frame` and
`FrameStream` alike: they belong to a registered layer and are finite and float32, but are not
tethers (no [0, 1] range check, never in the tether entries)."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from tether_protocol.frame import (
    DTypeError,
    LayerMismatchError,
    NonFiniteError,
    RangeError,
    decode_frame,
    encode_frame,
    is_part_name,
    part_layer,
    part_name,
    read_header,
    split_entries,
    split_probe_grams,
    with_parts,
)
from tether_protocol.framestream import FrameStream
from tether_protocol.messages import LayerSpec, SnapshotMeta, WireDType

LAYERS = [LayerSpec(name="fc1", shape=[4, 3]), LayerSpec(name="fc2", shape=[2, 4])]


def tethers() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {s.name: rng.random(s.shape, dtype=np.float32) for s in LAYERS}


def parts(scale: float = 3.0) -> dict[str, dict[str, np.ndarray]]:
    """Weights and biases well outside [0, 1], and a BatchNorm statistic."""
    rng = np.random.default_rng(1)
    return {
        "fc1": {
            "fc1@weight": scale * rng.standard_normal((4, 3)).astype(np.float32),
            "fc1@bias": scale * rng.standard_normal(4).astype(np.float32),
            "fc1@model:bn.running_var": np.full(4, 7.5, np.float32),
        },
        "fc2": {"fc2@weight": -scale * np.ones((2, 4), np.float32)},
    }


def body(
    extra: dict[str, dict[str, Any]] | None = None,
    dtype: WireDType = "float32",
    base: dict[str, np.ndarray] | None = None,
) -> bytes:
    meta = SnapshotMeta(worker_id="w", step=1, epoch=0, wire_dtype=dtype)
    tensors = with_parts(base or tethers(), parts() if extra is None else extra)
    return encode_frame(tensors, meta, dtype)


def layers_in(dtype: WireDType) -> list[LayerSpec]:
    return [s.model_copy(update={"dtype": dtype}) for s in LAYERS]


def streamed(data: bytes, chunk: int, dtype: WireDType = "float32") -> Any:
    stream = FrameStream(len(data), layers_in(dtype))
    for at in range(0, len(data), chunk):
        stream.feed(data[at : at + chunk])
    return stream.finish()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_parts_out_of_the_unit_interval_pass_in_float32_after_their_tether(dtype: str) -> None:
    data = body(dtype=dtype)  # type: ignore[arg-type]
    frame = decode_frame(data, layers=layers_in(dtype))  # type: ignore[arg-type]
    header, _ = read_header(data)
    order = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    assert order == [
        "fc1",
        "fc1@weight",
        "fc1@bias",
        "fc1@model:bn.running_var",
        "fc2",
        "fc2@weight",
    ]
    assert {header[k]["dtype"] for k in order if "@" in k} == {"F32"}  # whatever the wire dtype
    np.testing.assert_array_equal(frame.tensors["fc1@weight"], parts()["fc1"]["fc1@weight"])
    split = split_entries(frame.entries)
    assert list(split.tethers) == ["fc1", "fc2"]  # what scoring sees: tethers only
    assert split_probe_grams(frame.entries)[0].keys() == split.tethers.keys()
    assert {k: list(v) for k, v in split.parts.items()} == {
        "fc1": ["fc1@weight", "fc1@bias", "fc1@model:bn.running_var"],
        "fc2": ["fc2@weight"],
    }
    for chunk in (5, 61, len(data)):
        assert set(streamed(data, chunk, dtype).entries) == set(order)  # type: ignore[arg-type]


def test_a_tether_out_of_range_is_still_refused_next_to_parts() -> None:
    base = tethers()
    base["fc2"][1, 2] = 1.5
    data = body(base=base)
    with pytest.raises(RangeError, match=r"layer 'fc2' has a value outside \[0, 1\]: 1\.5"):
        decode_frame(data, layers=LAYERS)
    for chunk in (3, 64):
        with pytest.raises(RangeError, match="'fc2'"):
            streamed(data, chunk)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_part_is_refused_naming_it(value: float) -> None:
    bad = parts()
    bad["fc1"]["fc1@bias"][2] = value
    data = body(bad)
    with pytest.raises(NonFiniteError, match="'fc1@bias' contains NaN or Inf"):
        decode_frame(data, layers=LAYERS)
    for chunk in (3, 7, len(data)):
        with pytest.raises(NonFiniteError, match="'fc1@bias'"):
            streamed(data, chunk)


def test_parts_of_an_unregistered_layer_are_refused() -> None:
    data = encode_frame(
        tethers() | {"fc9@weight": np.ones(3, np.float32)},
        SnapshotMeta(worker_id="w", step=1, epoch=0),
    )
    with pytest.raises(LayerMismatchError, match=r"parts of layers that are not registered"):
        decode_frame(data, layers=LAYERS)
    with pytest.raises(LayerMismatchError, match=r"fc9@weight"):
        streamed(data, 16)


def test_an_unknown_part_kind_reads_as_an_unknown_layer() -> None:
    data = encode_frame(
        tethers() | {"fc1@typo": np.ones(3, np.float32)},
        SnapshotMeta(worker_id="w", step=1, epoch=0),
    )
    with pytest.raises(LayerMismatchError, match=r"unknown \['fc1@typo'\]"):
        decode_frame(data, layers=LAYERS)


def test_a_part_in_another_dtype_than_float32_is_refused() -> None:
    # Hand-written: encode_frame always writes parts as float32.
    meta = SnapshotMeta(worker_id="w", step=1, epoch=0, wire_dtype="float16")
    good = encode_frame(tethers(), meta, "float16")
    header, start = read_header(good)
    header["fc1@bias"] = {
        "dtype": "F16",
        "shape": [4],
        "data_offsets": [len(good) - start, len(good) - start + 8],
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + good[start:] + np.ones(4, "<f2").tobytes()
    with pytest.raises(DTypeError, match=r"part 'fc1@bias' is float16; parts are always float32"):
        decode_frame(data, layers=layers_in("float16"))


def test_part_names() -> None:
    assert part_name("enc.0", "weight") == "enc.0@weight"
    assert part_name("lstm.weight_ih_l0", "bias") == "lstm.weight_ih_l0@bias"
    assert part_name("fc", "weight:original1") == "fc@weight:original1"
    assert part_name("fc", "model:bn.running_mean") == "fc@model:bn.running_mean"
    assert part_layer("a@b@model:x.y") == ("a@b", "model:x.y")  # a layer may hold '@'
    for bad in ("probe_gram", "typo", "model:", "model:a@b", "weight:a.b"):
        with pytest.raises(ValueError, match="is not weight, bias"):
            part_name("fc", bad)
    assert not is_part_name("fc1") and not is_part_name("fc1@probe_gram")
    with pytest.raises(ValueError, match="not in the frame"):
        with_parts({"fc1": 1}, {"fc2": {"fc2@weight": 2}})
