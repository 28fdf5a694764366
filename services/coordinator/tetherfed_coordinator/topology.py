"""The Redis deployments the coordinator runs on, each named by one URL.

- one server: `redis://[user:password@]host:port/db` (also `rediss://`, `unix://`);
- Sentinel: `redis+sentinel://[user:password@]host1:26379,host2:26379/service[/db]`, optional
  `?sentinel_password=…`; clients ask the sentinels for the current primary (redis-py's
  `Sentinel.master_for`), so after a failover they reconnect to the new one;
- Cluster: `redis+cluster://[user:password@]host1:7000,host2:7001` (any subset of the nodes;
  redis-py's `RedisCluster` discovers the rest and follows slot moves).

Every client retries a command that failed on a broken connection, a timeout or a demoted
primary (exponential backoff with full jitter, `RETRIES` tries over about ten seconds: a
Sentinel failover's duration), then raises. The commands it retries are idempotent or guarded
(see `publish.lua`, `commit.lua`, `Store.ack`), so a retried call that had in fact run changes
nothing twice.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SERVER_SCHEMES = ("redis", "rediss", "unix")
RETRIES = 30  # with a 1 s cap, about 15 s of tries: longer than a Sentinel failover
BACKOFF = ExponentialWithJitterBackoff(cap=1.0, base=0.05)
CONNECT_TIMEOUT_S = 5.0
# A reply slower than this (beyond a blocking command's own wait) means the server is gone or
# wedged: the connection is dropped and the command retried, never waited on forever.
READ_TIMEOUT_S = 30.0
# The errors worth a retry: the connection broke (a primary demoted by a failover surfaces as
# one: redis-py's Sentinel connection turns READONLY into ConnectionError) or timed out.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)

Kind = Literal["server", "sentinel", "cluster"]


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: the deployment kind and what a client needs to reach it."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def _nodes(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rpartition("@")[2]
    out = []
    for item in filter(None, hosts.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(default_port)
        if not host or not port.isdigit():
            raise ValueError(f"bad host:port {item!r} in Redis URL")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("the Redis URL names no host")
    return tuple(out)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a Redis URL (module docstring); ValueError naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in SERVER_SCHEMES:
        return RedisTarget("server", url)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        known = ", ".join(f"{s}://" for s in (*SERVER_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME))
        raise ValueError(f"unknown Redis URL scheme {parts.scheme!r}: use one of {known}")
    username, password = _credentials(parts.netloc)
    if scheme == CLUSTER_SCHEME:
        nodes = _nodes(parts.netloc, 6379)
        return RedisTarget("cluster", url, nodes, username=username, password=password)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"a Sentinel URL names its service and optional db: {SENTINEL_SCHEME}://"
            f"host1:26379,host2:26379/mymaster/0, not path {parts.path!r}"
        )
    query = parse_qs(parts.query)
    return RedisTarget(
        "sentinel",
        url,
        _nodes(parts.netloc, 26379),
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


class PrimaryConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the sentinels for the primary on every connect.

    redis-py's asyncio connection reconnects a dropped connection (e.g. after a demoted
    primary's READONLY) through `connect_check_health`, which skips
    `SentinelManagedConnection.connect` and so dials the demoted primary again; every retry
    then fails the same way (redis-py 8.1, `Connection.send_packed_command`)."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


def async_client(
    url: str,
    *,
    decode_responses: bool = False,
    max_connections: int | None = None,
    block_s: float = 0.0,
) -> Any:
    """An asyncio client for the deployment `url` names (`redis.asyncio.Redis`, or
    `RedisCluster`), retrying transient errors (module docstring). `block_s`: the longest
    blocking command it will send (XREAD BLOCK), added to the read timeout."""
    retry = AsyncRetry(BACKOFF, RETRIES, supported_errors=TRANSIENT)
    pool: dict[str, Any] = {} if max_connections is None else {"max_connections": max_connections}
    if parse_redis_url(url).kind == "sentinel":
        pool["connection_class"] = PrimaryConnection
    classes = (aioredis.Redis, AsyncRedisCluster, AsyncClusterNode, AsyncSentinel)
    return _client(
        url,
        classes,
        decode_responses=decode_responses,
        retry=retry,
        socket_timeout=READ_TIMEOUT_S + block_s,
        **pool,
    )


def sync_client(url: str, *, decode_responses: bool = False) -> Any:
    """A synchronous client for `url` (tools and tests), retrying like `async_client`."""
    retry = Retry(BACKOFF, RETRIES, supported_errors=TRANSIENT)
    classes = (redis.Redis, RedisCluster, ClusterNode, Sentinel)
    return _client(url, classes, decode_responses=decode_responses, retry=retry)


def _client(url: str, classes: tuple[Any, Any, Any, Any], **kwargs: Any) -> Any:
    """A client of the given (Redis, RedisCluster, ClusterNode, Sentinel) classes for `url`."""
    server, cluster, node, sentinel_class = classes
    target = parse_redis_url(url)
    if target.kind == "server":
        return server.from_url(url, **kwargs)
    kwargs |= {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "username": target.username,
        "password": target.password,
    }
    if target.kind == "cluster":
        nodes = [node(host, port) for host, port in target.nodes]
        return cluster(startup_nodes=nodes, **kwargs)
    sentinel = sentinel_class(
        list(target.nodes),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        sentinel_kwargs={
            "password": target.sentinel_password,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        },
    )
    assert target.service is not None
    return sentinel.master_for(target.service, db=target.db, **kwargs)


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (sync or asyncio)."""
    return isinstance(client, RedisCluster | AsyncRedisCluster)


async def borrow_connection(client: Any, key: str) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """(a connection of `client`'s pool to the server holding `key` (its node in a Cluster), an
    async callable giving it back), for commands sent on one connection."""
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None  # the slot's primary (an uncovered slot raises instead)
        conn = node.acquire_connection()

        async def release_to_node() -> None:
            node.release(conn)

        return conn, release_to_node
    pool = client.connection_pool
    conn = await pool.get_connection()
    return conn, functools.partial(pool.release, conn)


async def aclose(client: Any) -> None:
    """Close an `async_client`: its pool, and for Sentinel the connections to the sentinels."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def close(client: Any) -> None:
    """Close a `sync_client`: its pool, and for Sentinel the connections to the sentinels."""
    client.close()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if manager is not None:
        manager.close()
