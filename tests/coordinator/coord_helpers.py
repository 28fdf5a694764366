"""Helpers for coordinator tests: layer tables, frames and the keys a test wrote."""

from __future__ import annotations

from typing import Any

import numpy as np

from tether_protocol.frame import encode_frame
from tether_protocol.messages import SnapshotMeta
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.topology import sync_client

LAYERS = [
    {"name": "fc1", "shape": [8, 4], "dtype": "float32"},
    {"name": "fc2", "shape": [4, 2], "dtype": "float32"},
]


def tensors(seed: int = 0, base: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Random tethers for LAYERS (or `base` plus small noise)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in LAYERS:
        noise = rng.random(spec["shape"], dtype=np.float32)
        near = None if base is None else np.clip(base[spec["name"]] + 0.01 * noise, 0.0, 1.0)
        out[spec["name"]] = noise if near is None else near  # tethers lie in [0, 1]
    return out


def frame(wid: str, step: int = 1, data: dict[str, Any] | None = None, **meta: Any) -> bytes:
    """A valid frame for LAYERS published by `wid`."""
    snapshot = SnapshotMeta(worker_id=wid, step=step, epoch=meta.pop("epoch", 0), **meta)
    return encode_frame(data if data is not None else tensors(step), snapshot)


def worker_body(name: str = "w") -> dict[str, Any]:
    """A registration body."""
    return {"name": name, "layers": LAYERS, "meta": {"gpu": 0}}


EVERY_PUBLISH = {
    "measure": "pearson",
    "trigger": "every_publish",
    "cooldown_steps": 0,
    "merge_threshold": 0.5,
    "drift_threshold": -0.5,
}


def keys_of(url: str, prefix: str) -> set[bytes]:
    """Every key under `prefix` on the Redis at `url`."""
    client = sync_client(url)
    try:
        return set(client.scan_iter(match=glob_escape(prefix) + "*"))
    finally:
        client.close()
