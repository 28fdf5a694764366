"""`python -m tetherfed_coordinator [--host --port --redis-url --data-dir]`."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .ingest import PublishProtocol
from .settings import Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; unset ones fall back to TETHER_* settings."""
    parser = argparse.ArgumentParser(prog="tetherfed coordinator", description=__doc__)
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8420)")
    parser.add_argument("--redis-url", help="Redis URL; omit to start an embedded redis-server")
    parser.add_argument("--data-dir", type=Path, help="embedded Redis: keep an AOF here")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def tune_malloc() -> None:
    """glibc: serve big buffers from the reused heap instead of fresh mmap()s.

    Every 256 KB body chunk and every frame buffer would otherwise be a fresh mapping whose pages
    fault on first touch; on the machines measured that cost more than the copies themselves.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def main(argv: list[str] | None = None) -> int:
    """Run the coordinator until interrupted; returns the exit code."""
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "redis_url": args.redis_url,
            "data_dir": args.data_dir,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    tune_malloc()
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        # uvicorn annotates `http` as an asyncio.Protocol class but instantiates any protocol
        # class; this one is a BufferedProtocol on purpose (rawbody.SegmentProtocol).
        http=PublishProtocol,  # type: ignore[arg-type]
        loop="auto",
        log_level=args.log_level,
        timeout_graceful_shutdown=3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
