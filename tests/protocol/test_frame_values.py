"""tether values outside [0, 1] are refused by the frame codec, naming the
layer, in every wire dtype and wherever a chunk boundary falls; [0, 1] itself (with -0.0) passes."""

from __future__ import annotations

import numpy as np
import pytest

from tether_protocol.frame import (
    NonFiniteError,
    RangeError,
    decode_frame,
    encode_frame,
    probe_gram_name,
)
from tether_protocol.framestream import FrameStream
from tether_protocol.messages import LayerSpec, SnapshotMeta

DTYPES = ["float32", "float16", "bfloat16"]


def frame(value: float, dtype: str, at: int = 5) -> bytes:
    good = np.full(8, 0.5, np.float32)
    bad = good.copy()
    bad[at] = value
    meta = SnapshotMeta(worker_id="w", step=1, epoch=0, wire_dtype=dtype)  # type: ignore[arg-type]
    return encode_frame({"fine": good, "fc.2": bad}, meta, dtype)  # type: ignore[arg-type]


def streamed(body: bytes, dtype: str, chunk: int) -> None:
    layers = [LayerSpec(name=n, shape=[8], dtype=dtype) for n in ("fine", "fc.2")]  # type: ignore[arg-type]
    stream = FrameStream(len(body), layers)
    for at in range(0, len(body), chunk):
        stream.feed(body[at : at + chunk])
    stream.finish()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [1.5, 2.0, -0.25, 300.0])
def test_a_value_outside_the_unit_interval_is_refused_naming_the_layer(
    dtype: str, value: float
) -> None:
    body = frame(value, dtype)
    with pytest.raises(RangeError, match=r"layer 'fc\.2' has a value outside \[0, 1\]"):
        decode_frame(body)
    for chunk in (3, 64, len(body)):
        with pytest.raises(RangeError, match=r"'fc\.2'"):
            streamed(body, dtype, chunk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, 1e-8])
def test_the_closed_unit_interval_passes(dtype: str, value: float) -> None:
    body = frame(value, dtype)
    assert decode_frame(body).tensors["fc.2"][5] == pytest.approx(value, abs=1e-7)
    streamed(body, dtype, 7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_is_still_reported_as_non_finite(dtype: str) -> None:
    with pytest.raises(NonFiniteError, match=r"'fc\.2' contains NaN"):
        streamed(frame(float("nan"), dtype), dtype, 11)


def test_the_range_check_can_be_turned_off_for_other_tensors() -> None:
    assert decode_frame(frame(3.0, "float32"), unit_range=False).tensors["fc.2"][5] == 3.0
    body = frame(3.0, "float32")
    FrameStream(len(body), unit_range=False).feed(body)


def test_probe_grams_beside_the_tethers_are_not_bound_to_the_unit_interval() -> None:
    gram = np.array([[4.0, -2.5], [-2.5, 9.0]], np.float32)
    body = encode_frame(
        {"fc": np.full(8, 0.5, np.float32), probe_gram_name("fc"): gram},
        SnapshotMeta(worker_id="w", step=1, epoch=0),
    )
    assert decode_frame(body).tensors[probe_gram_name("fc")][1, 1] == 9.0
    stream = FrameStream(len(body), [LayerSpec(name="fc", shape=[8])])
    stream.feed(body)
    stream.finish()
