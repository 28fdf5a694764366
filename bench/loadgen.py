"""A lean HTTP/1.1 load generator for the load benchmarks: keep-alive connections over raw
asyncio streams, on uvloop.

Why not httpx: a load benchmark measures the coordinator only while its generator is cheaper
than the coordinator. httpx's AsyncClient spent about 15 ms of CPU per sketch publish with 250
tasks sharing a pool of 64 connections (load-1000 on 2026-11-30: 4 generator processes used 1.6
of 2 cores to send 110 publishes/s), so the generators, not the coordinator, set the figure.
This client costs tens of microseconds a request: it writes one request and reads one
`Content-Length` response per connection at a time (no pipelining, as a worker's SDK does), and
it speaks only what the coordinator answers (no chunked responses, no redirects).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class HttpError(Exception):
    """A request that got no answer (connection refused, reset or closed mid-answer)."""


class Connection:
    """One keep-alive HTTP/1.1 connection; `request` is serialized by a lock (FIFO waiters)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/octet-stream",
    ) -> tuple[int, bytes]:
        """Send one request and read its answer: (status, body). Raises HttpError when the
        connection fails (it reconnects on the next request)."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with self._lock:
            try:
                if self._streams is None:
                    self._streams = await asyncio.open_connection(self.host, self.port)
                reader, writer = self._streams
                writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    writer.write(body)
                await writer.drain()
                status_line, _, headers = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
                length = 0
                for header in headers.split(b"\r\n"):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                payload = await reader.readexactly(length) if length else b""
                return int(status_line.split(b" ", 2)[1]), payload
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                await self.close()
                raise HttpError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Lanes:
    """`n` connections to one server; simulated worker i always uses connection i mod n."""

    def __init__(self, url: str, n: int) -> None:
        self.connections = [Connection(url) for _ in range(n)]

    def __getitem__(self, i: int) -> Connection:
        return self.connections[i % len(self.connections)]

    async def close(self) -> None:
        for c in self.connections:
            await c.close()
