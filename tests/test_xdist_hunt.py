"""Hunt: the test suite run by two pytest-xdist workers at once (``pytest -n 2``).

Each test here plays what two workers would do at the same time on one machine (two
processes, or one process standing in for the other worker) and checks that they do not
collide: fixed ports, shared files, shared Redis servers, the environment.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import child_env
from tests.redis_servers import RedisServer, require_redis_server

ROOT = Path(__file__).resolve().parent.parent


def test_a_server_that_lost_its_port_to_the_other_workers_server_is_not_adopted(
    tmp_path: Path,
) -> None:
    """tests/redis_servers.py, ``RedisServer.start``: "Ports are picked by binding to 0,
    then handed to redis-server: another process can grab one in between, so a failed
    start is retried on new ports". Under ``-n 2`` the other process that grabs the port
    is most likely the other worker's own ``redis-server`` (its ``free_port()`` was handed
    the same just-released port). Then our ``redis-server`` exits with "Address already
    in use", but ``start()`` pings the port while our process is still starting, the
    OTHER worker's server answers ``+PONG`` and ``start()`` returns "started": this
    worker's session fixture now uses the other worker's server (its ``kill()``/
    ``pause()``/``stop()`` act on a dead process, a test that kills "its" server sees it
    still answering, CONFIG SET/FLUSHALL/maxmemory land on the other worker's server).

    Expected: ``start()`` retries on a new port (or raises), never returns with its own
    process dead; i.e. ``running`` is true and the port is served by our process.
    Fix: in ``start()``, only accept ``_alive()`` once the process is known to have bound
    the port (e.g. ask the server ``INFO server``/``process_id`` and compare it with
    ``self.proc.pid``, or check ``poll()`` again after a short grace), else retry.
    """
    require_redis_server()
    other = RedisServer(tmp_path / "other-worker").start()  # the other worker's server
    try:
        ours = RedisServer(tmp_path / "this-worker", port=other.port)  # the same port
        ours.start()
        try:
            time.sleep(1.0)  # our redis-server has long since failed to bind
            pid = ours.cli("info", "server")
            own_pid = None if ours.proc is None else ours.proc.pid
            served_by = next(
                (ln.split(":", 1)[1].strip() for ln in pid.splitlines() if "process_id" in ln),
                None,
            )
            assert ours.running and served_by == str(own_pid), (
                f"start() returned on port {ours.port}, served by pid {served_by}, which "
                f"is the other worker's server (pid {other.proc.pid if other.proc else None}); "
                f"our own redis-server (pid {own_pid}) is "
                f"{'running' if ours.running else 'dead'}"
            )
        finally:
            ours.stop()
    finally:
        other.stop()


def test_a_cluster_node_whose_bus_port_the_other_worker_took_is_started_on_other_ports(
    tmp_path: Path,
) -> None:
    """tests/redis_servers.py ``RedisCluster``: its 3 ports and 3 cluster-bus ports are
    picked up front with ``free_port()`` (bound to 0, then released) and handed to the
    nodes one after another; ``RedisServer.start`` promises a port lost "to another
    process" is "retried on new ports" (START_ATTEMPTS). Under ``-n 2`` the other worker
    starts its own servers and opens client connections (whose local ports come from the
    same ephemeral range) at the same moments. If the BUS port of a node is taken in
    between, redis-server exits ("Could not bind ... cluster bus"), ``_port_taken()``
    checks only the client port, finds it free, gives up after one attempt and the
    session-scoped ``redis_cluster`` fixture raises RuntimeError: every cluster test of
    that worker errors. (Same in tests/faults/cluster.py ``_node``.)

    Expected: the node is started on new ports (client and bus) and the cluster forms.
    Fix: in ``RedisServer.start`` also pick a new ``--cluster-port`` when the bus port
    is taken (or let ``free_port`` reservations be held until the server binds)."""
    import socket

    from tests.redis_servers import RedisCluster

    require_redis_server()
    cluster = RedisCluster(tmp_path / "cluster")
    node = cluster.nodes[1]
    bus = int(node.extra[node.extra.index("--cluster-port") + 1])
    thief = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the other worker's socket
    try:
        thief.bind(("127.0.0.1", bus))
        thief.listen(1)
        try:
            cluster.start()
        except RuntimeError as e:
            raise AssertionError(
                f"the cluster did not start because one node's bus port {bus} was taken "
                f"by another process, and was not retried: {str(e)[:300]}"
            ) from None
        finally:
            cluster.stop()
    finally:
        thief.close()


def test_a_port_taken_as_unreachable_is_not_served_by_the_other_workers_server() -> None:
    """tests/test_redis.py (an unreachable server, an unreachable cluster, ``replicaof`` a
    gone primary), tests/test_security_hunt.py and tests/test_sentinel_adversarial.py took
    ``free_port()`` as "a port nothing answers on"; it binds port 0 and releases it, so
    the port is free only that instant, and under ``-n 2`` the other worker's servers
    pick theirs the same way: the "unreachable" store was then another worker's live
    server (the test failed, and wrote a lease there). They hold a `dead_port` now: bound
    for the test's duration and never listened on. Here the other worker tries to take
    it, and a client tries to reach it."""
    from tests.redis_servers import dead_port

    with dead_port() as port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as thief, pytest.raises(OSError):
            thief.bind(("127.0.0.1", port))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ------------------------------------------------- the job processes' forkserver and the env


async def _entry_env(ctx: Any) -> None:
    """A job that reports the RESUME_* settings it was started with, then waits."""
    from tests.lk import jobs

    seen = {k: v for k, v in os.environ.items() if k.startswith("RESUME_")}
    jobs.report("ENV", repr(sorted(seen.items())))
    await asyncio.Event().wait()


_WORKER = """
import asyncio, os, sys
from tests.lk.jobs import JobHarness

async def one(room):
    async with JobHarness() as harness:  # what every JobHarness test does: forkserver
        job = await harness.start_job("tests.test_xdist_hunt:_entry_env", room=room)
        line = await job.expect("ENV")
        job.kill()
        await job.wait_exit()
        return line

async def main():
    # test_resumable_job.py::test_a_reconnect_token_...: monkeypatch.setenv, then jobs
    os.environ["RESUME_SIGNING_KEYS"] = sys.argv[1]
    first = await one("reconnect-token-test")
    del os.environ["RESUME_SIGNING_KEYS"]  # the monkeypatch undone at its teardown
    # the next JobHarness test this worker runs (e.g. ...sigterm_to_the_process_group...)
    print("LATER", await one("a-later-test"), flush=True)

asyncio.run(main())
"""


def test_a_setting_a_test_monkeypatched_does_not_reach_the_jobs_of_later_tests() -> None:
    """tests/lk/jobs.py ``JobHarness`` starts job processes with multiprocessing's
    "forkserver" (as AgentServer does). Python starts ONE fork server per process, at its
    first use, with the environment of that moment, and every later job process is
    forked from it: a job sees the environment the worker had when its first job
    started, not the one it has now. tests/test_resumable_job.py:312
    (``test_a_reconnect_token_resumes_its_conversation_in_a_new_room_and_nothing_else``)
    does ``monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)`` and then starts jobs. In
    one process the suite's file order starts the fork server earlier, cleanly. Under
    ``-n 2`` a worker that was not handed an earlier JobHarness test starts its fork
    server inside that test: every job of every later test of that worker (in
    test_resumable_job.py, test_tombstones_adversarial.py, test_worker_races.py) then
    signs with ``j1``. Reproduced with the real tests:
    ``pytest 'tests/test_resumable_job.py::test_a_reconnect_token_...[sqlite]'
    'tests/test_resumable_job.py::test_a_sigterm_to_the_process_group_...[sqlite]'``
    fails the second with ``SignatureMismatch: frame is signed with key 'j1'`` (the
    reverse order passes both).

    Expected: a job started after the monkeypatch was undone does not see the setting.
    Fix: start the fork server in a clean, known environment once per worker (a
    session-scoped autouse fixture, or ``multiprocessing.forkserver.ensure_running()`` at
    conftest import), or pass settings to jobs only through the job metadata (never via
    os.environ around a JobHarness)."""
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, "j1:" + "ag" * 22],
        cwd=ROOT,
        env={k: v for k, v in child_env().items() if not k.startswith("RESUME_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    later = [ln for ln in done.stdout.splitlines() if ln.startswith("LATER")]
    assert later, done.stdout[-1500:] + done.stderr[-3000:]
    assert "RESUME_SIGNING_KEYS" not in later[0], (
        "a job of a later test still has the setting an earlier test monkeypatched "
        f"(and undid) when the worker's fork server started: {later[0]}"
    )
