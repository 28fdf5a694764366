"""HTTP errors with stable `detail` strings (tests and the SDK assert on them)."""

from __future__ import annotations

from fastapi import HTTPException


def federation_not_found(fed: str) -> HTTPException:
    """404 for an unknown federation."""
    return HTTPException(404, f"federation {fed!r} not found")


def worker_not_found(fed: str, wid: str) -> HTTPException:
    """404 for an unknown worker."""
    return HTTPException(404, f"worker {wid!r} not found in federation {fed!r}")


def no_snapshot(fed: str, wid: str) -> HTTPException:
    """404 for a worker that has not published yet."""
    return HTTPException(404, f"worker {wid!r} in federation {fed!r} has published no snapshot")
