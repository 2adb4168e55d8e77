"""A Redis Cluster of one shard, a primary and its replica, for the failover scenario.

One shard is enough to fail over (every slot moves with it) and light on two cores. The
failover is `CLUSTER FAILOVER TAKEOVER` on the replica after the primary was SIGKILLed:
what the primary acknowledged but had not yet sent to its replica is lost, which is
what the scenario measures (and what ``wait_replicas`` narrows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.redis_servers import CLUSTER_DEADLINE, RedisServer, free_port

__all__ = ["FailoverPair", "cluster_node", "until"]


def cluster_node(directory: Path, used: list[int], extra: Sequence[str] = ()) -> RedisServer:
    """A Cluster node (not started) on free loopback ports not in ``used`` (to which
    its two ports are added), with ``extra`` server options."""
    port = free_port(avoid=used)
    bus = free_port(avoid=[*used, port])
    used += [port, bus]
    return RedisServer(
        directory,
        port=port,
        extra=[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(directory / "nodes.conf"),
            "--cluster-port",
            str(bus),
            "--cluster-node-timeout",
            "2000",
            *extra,
        ],
    )


def until(what: str, check: Callable[[], object]) -> None:
    # Server set-up, as in tests/redis_servers.py: the cluster bus gossips, and Sentinel
    # polls, on their own schedules with no event to wait on, so their state is polled
    # with a deadline.
    deadline = time.monotonic() + CLUSTER_DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis failover pair: {what} within {CLUSTER_DEADLINE:.0f}s")
        time.sleep(0.05)


class FailoverPair:
    """``primary`` owns every slot; ``replica`` replicates it; `fail_over` swaps them."""

    kind = "cluster"

    def __init__(self, directory: Path) -> None:
        used: list[int] = []
        self.primary = cluster_node(directory / "a", used)
        self.replica = cluster_node(directory / "b", used)
        self.bus = used[3]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.primary.port},127.0.0.1:{self.replica.port}"

    def start(self) -> FailoverPair:
        self.primary.start()
        self.replica.start()
        self.primary.cli("cluster", "addslotsrange", "0", "16383")
        self.primary.cli("cluster", "meet", "127.0.0.1", str(self.replica.port), str(self.bus))
        primary_id = self.primary.cli("cluster", "myid").strip()
        until(
            "the replica did not learn the primary",
            lambda: primary_id in self.replica.cli("cluster", "nodes"),
        )
        until(
            "the replica did not attach",
            lambda: "OK" in self.replica.cli("cluster", "replicate", primary_id),
        )
        until(
            "the replica did not sync",
            lambda: "master_link_status:up" in self.replica.cli("info", "replication"),
        )
        until(
            "the cluster is not ok",
            lambda: "cluster_state:ok" in self.primary.cli("cluster", "info"),
        )
        # CLUSTER SLOTS lists a replica only once its replication offset has been
        # gossiped; a client that starts before then never learns of it and cannot
        # find the new primary after a failover.
        until(
            "the primary does not list its replica in CLUSTER SLOTS",
            lambda: str(self.replica.port) in self.primary.cli("cluster", "slots"),
        )
        return self

    def fail_over(self) -> None:
        """SIGKILL the primary; the replica takes over every slot."""
        self.primary.kill()
        until(
            "the replica did not take over",
            lambda: "OK" in self.replica.cli("cluster", "failover", "takeover"),
        )
        until(
            "the replica is not primary",
            lambda: "role:master" in self.replica.cli("info", "replication"),
        )
        until(
            "the cluster is not ok after the failover",
            lambda: "cluster_state:ok" in self.replica.cli("cluster", "info"),
        )

    def swap(self) -> FailoverPair:
        """After `fail_over`: restart the old primary, which rejoins from its nodes.conf
        as the new primary's replica and syncs; the roles are swapped here too."""
        self.primary.start()
        self.primary, self.replica = self.replica, self.primary
        until(
            "the old primary did not rejoin as a replica",
            lambda: "master_link_status:up" in self.replica.cli("info", "replication"),
        )
        until(
            "the primary does not list its replica in CLUSTER SLOTS",
            lambda: str(self.replica.port) in self.primary.cli("cluster", "slots"),
        )
        return self

    def stop(self) -> None:
        self.primary.stop()
        self.replica.stop()
