"""Incremental frame validation: same frames accepted, same typed errors as decode_frame."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether_protocol.frame import (
    ByteLengthError,
    DTypeError,
    FrameError,
    HeaderError,
    HeaderLengthError,
    LayerMismatchError,
    MetadataError,
    NonFiniteError,
    ShapeError,
    decode_frame,
    encode_frame,
)
from tether_protocol.framestream import FrameStream
from tether_protocol.messages import LayerSpec, SnapshotMeta

LAYERS = [LayerSpec(name="a", shape=[3, 5]), LayerSpec(name="b", shape=[7])]


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.random((3, 5), dtype=np.float32), "b": rng.random(7, dtype=np.float32)}


def meta(**update: object) -> SnapshotMeta:
    return SnapshotMeta(worker_id="w", step=3, epoch=1, generations={"b": 2}).model_copy(
        update=update
    )


def feed_all(body: bytes, sizes: list[int], **kwargs: object) -> FrameStream:
    stream = FrameStream(len(body), **kwargs)  # type: ignore[arg-type]
    pos, i = 0, 0
    while pos < len(body):
        step = sizes[i % len(sizes)] if sizes else len(body)
        stream.feed(body[pos : pos + step])
        pos, i = pos + step, i + 1
    return stream


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    sizes=st.lists(st.integers(1, 97), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_accepts_and_matches_decode(dtype: str, sizes: list[int], seed: int) -> None:
    layers = [spec.model_copy(update={"dtype": dtype}) for spec in LAYERS]
    body = encode_frame(tensors(seed), meta(wire_dtype=dtype), dtype)  # type: ignore[arg-type]
    stream = feed_all(body, sizes, layers=layers, keep=lambda m, e: ["b"])
    got = stream.finish()
    want = decode_frame(body, layers=layers)
    assert got.meta == want.meta and got.entries == want.entries
    assert got.extra_metadata == want.extra_metadata
    assert list(got.tensors) == ["b"], "only the kept layer's bytes are kept"
    np.testing.assert_array_equal(got.tensors["b"], want.tensors["b"])


def _raw_frame(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bad_frames() -> dict[str, tuple[bytes, type[FrameError]]]:
    good = encode_frame(tensors(), meta())
    nan, inf = tensors(), tensors()
    nan["a"][2, 4] = np.nan
    inf["b"][0] = -np.inf
    wrong = tensors() | {"a": np.zeros((5, 3), np.float32)}
    meta_json = meta().model_dump_json()
    return {
        "empty": (b"", HeaderLengthError),
        "short": (b"\x01\x02", HeaderLengthError),
        "length zero": (struct.pack("<Q", 0) + b"{}", HeaderLengthError),
        "length huge": (struct.pack("<Q", 1 << 40) + b"{}", HeaderLengthError),
        "length past end": (struct.pack("<Q", 100) + b"{}  ", HeaderLengthError),
        "not json": (struct.pack("<Q", 8) + b"not json", HeaderError),
        "not object": (struct.pack("<Q", 8) + b"[1,2,3] ", HeaderError),
        "no metadata": (encode_frame(tensors()), MetadataError),
        "bad metadata": (
            _raw_frame({"__metadata__": {"tetherfed.snapshot": "{}"}}, b""),
            MetadataError,
        ),
        "bad offsets": (
            _raw_frame(
                {
                    "__metadata__": {"tetherfed.snapshot": meta_json},
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [4]},
                },
                b"xxxx",
            ),
            HeaderError,
        ),
        "bad dtype": (
            _raw_frame(
                {
                    "__metadata__": {"tetherfed.snapshot": meta_json},
                    "a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
                },
                b"x",
            ),
            DTypeError,
        ),
        "truncated": (good[:-3], ByteLengthError),
        "padded": (good + b"\x00" * 4, ByteLengthError),
        "missing layer": (encode_frame({"a": tensors()["a"]}, meta()), LayerMismatchError),
        "shape": (encode_frame(wrong, meta()), ShapeError),
        "dtype": (encode_frame(tensors(), meta(wire_dtype="float16"), "float16"), DTypeError),
        "wire dtype": (encode_frame(tensors(), meta(wire_dtype="float16")), DTypeError),
        "nan": (encode_frame(nan, meta()), NonFiniteError),
        "inf": (encode_frame(inf, meta()), NonFiniteError),
    }


def _decode_error(body: bytes, layers: list[LayerSpec]) -> FrameError:
    with pytest.raises(FrameError) as caught:
        decode_frame(body, layers=layers)
    return caught.value


@pytest.mark.parametrize("label", list(_bad_frames()))
@pytest.mark.parametrize("sizes", [[], [1], [3, 5, 64]])
def test_malformed_raises_what_decode_raises(label: str, sizes: list[int]) -> None:
    body, kind = _bad_frames()[label]
    expected = _decode_error(body, LAYERS)
    assert type(expected) is kind, f"{label}: decode_frame raised {expected!r}"
    with pytest.raises(FrameError) as caught:
        feed_all(body, sizes, layers=LAYERS).finish()
    assert type(caught.value) is kind, f"{label}: expected {kind.__name__}, got {caught.value!r}"
    assert str(caught.value) == str(expected), "the message is decode_frame's"


@given(
    sizes=st.lists(st.integers(1, 13), min_size=1, max_size=6),
    row=st.integers(0, 2),
    col=st.integers(0, 4),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
@settings(max_examples=100, deadline=None)
def test_nan_anywhere_names_its_layer(sizes: list[int], row: int, col: int, dtype: str) -> None:
    data = tensors()
    data["a"][row, col] = np.nan
    layers = [spec.model_copy(update={"dtype": dtype}) for spec in LAYERS]
    body = encode_frame(data, meta(wire_dtype=dtype), dtype)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match="layer 'a' contains NaN or Inf"):
        feed_all(body, sizes, layers=layers).finish()


def test_header_errors_come_before_the_data() -> None:
    body = encode_frame(tensors(), meta(wire_dtype="float16"))
    header_end = 8 + struct.unpack_from("<Q", body)[0]
    stream = FrameStream(len(body), LAYERS)
    with pytest.raises(DTypeError):
        stream.feed(body[:header_end])
    assert stream.pos == header_end, "the header was rejected before any data arrived"


def test_more_than_declared_is_rejected() -> None:
    body = encode_frame(tensors(), meta())
    stream = FrameStream(len(body) - 1, LAYERS)
    with pytest.raises(ByteLengthError, match="longer than its declared"):
        stream.feed(body)
