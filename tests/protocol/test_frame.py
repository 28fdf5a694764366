"""Frame codec: round trips, interoperability with the safetensors library, each malformed class."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tether_protocol.frame import (
    ByteLengthError,
    DTypeError,
    HeaderError,
    HeaderLengthError,
    LayerMismatchError,
    MetadataError,
    NonFiniteError,
    ShapeError,
    decode_frame,
    encode_frame,
    encode_parts,
)
from tether_protocol.messages import LayerSpec, SnapshotMeta

META = SnapshotMeta(worker_id="w-1", step=7, epoch=1, loss=0.5, grad_norm=0.2, plateau=True)


def tethers(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1": rng.random((64, 128), dtype=np.float32),
        "fc2": rng.random((64, 64), dtype=np.float32),
        "conv": rng.random((4, 1, 3, 3), dtype=np.float32),
    }


shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays=st.lists(hnp.arrays(np.float32, shapes, elements=finite32), min_size=1, max_size=4))
def test_float32_round_trip_is_bit_exact(arrays: list[np.ndarray]) -> None:
    named = {f"layer{i}": a for i, a in enumerate(arrays)}
    frame = decode_frame(encode_frame(named, META), unit_range=False)  # any float, not only tethers
    assert frame.meta == META
    for name, array in named.items():
        assert frame.tensors[name].dtype == np.float32
        assert frame.tensors[name].tobytes() == array.tobytes(), f"{name} changed in transit"


def test_safetensors_library_reads_our_frames_and_we_read_its() -> None:
    named = tethers()
    loaded = st_load(encode_frame(named, META))
    for name, array in named.items():
        np.testing.assert_array_equal(loaded[name], array)
    theirs = st_save(named, metadata={"tetherfed.snapshot": META.model_dump_json()})
    frame = decode_frame(theirs)
    assert frame.meta == META
    np.testing.assert_array_equal(frame.tensors["fc2"], named["fc2"])


def test_decoded_float32_tensors_are_views_of_the_buffer() -> None:
    buf = bytearray(encode_frame(tethers(), META))
    frame = decode_frame(buf)
    assert not frame.tensors["fc1"].flags.owndata, "decoding copied a float32 tensor"


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 1e-3), ("bfloat16", 4e-3)])
def test_half_precision_wire_dtypes(dtype: str, tolerance: float) -> None:
    named = tethers()
    meta = META.model_copy(update={"wire_dtype": dtype})
    frame = decode_frame(encode_frame(named, meta, dtype=dtype))  # type: ignore[arg-type]
    assert frame.entries["fc1"].dtype == dtype
    for name, array in named.items():
        np.testing.assert_allclose(frame.tensors[name], array, atol=tolerance)


def test_bfloat16_frames_are_readable_by_safetensors() -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load as torch_load

    named = tethers()
    meta = META.model_copy(update={"wire_dtype": "bfloat16"})
    loaded = torch_load(encode_frame(named, meta, dtype="bfloat16"))
    assert loaded["fc2"].dtype == torch.bfloat16
    np.testing.assert_allclose(loaded["fc2"].float().numpy(), named["fc2"], atol=4e-3)


def test_encode_parts_join_to_the_frame() -> None:
    parts = encode_parts(tethers(), META)
    assert b"".join(parts) == encode_frame(tethers(), META)


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD_META = {"tetherfed.snapshot": META.model_dump_json()}
FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


def _entry(
    dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None
) -> dict:
    return {"dtype": dtype, "shape": shape or [2, 2], "data_offsets": offsets or [0, 16]}


MALFORMED = {
    "empty": (b"", HeaderLengthError, "8-byte header length"),
    "header length past end": (struct.pack("<Q", 1000) + b"{}", HeaderLengthError, "past the end"),
    "huge header length": (struct.pack("<Q", 1 << 40) + b"{}", HeaderLengthError, "outside"),
    "not json": (struct.pack("<Q", 4) + b"{{{{", HeaderError, "not valid JSON"),
    "json list": (_with_header([], b""), HeaderError, "JSON object"),  # type: ignore[arg-type]
    "bad offsets": (
        _with_header(
            {"__metadata__": GOOD_META, "a": {"dtype": "F32", "shape": [4], "data_offsets": "x"}},
            FOUR_FLOATS,
        ),
        HeaderError,
        "data_offsets",
    ),
    "int dtype": (
        _with_header({"__metadata__": GOOD_META, "a": _entry("I32")}, FOUR_FLOATS),
        DTypeError,
        "'I32'",
    ),
    "bad shape": (
        _with_header({"__metadata__": GOOD_META, "a": _entry(shape=[2, -2])}, FOUR_FLOATS),
        ShapeError,
        "shape",
    ),
    "length disagrees with shape": (
        _with_header({"__metadata__": GOOD_META, "a": _entry(shape=[3, 2])}, FOUR_FLOATS),
        ByteLengthError,
        "needs 24",
    ),
    "truncated data": (
        _with_header({"__metadata__": GOOD_META, "a": _entry()}, FOUR_FLOATS[:10]),
        ByteLengthError,
        "truncated",
    ),
    "gap between tensors": (
        _with_header(
            {
                "__metadata__": GOOD_META,
                "a": _entry(shape=[1], offsets=[0, 4]),
                "b": _entry(shape=[1], offsets=[8, 12]),
            },
            FOUR_FLOATS[:12],
        ),
        ByteLengthError,
        "gap or overlap",
    ),
    "no metadata": (
        _with_header({"a": _entry()}, FOUR_FLOATS),
        MetadataError,
        "no snapshot metadata",
    ),
    "invalid metadata": (
        _with_header(
            {"__metadata__": {"tetherfed.snapshot": '{"step": -1}'}, "a": _entry()}, FOUR_FLOATS
        ),
        MetadataError,
        "snapshot metadata is invalid",
    ),
    "nan": (
        _with_header(
            {"__metadata__": GOOD_META, "a": _entry()},
            np.array([0, np.nan, 1, 2], np.float32).tobytes(),
        ),
        NonFiniteError,
        "'a' contains NaN or Inf",
    ),
    "inf": (
        _with_header(
            {"__metadata__": GOOD_META, "a": _entry()},
            np.array([0, np.inf, 1, 2], np.float32).tobytes(),
        ),
        NonFiniteError,
        "NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_frame_class_has_its_own_error(case: str) -> None:
    data, error, message = MALFORMED[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        decode_frame(data)


def test_wire_dtype_in_metadata_must_match_tensors() -> None:
    frame = encode_frame(tethers(), META, dtype="float16")
    with pytest.raises(DTypeError, match="wire_dtype float32"):
        decode_frame(frame)


def test_layer_table_is_enforced() -> None:
    named = tethers()
    table = [LayerSpec(name=n, shape=list(a.shape)) for n, a in named.items()]
    decode_frame(encode_frame(named, META), layers=table)
    with pytest.raises(LayerMismatchError, match=r"missing \['conv'\]"):
        decode_frame(encode_frame({k: named[k] for k in ("fc1", "fc2")}, META), layers=table)
    wrong = [*table[:2], LayerSpec(name="conv", shape=[4, 9])]
    with pytest.raises(ShapeError, match="registered"):
        decode_frame(encode_frame(named, META), layers=wrong)
    half = [LayerSpec(name=t.name, shape=t.shape, dtype="float16") for t in table]
    with pytest.raises(DTypeError, match="registered float16"):
        decode_frame(encode_frame(named, META), layers=half)
