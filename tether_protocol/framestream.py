"""Incremental frame validation: feed a frame in chunks of any size, learn it is bad early.

`FrameStream` applies the checks of `frame.decode_frame` as the bytes arrive, in the same order
and with the same typed errors: the header (length, JSON, metadata, entries against the declared
total length, the registered layer table, the wire dtype) as soon as it is complete, then the
finiteness of the data section chunk by chunk, carrying partial elements across chunk
boundaries. It keeps no copy of the data section except the layers a caller asks to keep (chosen
once the header is known), so a large frame can be forwarded elsewhere while it is validated.
No I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .frame import (
    MAX_HEADER_BYTES,
    META_KEY,
    ByteLengthError,
    Frame,
    FrameError,
    MetadataError,
    NonFiniteError,
    RangeError,
    TensorEntry,
    check_layers,
    check_wire_dtype,
    is_tether_name,
    out_of_range,
    parse_entries,
    parse_meta,
    read_header,
    tensor_view,
)
from .messages import LayerSpec, SnapshotMeta

KeepFn = Callable[[SnapshotMeta | None, Mapping[str, TensorEntry]], Collection[str]]

# wire dtype -> (item size, raw numpy dtype, mask of the exponent bits: all ones is NaN or Inf,
# the bits of 1.0). As unsigned integers, the values in [0, 1] are exactly the bits ≤ those of 1.0
# (and -0.0, the sign bit alone), so one integer comparison checks both finiteness and range.
_RAW: dict[str, tuple[int, np.dtype[Any], int, int]] = {
    "float32": (4, np.dtype("<u4"), 0x7F800000, 0x3F800000),
    "float16": (2, np.dtype("<u2"), 0x7C00, 0x3C00),
    "bfloat16": (2, np.dtype("<u2"), 0x7F80, 0x3F80),
}


@dataclass(frozen=True)
class _Run:
    """A stretch of the data section whose tensors share one dtype (absolute offsets)."""

    start: int
    end: int
    dtype: str
    unit: bool  # tethers, whose values lie in [0, 1] (probe Grams and parts are only finite)


class FrameStream:
    """Validate a frame of `total` bytes fed in chunks; `finish()` returns its `Frame`.

    `layers`, `require_meta`, `check_finite`, `unit_range` and `worker_id` mean what they mean
    for `decode_frame`; `required`, the layers of `layers` the frame must hold (default: all,
    see `check_layers`). `keep`, called once with the metadata and entries when the header is
    complete, names the layers whose bytes to keep; the returned frame's `tensors` holds
    exactly those.
    """

    def __init__(
        self,
        total: int,
        layers: Sequence[LayerSpec] | None = None,
        *,
        require_meta: bool = True,
        check_finite: bool = True,
        unit_range: bool = True,
        keep: KeepFn | None = None,
        worker_id: str | None = None,
        required: Collection[str] | None = None,
    ) -> None:
        self.total, self.required = total, required
        self.layers, self.require_meta, self.check_finite = layers, require_meta, check_finite
        self.unit_range, self.worker_id = unit_range, worker_id
        self._keep_fn = keep
        self.pos = 0
        self._head = bytearray()
        self._need = 8  # header bytes wanted before the next parsing step
        self._frame: Frame | None = None
        self._runs: list[_Run] = []
        self._starts: list[int] = []
        self._carry = bytearray()
        self._kept: dict[str, bytearray] = {}

    @property
    def frame(self) -> Frame | None:
        """The frame's metadata and entries once its header is complete (no tensors yet)."""
        return self._frame

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes; raises the `FrameError` subclass `decode_frame` would."""
        view = memoryview(chunk).cast("B")
        if self.pos + view.nbytes > self.total:
            raise ByteLengthError(f"frame is longer than its declared {self.total} bytes")
        if self._frame is None:
            view = self._feed_head(view)
        if view.nbytes:
            self._feed_data(view)

    def finish(self) -> Frame:
        """The validated frame, once exactly `total` bytes were fed."""
        if self._frame is None:
            read_header(self._head)  # raises: the frame ended inside its header
            raise ByteLengthError("frame ended inside its header")  # pragma: no cover
        if self.pos != self.total:
            raise ByteLengthError(f"frame ended after {self.pos} of {self.total} bytes")
        tensors = {
            name: tensor_view(buf, _rebased(self._frame.entries[name]))
            for name, buf in self._kept.items()
        }
        return Frame(self._frame.meta, self._frame.entries, tensors, self._frame.extra_metadata)

    # ---------------------------------------------------------------- header
    def _feed_head(self, view: memoryview) -> memoryview:
        while self._frame is None and view.nbytes:
            take = min(self._need - len(self._head), view.nbytes)
            self._head += view[:take]
            self.pos += take
            view = view[take:]
            if len(self._head) == self._need:
                self._advance_head()
        return view

    def _advance_head(self) -> None:
        if self._need == 8:
            length = int.from_bytes(self._head[:8], "little")
            if not 2 <= length <= MAX_HEADER_BYTES:
                read_header(self._head)  # raises read_header's out-of-range error
            # A header running past the end: read_header names that once all bytes are here.
            self._need = min(8 + length, self.total)
            if self._need > len(self._head):
                return
        self._parse_header()

    def _parse_header(self) -> None:
        header, data_start = read_header(self._head)
        meta, extra = parse_meta(header, self.worker_id)
        if self.require_meta and meta is None:
            raise MetadataError(f"frame has no snapshot metadata under __metadata__[{META_KEY!r}]")
        entries = parse_entries(header, data_start, self.total)
        if self.layers is not None:
            check_layers(entries, self.layers, self.required)
        if meta is not None:
            check_wire_dtype(entries, meta.wire_dtype)
        self._frame = Frame(meta=meta, entries=entries, extra_metadata=extra)
        self._runs = _runs(entries.values())
        self._starts = [e.start for e in entries.values()]
        wanted = self._keep_fn(meta, entries) if self._keep_fn else ()
        self._kept = {name: bytearray() for name in entries if name in set(wanted)}

    # ---------------------------------------------------------------- data section
    def _feed_data(self, view: memoryview) -> None:
        begin, end = self.pos, self.pos + view.nbytes
        if self.check_finite:
            for run in self._runs:
                lo, hi = max(begin, run.start), min(end, run.end)
                if lo < hi:
                    self._check_run(run, view[lo - begin : hi - begin], lo)
        assert self._frame is not None
        for name, buf in self._kept.items():
            entry = self._frame.entries[name]
            lo, hi = max(begin, entry.start), min(end, entry.end)
            if lo < hi:
                buf.extend(view[lo - begin : hi - begin])
        self.pos = end

    def _check_run(self, run: _Run, part: memoryview, at: int) -> None:
        size, raw = _RAW[run.dtype][:2]
        if self._carry:
            fill = min(size - len(self._carry), part.nbytes)
            self._carry += part[:fill]
            part, at = part[fill:], at + fill
            if len(self._carry) == size:
                self._check_values(np.frombuffer(self._carry, raw), run, at - size)
                self._carry.clear()
        whole = part.nbytes - part.nbytes % size
        self._check_values(np.frombuffer(part, raw, whole // size), run, at)
        self._carry += part[whole:]

    def _check_values(self, bits: npt.NDArray[Any], run: _Run, at: int) -> None:
        dtype, unit = run.dtype, self.unit_range and run.unit
        size, _, mask, one = _RAW[dtype]
        kind = bits.dtype.type
        if unit and (bits <= kind(one)).all():
            return  # the fast path: every value in [0, 1] (so finite)
        if not unit and size == 4 and np.isfinite(bits.view("<f4")).all():
            return
        nonfinite = (bits & kind(mask)) == kind(mask)
        bad = nonfinite
        if unit:
            bad = bad | ((bits > kind(one)) & (bits != kind(1 << (8 * size - 1))))  # -0.0 is in
        if bad.any():
            index = int(np.argmax(bad))
            layer = self._layer_at(at + index * size)
            if nonfinite[index]:
                raise NonFiniteError(f"layer {layer!r} contains NaN or Inf")
            raise RangeError(out_of_range(layer, _float_of(bits[index : index + 1], dtype)))

    def _layer_at(self, offset: int) -> str:
        assert self._frame is not None
        names = list(self._frame.entries)
        return names[bisect.bisect_right(self._starts, offset) - 1]


def _float_of(bits: npt.NDArray[Any], dtype: str) -> float:
    if dtype == "bfloat16":
        return float((bits.astype("<u4") << np.uint32(16)).view("<f4")[0])
    return float(bits.view("<f4" if dtype == "float32" else "<f2")[0])


def _runs(entries: Collection[TensorEntry]) -> list[_Run]:
    runs: list[_Run] = []
    for entry in entries:
        if entry.start == entry.end:
            continue
        unit = is_tether_name(entry.name)  # probe Grams and parts are only finite
        last = runs[-1] if runs else None
        if last and (last.dtype, last.unit, last.end) == (entry.dtype, unit, entry.start):
            runs[-1] = _Run(last.start, entry.end, entry.dtype, unit)
        else:
            runs.append(_Run(entry.start, entry.end, entry.dtype, unit))
    return runs


def _rebased(entry: TensorEntry) -> TensorEntry:
    return TensorEntry(entry.name, entry.dtype, entry.shape, 0, entry.end - entry.start)


__all__ = ["FrameError", "FrameStream", "KeepFn"]
