"""BLAS threads per scoring round: one for small rounds, the library's own count for large ones."""

from __future__ import annotations

from tether_protocol.messages import SnapshotMeta
from tetherfed_coordinator.scoring import SMALL_ROUND_BYTES, _blas, size_blas_threads
from tetherfed_coordinator.store import Snapshot


def snapshots(nbytes: int) -> dict[str, Snapshot]:
    meta = SnapshotMeta(worker_id="a", step=0, epoch=0)
    return {"a": Snapshot("a", 1, 0, 0, None, meta, bytes(nbytes), {})}


def thread_counts() -> set[int]:
    blas, _ = _blas()
    return {lib["num_threads"] for lib in blas.info()}


def test_small_rounds_use_one_blas_thread_and_large_ones_all() -> None:
    _, threads = _blas()
    try:
        size_blas_threads(snapshots(SMALL_ROUND_BYTES - 1))
        assert thread_counts() == {1}
        size_blas_threads(snapshots(SMALL_ROUND_BYTES))
        assert thread_counts() == {threads}
    finally:
        size_blas_threads(snapshots(SMALL_ROUND_BYTES))
