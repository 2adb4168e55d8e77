"""A primary, its replica and one Sentinel watching them, for the failover scenario.

The failover an operator of a Sentinel deployment meets: the primary is SIGKILLed and
Sentinel promotes its replica (`SENTINEL FAILOVER`, forced so as not to wait out
Sentinel's own timers; or Sentinel's own failover, which one Sentinel of quorum 1 may
start first). What the primary
acknowledged but had not yet sent to its replica is lost, as on a Cluster. The store
finds the new primary through Sentinel, as deployed. The old primary then rejoins as
the new one's replica.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults.cluster import until
from tests.redis_servers import RedisSentinel, RedisServer, free_port

__all__ = ["SentinelPair"]

SERVICE = "mymaster"


class SentinelPair:
    """``primary`` replicated by ``replica``, watched by a Sentinel; `fail_over` swaps
    the roles, `swap` brings the old primary back as the new one's replica."""

    kind = "sentinel"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisServer(directory / "a")
        self.replica = RedisServer(
            directory / "b",
            port=free_port(avoid=[self.primary.port]),
            extra=["--replicaof", "127.0.0.1", str(self.primary.port)],
        )
        self.sentinel: RedisSentinel | None = None

    @property
    def url(self) -> str:
        return self._watch().url

    def _watch(self) -> RedisSentinel:
        if self.sentinel is None:
            raise RuntimeError("SentinelPair.start() first")
        return self.sentinel

    def _lists_replica(self) -> bool:
        return str(self.replica.port) in self._watch().cli("sentinel", "replicas", SERVICE)

    def start(self) -> SentinelPair:
        self.primary.start()
        self.replica.start()
        until(
            "the replica did not sync",
            lambda: "master_link_status:up" in self.replica.cli("info", "replication"),
        )
        # made once both listen, so that its free port is neither of theirs. Down after
        # 1 s: a forced failover needs a fresh view of the replica, which Sentinel
        # refreshes every second once the primary is down (every 10 s before).
        self.sentinel = RedisSentinel(
            self.directory / "s", self.primary, SERVICE, down_after_ms=1000
        )
        self.sentinel.start()
        until("Sentinel does not list the replica", self._lists_replica)
        return self

    def _names_replica_primary(self) -> bool:
        return str(self.replica.port) in self._watch().cli(
            "sentinel", "get-master-addr-by-name", SERVICE
        )

    def _failing_over(self) -> bool:
        # Sentinel may start a failover of its own once the primary is down a second
        # (quorum 1): asked again after that one promoted the replica, it would look
        # for a replica of the new primary and find none
        if self._names_replica_primary():
            return True
        return "OK" in self._watch().cli("sentinel", "failover", SERVICE)

    def fail_over(self) -> None:
        """SIGKILL the primary; Sentinel promotes the replica."""
        self.primary.kill()
        until("Sentinel did not start a failover", self._failing_over)
        until("Sentinel does not name the replica as primary", self._names_replica_primary)
        until(
            "the replica is not primary",
            lambda: "role:master" in self.replica.cli("info", "replication"),
        )

    def swap(self) -> SentinelPair:
        """After `fail_over`: restart the old primary (empty: it persists nothing) as the
        new primary's replica, and let it sync. The roles are swapped here too."""
        self.primary.start()
        # what Sentinel would do itself, after 10-20 s of its own checks (an INFO period
        # and a grace period): the same end, without a wait that loaded machines stretch
        self.primary.cli("replicaof", "127.0.0.1", str(self.replica.port))
        self.primary, self.replica = self.replica, self.primary
        until(
            "the old primary did not rejoin as a replica",
            lambda: "master_link_status:up" in self.replica.cli("info", "replication"),
        )
        until("Sentinel does not list the new replica", self._lists_replica)
        return self

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.stop()
        self.primary.stop()
        self.replica.stop()
