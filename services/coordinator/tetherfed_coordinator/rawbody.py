"""Large request bodies received straight into fixed-size segments, past the ASGI body pipeline.

uvicorn hands an ASGI app its request body as `http.request` messages: each socket read lands in
a fresh `bytes`, the HTTP parser copies the body out of it, the copy is appended to a bytearray
and copied again by `receive()`, and reading pauses and resumes every 64 KiB. For a tether frame
of tens of MB that pipeline, not Redis, bounded the publish (about 0.5 GB/s on the 2-core
machine, against 1 GB/s for a raw `SET` of the same bytes).

`SegmentProtocol` is uvicorn's httptools protocol with one fast path. When the headers of a request
that `streams_raw(method, path)` accepts are complete and it declares a Content-Length, the rest of
its body is read with `recv_into` (asyncio's buffered protocol) directly into segments of `SEGMENT`
bytes, bypassing the parser, and the app receives them whole through the scope extension
`BODY_EXTENSION` (its `segments`, a `BodySegments`). Each segment is a fresh buffer handed over once
full, so the app may keep it (a Redis write still in flight, say) without copying. Other routes,
chunked bodies and parser errors are uvicorn's; keep-alive, pipelining and `Expect: 100-continue`
behave as they do there (tests over raw sockets). A raw route's `receive()` sees an empty body, so
only routes that read the extension may be declared raw. A response sent before the body was read
(an auth or size error) discards the rest of it, as uvicorn does, unless more than `DISCARD_MAX` is
left or the client still waits for `100 Continue`: then the connection closes after the response
(httpx and curl read a response even when the server stops their upload). Any other request
declaring more than `DISCARD_MAX` that is answered before its body is in closes the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import numpy as np
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BODY_EXTENSION = "tetherfed.body_segments"
# Bytes per segment, also the unit a frame is stored in (see ingest): one page under 1 MiB. Redis
# allocates a value's length plus 12 bytes (header, CRLF, NUL), and jemalloc, the allocator of
# most Redis builds, puts 1 MiB + 12 in its 1.25 MiB size class: exactly 1 MiB segments took 25 %
# more memory, and 64 MB stored as them cost a Redis 7.0 server 15-19 ms of CPU against 6-10 ms
# as these (pipelined SETs, 2-core machine), most of it faulting in pages as extents split.
# glibc's malloc (the embedded server's) is indifferent.
SEGMENT = (1 << 20) - (4 << 10)
READ_SIZE = 256 << 10  # the scratch buffer ordinary requests are read into
HIGH_WATER = 16  # full segments waiting for the app before reading pauses (17 MiB at most)
LOW_WATER = 4  # ... and at or below which it resumes
DISCARD_MAX = 16 * SEGMENT  # an answered request's unread body beyond this closes the connection


class BodySegments:
    """One request body as consecutive segments: `SEGMENT` bytes each, the last one shorter.

    The protocol produces (`buffer`/`received` for reads into the current segment, `feed` for
    bytes the parser already holds); the app consumes with `async for segment in body`. When the
    app is done early (an error response), `close()` turns the rest of the body into discarded
    reads so the connection stays usable.
    """

    def __init__(self, length: int, flow: FlowControl, on_start: Callable[[], None]) -> None:
        self.remaining = length  # body bytes not received yet
        self._flow = flow
        self._on_start = on_start
        self._current: memoryview | None = None
        self._fill = 0
        self._ready: deque[memoryview] = deque()
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None
        self._discard: memoryview | None = None  # set once the app stops reading
        self._paused = False  # reading paused by us (uvicorn pauses too, for pipelining)

    # ------------------------------------------------------------------ producer (protocol)
    def buffer(self) -> memoryview:
        """Where the next read lands: the unfilled tail of the current segment (never past the
        body's end, so a pipelined request's bytes are never read into it)."""
        if self._discard is not None:
            return self._discard[: self.remaining]
        if self._current is None:  # uninitialised: every byte is read into before it is used
            self._current = np.empty(min(SEGMENT, self.remaining), np.uint8).data
            self._fill = 0
        return self._current[self._fill :]

    def received(self, nbytes: int) -> None:
        """`nbytes` were read into `buffer()`."""
        self.remaining -= nbytes
        if self._discard is not None or self._current is None:
            return
        self._fill += nbytes
        if self._fill == len(self._current):
            self._ready.append(self._current)
            self._current = None
            self._wakeup.set()
            if len(self._ready) >= HIGH_WATER and not self._paused:
                self._paused = True
                self._flow.pause_reading()

    def feed(self, data: bytes) -> None:
        """Body bytes that arrived with the headers (the parser delivered them)."""
        view = memoryview(data)
        while view:
            target = self.buffer()
            take = min(len(target), len(view))
            target[:take] = view[:take]
            self.received(take)
            view = view[take:]

    def fail(self, exc: BaseException) -> None:
        """The connection broke before the body was complete."""
        if self.remaining:
            self._error = exc
            self._wakeup.set()

    # ------------------------------------------------------------------ consumer (app)
    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._segments()

    async def _segments(self) -> AsyncIterator[memoryview]:
        self._on_start()
        while True:
            if self._ready:
                segment = self._ready.popleft()
                if len(self._ready) <= LOW_WATER:
                    self._resume()
                yield segment
            elif self._error is not None:
                raise self._error
            elif self._discard is not None:
                raise ClientDisconnect("the request was answered; its body was discarded")
            elif self.remaining == 0 and self._current is None:
                return
            else:
                self._wakeup.clear()
                await self._wakeup.wait()

    def close(self) -> None:
        """The app reads no more (or its response is out): drop what is queued and discard the
        rest of the body as it arrives, so the connection can serve the next request."""
        if self._discard is None:
            self._discard = memoryview(bytearray(READ_SIZE))
            self._ready.clear()
            self._current = None
            self._resume()
            self._wakeup.set()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._flow.resume_reading()


class SegmentProtocol(asyncio.BufferedProtocol):
    """uvicorn's httptools protocol; bodies of `streams_raw` requests arrive as `BodySegments`.

    A buffered protocol wrapping the HTTP one rather than a subclass of both: uvloop reads into
    the protocol's buffers only when it is not also an `asyncio.Protocol`.
    """

    @staticmethod
    def streams_raw(method: str, path: str) -> bool:
        """Whether a request's body arrives as segments: none here; subclasses name theirs."""
        return False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.http = _HttpProtocol(*args, streams_raw=type(self).streams_raw, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def eof_received(self) -> None:
        self.http.eof_received()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.http.bytes_read(nbytes)


class _HttpProtocol(HttpToolsProtocol):
    """The HTTP protocol behind `SegmentProtocol`: parses into a scratch buffer, and reads the
    body of a raw request into its segments, past the parser."""

    def __init__(self, *args: Any, streams_raw: Callable[[str, str], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams_raw = streams_raw
        self._scratch = memoryview(bytearray(READ_SIZE))
        self._body: BodySegments | None = None  # the current request's, until its body is in
        self._raw = False  # reads go to self._body, not to the parser

    def read_buffer(self) -> memoryview:
        """Where the transport reads next."""
        return self._body.buffer() if self._raw and self._body else self._scratch

    def bytes_read(self, nbytes: int) -> None:
        """The transport read `nbytes` into `read_buffer()`."""
        body = self._body
        if not self._raw or body is None:
            self.data_received(self._scratch[:nbytes])  # type: ignore[arg-type]  # parser copies
            body = self._body
            if body is not None and body.remaining and not self.transport.is_closing():
                self._raw = True  # headers parsed, body pending: read it ourselves
            return
        self._unset_keepalive_if_required()  # as uvicorn's data_received does on every read
        body.received(nbytes)
        if not body.remaining:
            self._end_raw()

    def _end_raw(self) -> None:
        """The body is in: a fresh parser for the next request, and the message is complete."""
        self._raw, self._body = False, None
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(
            AttributeError
        ):  # as uvicorn sets up its parser (httptools ≥ 0.6.3)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.on_message_complete()

    # parser callbacks
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if not self.streams_raw(self.scope["method"], self.scope["path"]):
            self._close_if_answered_early()
            return
        if length := self._content_length():
            cycle = self.cycle

            def send_continue() -> None:  # what uvicorn's receive() does on the first call
                if cycle.waiting_for_100_continue and not self.transport.is_closing():
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    cycle.waiting_for_100_continue = False

            body = self._body = BodySegments(length, self.flow, send_continue)
            # ASGI: an extension's value is a dict of extension-specific data.
            extension: dict[object, object] = {"segments": body}
            cycle.scope.setdefault("extensions", {})[BODY_EXTENSION] = extension
            responded = cycle.on_response

            def on_response() -> None:  # this request is answered: what is left of its body
                body.close()  # ... is discarded as it arrives, unless that is not worth it:
                if body.remaining and (
                    body.remaining > DISCARD_MAX or cycle.waiting_for_100_continue
                ):  # a large rest, or one the client will not send (it got no 100 Continue)
                    self.transport.close()  # the response is flushed first
                responded()

            cycle.on_response = on_response

    def _close_if_answered_early(self) -> None:
        """Any other request declaring more than `DISCARD_MAX` of body: answered before its body
        was in (an auth error, a 413), the connection closes after the response rather than
        receive the rest to discard it."""
        length = self._content_length()
        if length is None or length <= DISCARD_MAX:
            return
        cycle = self.cycle
        responded = cycle.on_response

        def on_response() -> None:
            if cycle.more_body:  # the parser has not seen the end of the body
                self.transport.close()  # the response is flushed first
            responded()

        cycle.on_response = on_response

    def _content_length(self) -> int | None:
        """The declared length of a plain (not chunked, not upgraded) body, if valid."""
        if self.parser.should_upgrade():
            return None
        found = None
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return None
            if name == b"content-length":
                if found is not None or not value.isdigit():
                    return None
                found = int(value)
        return found

    def on_body(self, body: bytes) -> None:
        if self._body is None:
            super().on_body(body)
        else:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        if not self._raw:  # the parser saw the whole body (it came with the headers)
            self._body = None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._body is not None:
            self._body.fail(ClientDisconnect())
        super().connection_lost(exc)
