"""Replies of the coordinator's Redis clients, typed as what they are.

redis-py annotates a reply as `bytes | str` whatever the client: its types cannot see the
`decode_responses` a client was made with. `Store.r` and `Store.blocking` are made with
`decode_responses=True` (`store.redis_clients`), so every string in their replies is a `str`;
`Store.rb` decodes nothing, so its strings are `bytes`. These functions say so once, for each
reply shape the coordinator reads, instead of a cast at every call. They check nothing at run
time: `opt_data` is for replies of `Store.rb`, every other one for replies of `Store.r` or
`Store.blocking`.

`Fields` is what `HSET mapping=` takes (redis-py's key type is invariant, so a `dict[str, str]`
does not match it as is).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from redis.typing import EncodableT, FieldT

Fields = dict[FieldT, EncodableT]
# A stream's entries as XRANGE returns them: (id, fields), oldest first.
Entries = list[tuple[str, dict[str, str]]]


def text(reply: bytes | str) -> str:
    """A string reply."""
    return cast(str, reply)


def opt_text(reply: bytes | str | None) -> str | None:
    """A string reply that may be nil (HGET of a missing field, GET of a missing key)."""
    return cast(str | None, reply)


def opt_data(reply: bytes | str | None) -> bytes | None:
    """A string reply of `Store.rb` (GET of a key that may be missing), as bytes."""
    return cast(bytes | None, reply)


def texts(reply: Iterable[object]) -> list[str]:
    """A set or list of strings (SMEMBERS, HKEYS, ZRANGEBYSCORE without scores), as a list."""
    return cast(list[str], list(reply))


def record(reply: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash (HGETALL): field → value, empty when the key does not exist."""
    return cast(dict[str, str], reply)


def entries(reply: Any) -> Entries:
    """XRANGE's entries."""
    return cast(Entries, reply)


def read_entries(reply: Any) -> Entries:
    """The entries of the one stream an XREAD or XREADGROUP asked about (none when it timed
    out): its reply is `[[stream, entries]]`, or empty."""
    return cast(Entries, reply[0][1]) if reply else []
