"""`make fuzz`, frame half: any bytes given to the frame decoders raise a FrameError
(a 4xx at the coordinator) or decode; never another exception, never a hang. Truncated,
mutated, oversized, duplicated keys, odd dtypes, huge shapes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether_protocol.frame import FrameError, HeaderError, decode_frame, encode_frame
from tether_protocol.framestream import FrameStream
from tether_protocol.messages import LayerSpec, SnapshotMeta

EXAMPLES = int(os.environ.get("FUZZ_FRAME_EXAMPLES", "100"))
LAYERS = [LayerSpec(name="a", shape=[2, 3]), LayerSpec(name="b", shape=[4])]
GOOD = encode_frame(
    {"a": np.full((2, 3), 0.25, np.float32), "b": np.full(4, 0.5, np.float32)},
    SnapshotMeta(worker_id="w", step=1, epoch=0),
)
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck))


def check(body: bytes) -> None:
    """Both decoders: a FrameError or a frame, and they agree on which."""
    try:
        decode_frame(body, layers=LAYERS)
        whole_ok = True
    except FrameError:
        whole_ok = False
    try:
        stream = FrameStream(len(body), LAYERS)
        for at in range(0, len(body), 7):
            stream.feed(body[at : at + 7])
        stream.finish()
        streamed_ok = True
    except FrameError:
        streamed_ok = False
    assert whole_ok == streamed_ok, "the streaming and whole-frame decoders disagree"


def with_header(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(body: bytes) -> None:
    check(body)


@FUZZ
@given(st.integers(0, len(GOOD) - 1))
def test_every_truncation(cut: int) -> None:
    check(GOOD[:cut])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=8))
def test_byte_flips(flips: list[tuple[int, int]]) -> None:
    body = bytearray(GOOD)
    for at, value in flips:
        body[at] = value
    check(bytes(body))


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "f32", ""]),
        "shape": st.lists(st.integers(-3, 2**62), max_size=5) | json_leaf,
        "data_offsets": st.lists(st.integers(-3, 2**62), max_size=3) | json_leaf,
    }
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), entries, max_size=4))
def test_odd_entries_dtypes_and_huge_shapes(header: dict[str, object]) -> None:
    check(with_header(header, b"\0" * 64))


def test_duplicate_keys_are_refused() -> None:
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
    try:
        decode_frame(with_header(None, b"\0" * 4, raw=raw))
    except HeaderError as error:
        assert "repeats the key" in str(error)
    else:
        raise AssertionError("a header with a duplicated key was accepted")


def test_pathological_json_is_a_header_error() -> None:
    for raw in (b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe{}"):
        try:
            decode_frame(with_header(None, raw=raw))
        except HeaderError:
            continue
        raise AssertionError(f"{raw[:20]!r}… was not refused as a header error")


def test_an_oversized_header_length_is_refused_without_reading_it() -> None:
    check(struct.pack("<Q", 2**63) + b"{}")
    check(struct.pack("<Q", 17 * 1024 * 1024) + b"{}")
