"""The binary tensor frame: one safetensors blob holding the tethered layers of a publish (those
the federation's policy looks at, at least: `check_layers`).

Layout (the safetensors format, so the `safetensors` library reads our frames and we read its):
8 bytes little-endian header length N, N bytes of JSON header (padded with spaces to 8-byte
alignment), then the raw little-endian tensor bytes back to back. The header maps each layer name
to {dtype, shape, data_offsets} and holds `__metadata__` (str → str); the snapshot metadata sits
under the key `tetherfed.snapshot` as JSON.

Besides one tensor per registered layer, a frame may carry each layer's probe Gram matrix (for
the `cka` measure, see `compat.probe_gram`) under the name `<layer>@probe_gram`: an n × n tensor,
with one n for the whole frame (the federation's probe batch size). They are optional, are not
part of the registered layer table, and are never tethers.

Parts (`Policy.merge_scope` weights or model): what a merge or drift of a layer moves besides
its tether, published by the worker right after that layer's tether (contiguous, so a pin of the
layer keeps few segments) under the names

* `<layer>@weight`: the tethered parameter's raw weight W (before the tether, the trainable
  `parametrizations.<param>.original`); `<layer>@weight:<original>` for each original of a
  parametrization with several (`weight_norm`: `original0`, the magnitude g, `original1`, the
  direction v);
* `<layer>@bias`: the layer's bias (the parameter named like the weight with `weight` replaced
  by `bias`: `bias`, `in_proj_bias`, `bias_ih_l0`), `<layer>@bias:<original>` likewise;
* `<layer>@model:<path>` (scope model): an untethered floating-point parameter or buffer of the
  model, by its qualified name (`bn1.running_mean`, `emb.weight`), carried by exactly one layer
  (`tetherfed.tethers.layer_parts` says which).

`<layer>` is a registered layer; the text after the last `@` names the part (so a path holds no
`@`, and a registered layer may not itself be spelled like a part or a probe Gram). Parts are
validated (their layer is registered, `LayerMismatchError`, as is a name with an unknown kind,
`fc1@typo`, which reads as an unregistered layer; finite, `NonFiniteError`; float32,
`DTypeError`) but not range-checked (weights are not in [0, 1]); their shapes are the model's
(not registered), and they never enter scoring: `split_probe_grams` and `split_entries` keep
them out of the tethers. Parts are always float32 on the wire, whatever the
frame's `wire_dtype` (which then applies to tethers and probe Grams): averaging weights rounded to
float16 loses 10 bits of mantissa at every merge (errors of 1e-3 relative compound across
merges), and a bf16 or fp16 model's own tensors widen to float32 exactly; a float64 model's are
rounded to float32 once per merge.

Decoding validates everything a hostile or broken client could get wrong and raises a subclass of
`FrameError` naming the problem. Decoded float32/float16 tensors are zero-copy views of the input
buffer; bfloat16 (which numpy lacks) is widened to float32, the one copy the format forces.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from .messages import LayerSpec, SnapshotMeta, WireDType

META_KEY = "tetherfed.snapshot"
PROBE_GRAM_SUFFIX = "@probe_gram"
# `GET …/workers/{wid}/decisions/tethers`: the decisions whose partner tether a frame leaves
# out, as JSON (decision id → why), under this `__metadata__` key.
MISSING_KEY = "tetherfed.missing"
PART_DTYPE: WireDType = "float32"  # every part travels as float32 (see the module docstring)
PART_KINDS = ("weight", "bias", "model")
# The text after a part's last `@`: weight or bias (optionally `:<original>`), or model:<path>.
_PART_RE = re.compile(r"^(?:(?:weight|bias)(?::[A-Za-z0-9_]+)?|model:[^@\x00]+)$")
MAX_HEADER_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct("<Q")

# wire dtype name -> (safetensors code, item size, numpy dtype used to hold the raw bytes)
_DTYPES: dict[str, tuple[str, int, np.dtype[Any]]] = {
    "float32": ("F32", 4, np.dtype("<f4")),
    "float16": ("F16", 2, np.dtype("<f2")),
    "bfloat16": ("BF16", 2, np.dtype("<u2")),
}
_BY_CODE = {code: name for name, (code, _, _) in _DTYPES.items()}


class FrameError(ValueError):
    """A frame could not be decoded; the message says what is wrong."""


class HeaderLengthError(FrameError):
    """The 8-byte header length is missing, zero, too large, or points past the end."""


class HeaderError(FrameError):
    """The JSON header is not valid JSON, or an entry lacks or misuses a field."""


class MetadataError(FrameError):
    """The snapshot metadata is missing or invalid."""


class DTypeError(FrameError):
    """A tensor uses a dtype other than F32, F16 or BF16, or not the one registered."""


class ShapeError(FrameError):
    """A tensor's shape is malformed or differs from the registered one."""


class ByteLengthError(FrameError):
    """Offsets overlap, leave gaps, disagree with dtype × shape, or the data is truncated."""


class NonFiniteError(FrameError):
    """A tensor holds NaN or ±Inf."""


class RangeError(FrameError):
    """A tether value lies outside [0, 1] (tethers are in [0, 1] by definition: docs/protocol.md,
    "Concepts")."""


class LayerMismatchError(FrameError):
    """The frame holds a layer that is not registered, or lacks one it must hold."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a frame (offsets are absolute, from the frame's start)."""

    name: str
    dtype: WireDType
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class Frame:
    """A decoded frame: snapshot metadata, entries, and float arrays (views where possible)."""

    meta: SnapshotMeta | None
    entries: dict[str, TensorEntry]
    tensors: dict[str, npt.NDArray[np.floating[Any]]] = field(default_factory=dict)
    extra_metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def to_wire(array: npt.ArrayLike, dtype: WireDType = "float32") -> npt.NDArray[Any]:
    """The array as contiguous little-endian bytes of a wire dtype (no copy when already so)."""
    if dtype not in _DTYPES:
        raise DTypeError(f"unsupported wire dtype {dtype!r}; use float32, float16 or bfloat16")
    arr = np.asarray(array)
    if dtype == "bfloat16":
        # Round to nearest even from float32, keeping the high 16 bits.
        bits = np.ascontiguousarray(arr, dtype="<f4").view("<u4")
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype("<u2")
    return np.ascontiguousarray(arr, dtype=_DTYPES[dtype][2])


def encode_parts(
    tensors: Mapping[str, npt.ArrayLike],
    meta: SnapshotMeta | None = None,
    dtype: WireDType = "float32",
    extra_metadata: Mapping[str, str] | None = None,
) -> list[memoryview]:
    """The frame as a list of buffers (header, then each tensor) to send without joining.

    Tensors are written in `tensors`' order as `dtype`, but parts (`is_part_name`), which are
    always float32 (`PART_DTYPE`)."""
    if dtype not in _DTYPES:
        raise DTypeError(f"unsupported wire dtype {dtype!r}; use float32, float16 or bfloat16")
    header: dict[str, Any] = {}
    metadata = dict(extra_metadata or {})
    if meta is not None:
        metadata[META_KEY] = meta.model_dump_json()
    if metadata:
        header["__metadata__"] = metadata
    buffers: list[memoryview] = []
    offset = 0
    for name, value in tensors.items():
        own: WireDType = PART_DTYPE if is_part_name(name) else dtype
        wire = to_wire(value, own)
        header[name] = {
            "dtype": _DTYPES[own][0],
            "shape": list(wire.shape),
            "data_offsets": [offset, offset + wire.nbytes],
        }
        offset += wire.nbytes
        buffers.append(memoryview(wire.reshape(-1).view(np.uint8).data))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [memoryview(_LEN.pack(len(raw)) + raw), *buffers]


def encode_frame(
    tensors: Mapping[str, npt.ArrayLike],
    meta: SnapshotMeta | None = None,
    dtype: WireDType = "float32",
    extra_metadata: Mapping[str, str] | None = None,
) -> bytes:
    """One safetensors frame holding `tensors` (name → array) and the snapshot metadata."""
    return b"".join(encode_parts(tensors, meta, dtype, extra_metadata))


def frame_size(parts: Iterable[memoryview]) -> int:
    """Total byte length of a frame given as parts."""
    return sum(p.nbytes for p in parts)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def read_header(buf: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """Parse and return (header JSON, offset where the data section starts)."""
    view = memoryview(buf)
    if view.nbytes < 8:
        raise HeaderLengthError(
            f"frame is {view.nbytes} bytes; it must start with an 8-byte header length"
        )
    (length,) = _LEN.unpack_from(view, 0)
    if length < 2 or length > MAX_HEADER_BYTES:
        raise HeaderLengthError(f"header length {length} is outside [2, {MAX_HEADER_BYTES}]")
    if 8 + length > view.nbytes:
        raise HeaderLengthError(
            f"header length {length} runs past the end of a {view.nbytes}-byte frame"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + length]), object_pairs_hook=_unique_keys)
    except FrameError:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4300+ digit ints, nesting
        raise HeaderError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("header must be a JSON object")
    return header, 8 + length


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({key for key in keys if keys.count(key) > 1})
        raise HeaderError(f"header repeats the key(s) {twice}")
    return dict(pairs)


def parse_entries(header: Mapping[str, Any], data_start: int, total: int) -> dict[str, TensorEntry]:
    """Validate every tensor entry of a header against the frame's byte length."""
    entries: dict[str, TensorEntry] = {}
    cursor = 0
    items = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: _offsets(kv[0], kv[1])[0],
    )
    for name, spec in items:
        dtype = _entry_dtype(name, spec)
        shape = _entry_shape(name, spec)
        begin, end = _offsets(name, spec)
        expected = _DTYPES[dtype][1] * math.prod(shape)  # Python ints: huge shapes cannot wrap
        if begin != cursor:
            raise ByteLengthError(
                f"tensor {name!r} starts at {begin}, expected {cursor} (gap or overlap)"
            )
        if end - begin != expected:
            raise ByteLengthError(
                f"tensor {name!r} has {end - begin} bytes; "
                f"dtype {dtype} × shape {list(shape)} needs {expected}"
            )
        cursor = end
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    if data_start + cursor != total:
        raise ByteLengthError(
            f"data section is {total - data_start} bytes but the header describes {cursor} "
            "(truncated or padded)"
        )
    return entries


def _offsets(name: str, spec: Any) -> tuple[int, int]:
    offs = spec.get("data_offsets") if isinstance(spec, dict) else None
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise HeaderError(
            f"tensor {name!r}: data_offsets must be [begin, end] with 0 ≤ begin ≤ end"
        )
    return offs[0], offs[1]


def _entry_dtype(name: str, spec: Mapping[str, Any]) -> WireDType:
    code = spec.get("dtype")
    if code not in _BY_CODE:
        raise DTypeError(f"tensor {name!r} has dtype {code!r}; frames carry F32, F16 or BF16")
    return _BY_CODE[code]  # type: ignore[return-value]


def _entry_shape(name: str, spec: Mapping[str, Any]) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ShapeError(
            f"tensor {name!r} has shape {shape!r}; expected a list of non-negative ints"
        )
    return tuple(shape)


def parse_meta(
    header: Mapping[str, Any], worker_id: str | None = None
) -> tuple[SnapshotMeta | None, dict[str, str]]:
    """The snapshot metadata (None when absent) and any other `__metadata__` strings.

    Two forms are read: ours, SnapshotMeta as JSON under `tetherfed.snapshot`; and the flat one
    other safetensors writers use, one string per field (`{"step": "10", "epoch": "0", "loss":
    "0.5"}`; `generations` as a JSON object), recognised by its `step` key, with `worker_id`
    taken from the metadata or else from the argument (the coordinator passes the URL's)."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MetadataError("__metadata__ must be an object of string values")
    if META_KEY not in metadata and "step" in metadata:
        return _flat_meta(metadata, worker_id)
    extra = {k: v for k, v in metadata.items() if k != META_KEY}
    if META_KEY not in metadata:
        return None, extra
    try:
        return SnapshotMeta.model_validate_json(metadata[META_KEY]), extra
    except ValidationError as exc:
        raise MetadataError(f"snapshot metadata is invalid: {_first_error(exc)}") from None


_FLAT_FIELDS = frozenset(SnapshotMeta.model_fields)


def _flat_meta(
    metadata: Mapping[str, str], worker_id: str | None
) -> tuple[SnapshotMeta, dict[str, str]]:
    fields: dict[str, Any] = {k: v for k, v in metadata.items() if k in _FLAT_FIELDS}
    extra = {k: v for k, v in metadata.items() if k not in _FLAT_FIELDS}
    for key in ("loss", "grad_norm"):
        if fields.get(key, "").strip().lower() in ("", "null", "none", "nan"):
            fields.pop(key, None)
    fields.setdefault("worker_id", worker_id)
    fields.setdefault("epoch", "0")
    try:
        if "generations" in fields:
            fields["generations"] = json.loads(fields["generations"])
        return SnapshotMeta.model_validate(fields), extra
    except (ValueError, ValidationError) as exc:
        why = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise MetadataError(f"flat snapshot metadata is invalid: {why}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "metadata"
    return f"{where}: {err['msg']}"


def probe_gram_name(layer: str) -> str:
    """The frame entry name of a layer's probe Gram matrix."""
    return layer + PROBE_GRAM_SUFFIX


def part_name(layer: str, part: str) -> str:
    """The frame entry name of a layer's part: `part` is `weight`, `bias` (either optionally
    `:<original>`) or `model:<path>`. Raises ValueError for any other part."""
    if not _PART_RE.match(part):
        raise ValueError(
            f"part {part!r} of layer {layer!r} is not weight, bias, weight:<original>, "
            "bias:<original> or model:<path> (a path without '@')"
        )
    return f"{layer}@{part}"


def is_part_name(name: str) -> bool:
    """Whether a frame entry name is spelled as a part (`<layer>@weight`, `<layer>@model:x`)."""
    _, at, part = name.rpartition("@")
    return bool(at) and _PART_RE.match(part) is not None


def part_layer(name: str) -> tuple[str, str]:
    """(layer, part) of a part's entry name: `fc1@weight` → ("fc1", "weight"). ValueError for
    a name that is not spelled as a part."""
    layer, at, part = name.rpartition("@")
    if not at or _PART_RE.match(part) is None:
        raise ValueError(f"{name!r} is not a part name (<layer>@weight, @bias, @model:<path>)")
    return layer, part


@dataclass(frozen=True)
class EntrySplit:
    """A frame's entries by role: tethers by layer, probe Grams by layer, and parts by layer
    (then by entry name, in frame order)."""

    tethers: dict[str, TensorEntry]
    grams: dict[str, TensorEntry]
    parts: dict[str, dict[str, TensorEntry]]


def split_entries(entries: Mapping[str, TensorEntry]) -> EntrySplit:
    """Sort a frame's entries into tethers, probe Grams and parts, by their names' suffixes
    (`@probe_gram`; a part's `@weight`, `@bias`, `@model:<path>`; anything else is a tether)."""
    out = EntrySplit({}, {}, {})
    for name, entry in entries.items():
        if name.endswith(PROBE_GRAM_SUFFIX):
            out.grams[name.removesuffix(PROBE_GRAM_SUFFIX)] = entry
        elif is_part_name(name):
            out.parts.setdefault(part_layer(name)[0], {})[name] = entry
        else:
            out.tethers[name] = entry
    return out


def split_probe_grams(
    entries: Mapping[str, TensorEntry],
) -> tuple[dict[str, TensorEntry], dict[str, TensorEntry]]:
    """(tether entries by layer, probe Gram entries by the layer they describe); parts are in
    neither (`split_entries` returns them)."""
    split = split_entries(entries)
    return split.tethers, split.grams


def with_parts(
    tensors: Mapping[str, Any], parts: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """`tensors` (tethers by layer, then anything else) with each layer's parts (entry name →
    array, by layer) placed right after that layer's tether: the frame order that keeps a
    layer and its parts contiguous. Raises ValueError for parts of a layer not in `tensors`."""
    unknown = [layer for layer in parts if layer not in tensors]
    if unknown:
        raise ValueError(f"parts of layers that are not in the frame: {unknown}")
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        out[name] = value
        out.update(parts.get(name, {}))
    return out


def _check_parts(
    parts: Mapping[str, Mapping[str, TensorEntry]], registered: Mapping[str, Any]
) -> None:
    unknown = sorted(
        name for layer, named in parts.items() if layer not in registered for name in named
    )
    if unknown:
        raise LayerMismatchError(f"parts of layers that are not registered: {unknown}")


def _check_probe_grams(grams: Mapping[str, TensorEntry], registered: Mapping[str, Any]) -> None:
    unknown = [name for name in grams if name not in registered]
    if unknown:
        raise LayerMismatchError(f"probe Grams of layers that are not registered: {unknown}")
    sizes = set()
    for name, entry in grams.items():
        if len(entry.shape) != 2 or entry.shape[0] != entry.shape[1] or entry.shape[0] < 2:
            raise ShapeError(
                f"probe Gram of layer {name!r} has shape {list(entry.shape)}; "
                "expected [n, n], n ≥ 2"
            )
        sizes.add(entry.shape[0])
    if len(sizes) > 1:
        raise ShapeError(f"probe Grams of one frame must share one size n, got {sorted(sizes)}")


def check_layers(
    entries: Mapping[str, TensorEntry],
    layers: Sequence[LayerSpec],
    required: Collection[str] | None = None,
) -> None:
    """Raise unless the frame holds the registered layers, with their shapes and dtypes (plus,
    optionally, probe Grams and parts of registered layers: `LayerMismatchError` naming those
    of other layers). `required` names the layers it must hold (default: all of them; a worker
    publishes only the layers its federation's policy looks at, `policy.layers_in_scope`), the
    others being optional."""
    registered = {layer.name: layer for layer in layers}
    split = split_entries(entries)
    entries, grams = split.tethers, split.grams
    _check_probe_grams(grams, registered)
    _check_parts(split.parts, registered)
    needed = registered if required is None else required
    missing = [name for name in needed if name not in entries]
    unknown = [name for name in entries if name not in registered]
    if missing or unknown:
        raise LayerMismatchError(
            f"frame layers differ from the registered table: missing {missing}, unknown {unknown}"
        )
    for name, entry in entries.items():
        spec = registered[name]
        if list(entry.shape) != spec.shape:
            raise ShapeError(
                f"layer {name!r} has shape {list(entry.shape)}; registered {spec.shape}"
            )
        if entry.dtype != spec.dtype:
            raise DTypeError(f"layer {name!r} has dtype {entry.dtype}; registered {spec.dtype}")


def tensor_view(
    buf: bytes | bytearray | memoryview, entry: TensorEntry
) -> npt.NDArray[np.floating[Any]]:
    """The tensor as float32/float16 (a view of `buf`), or float32 widened from bfloat16."""
    raw = np.frombuffer(
        buf,
        dtype=_DTYPES[entry.dtype][2],
        count=(entry.end - entry.start) // _DTYPES[entry.dtype][1],
        offset=entry.start,
    )
    if entry.dtype == "bfloat16":
        raw = (raw.astype("<u4") << np.uint32(16)).view("<f4")
    return raw.reshape(entry.shape)


def decode_frame(
    buf: bytes | bytearray | memoryview,
    *,
    layers: Sequence[LayerSpec] | None = None,
    require_meta: bool = True,
    check_finite: bool = True,
    unit_range: bool = True,
    worker_id: str | None = None,
) -> Frame:
    """Decode and validate a frame.

    `layers`, when given, must match the frame exactly (names, shapes, dtypes). With
    `check_finite`, any NaN or ±Inf raises `NonFiniteError` naming the layer; with `unit_range`
    (and `check_finite`), a tether value outside [0, 1] raises `RangeError` naming the layer
    (probe Grams and parts are only checked for finiteness). `worker_id` completes flat
    metadata that
    does not name its worker (see `parse_meta`).
    """
    header, data_start = read_header(buf)
    meta, extra = parse_meta(header, worker_id)
    if require_meta and meta is None:
        raise MetadataError(f"frame has no snapshot metadata under __metadata__[{META_KEY!r}]")
    entries = parse_entries(header, data_start, memoryview(buf).nbytes)
    if layers is not None:
        check_layers(entries, layers)
    if meta is not None:
        check_wire_dtype(entries, meta.wire_dtype)
    tensors = {name: tensor_view(buf, entry) for name, entry in entries.items()}
    if check_finite:
        for name, array in tensors.items():
            if not np.isfinite(array).all():
                raise NonFiniteError(f"layer {name!r} contains NaN or Inf")
            tether = unit_range and is_tether_name(name)  # Grams and parts are unbounded
            outside = array[(array < 0.0) | (array > 1.0)] if tether else array[:0]
            if outside.size:
                raise RangeError(out_of_range(name, float(outside.flat[0])))
    return Frame(meta=meta, entries=entries, tensors=tensors, extra_metadata=extra)


def out_of_range(layer: str, value: float) -> str:
    """The message of a `RangeError`: the layer and its first value outside [0, 1]."""
    return f"layer {layer!r} has a value outside [0, 1]: {value:g}"


def is_tether_name(name: str) -> bool:
    """Whether a frame entry holds a tether (values in [0, 1]): neither a probe Gram nor a part."""
    return not name.endswith(PROBE_GRAM_SUFFIX) and not is_part_name(name)


def check_wire_dtype(entries: Mapping[str, TensorEntry], wire: WireDType) -> None:
    """Raise unless every tensor uses the wire dtype the metadata declares (parts: float32)."""
    for name, entry in entries.items():
        if is_part_name(name):
            if entry.dtype != PART_DTYPE:
                raise DTypeError(
                    f"part {name!r} is {entry.dtype}; parts are always {PART_DTYPE} on the wire"
                )
            continue
        if entry.dtype != wire:
            raise DTypeError(
                f"layer {name!r} is {entry.dtype} but the metadata says wire_dtype {wire}"
            )
