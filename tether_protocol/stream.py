"""The decision stream's keep-alive contract (`GET /v1/federations/{fed}/decisions/stream`).

The coordinator sends a `: keep-alive` comment after `keepalive_s` seconds without a decision
(its `sse_keepalive_s` setting) and states that period in the `X-Tether-Keepalive` response
header. A client treats the connection as dead after `idle_bound(keepalive_s)` seconds without a
byte: a few missed keep-alives plus a margin for a loaded server, never a fixed figure, so a
coordinator configured with a long keep-alive does not make every client reconnect for nothing,
and one with a short keep-alive lets a client notice a dead connection soon. The Server-Sent
Events format itself is the WHATWG HTML standard's ("Server-sent events",
https://html.spec.whatwg.org/multipage/server-sent-events.html).
"""

from __future__ import annotations

import math

KEEPALIVE_HEADER = "X-Tether-Keepalive"  # seconds between keep-alives of an idle stream
MISSED_KEEPALIVES = 3  # a connection is dead after this many keep-alive periods of silence...
IDLE_MARGIN_S = 2.0  # ... plus this (a loaded server, a slow network)


def idle_bound(keepalive_s: float) -> float:
    """Seconds a client waits for the next byte of a stream whose server keeps it alive every
    `keepalive_s` seconds: `MISSED_KEEPALIVES` periods plus `IDLE_MARGIN_S`."""
    return MISSED_KEEPALIVES * keepalive_s + IDLE_MARGIN_S


def parse_keepalive(value: str | None) -> float | None:
    """The keep-alive period a `X-Tether-Keepalive` header states, in seconds; None when it is
    absent or not a positive finite number (an older coordinator, a proxy that rewrote it)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None
