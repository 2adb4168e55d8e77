"""Remote control of live sessions (issue 16): `lr.control(store)` and the CLI verbs send
pause, resume and suspend through the store to the worker that holds the lease.

In-process tests run one conformance set over every store (memory, SQLite, fakeredis, a
real redis-server, a real Redis Cluster). The cross-process tests run the owner in a
real LiveKit job process (``tests.lk.jobs``) with a whole voice pipeline and control it
from this process, through the command line and the API.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from livekit.agents import Agent, AgentSession, JobContext
from livekit.agents.llm import ChatMessage

import livekit_resume as lr
from livekit_resume.agent_hooks.session import OFFLOAD_ITEMS
from livekit_resume.cli.demo.watched import WatchedStore
from livekit_resume.remote import MAX_TIMEOUT
from livekit_resume.stores.base import Command, CommandReply, Controllable, Store
from livekit_resume.testing.poll import eventually
from tests import child_env, test_resumable_job
from tests.lk import jobs, make_voice_session, voice_fakes
from tests.lk.jobs import JobHarness, RunningJob
from tests.lk.scripted_llm import ScriptedLLM, make_text_session
from tests.test_voice import REGISTRY, Counter

# A fixture shared with the module that made it: the store a job process opens (a SQLite
# file or a namespace of redis-server).
target = test_resumable_job.target

KEY = "call-7"
# Bounds a command that should be refused at once: far above any answer, so a test
# that waits for it instead of refusing fails instead of passing slowly.
NEVER = MAX_TIMEOUT


async def live(
    store: Store, sessions: list[AgentSession[Any]], *, owner: str = "w1", takeover: bool = False
) -> lr.ResumableSession:
    """A started text session under KEY whose owner listens for commands."""
    session = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(session)
    rs = lr.ResumableSession(store, KEY, registry=REGISTRY, owner=owner, autosave=False)
    await session.start(await rs.restore(session, default=Counter, takeover=takeover))
    await asyncio.wait_for(rs._control.listening.wait(), 10)
    await session.run(user_input="remember the blue door")
    await rs.checkpoint()
    return rs


def state(rs: lr.ResumableSession) -> str:
    return rs.state  # read afresh: a remote command changes it between two reads


# ------------------------------------------------------------ over every store


async def test_pause_resume_suspend_round_trip(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    rs = await live(store, sessions)
    remote = lr.control(store)

    version = await remote.pause(KEY)
    assert state(rs) == "paused" and version == rs.version
    assert (await store.load(KEY)).info["state"] == "paused"
    assert await remote.pause(KEY) == version  # sent again after a lost answer: no change

    assert await remote.resume(KEY) == rs.version
    assert state(rs) == "active"

    suspended = await remote.suspend(KEY)
    assert state(rs) == "suspended" and suspended == rs.version
    info = await store.info(KEY)
    assert info is not None and info.owner is None  # the lease is given up
    assert (await store.load(KEY)).info["state"] == "suspended"


async def test_a_store_behind_a_forwarding_wrapper_still_carries_commands(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """`WatchedStore` (the demo's, and the fault scenarios' probe) forwards ``commands``
    from its ``__getattr__``. Since Python 3.12, isinstance() against a runtime-checkable
    protocol no longer sees such a method: the owner behind it never listened, and every
    command was refused as unheard."""
    watched = WatchedStore(store)
    rs = await live(watched, sessions)
    assert await lr.control(watched).pause(KEY) == rs.version
    assert state(rs) == "paused"


async def test_a_session_without_a_live_owner_is_refused_at_once(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    remote = lr.control(store)
    with pytest.raises(lr.CommandRefused, match="no such session"):
        await asyncio.wait_for(remote.pause("nobody", timeout=NEVER), 30)

    rs = await live(store, sessions)
    await rs.suspend()
    with pytest.raises(lr.CommandRefused, match=r"no live owner.*suspended") as e:
        await asyncio.wait_for(remote.resume(KEY, timeout=NEVER), 30)
    assert e.value.key == KEY and e.value.command == "resume"
    assert "resume of session 'call-7' refused" in str(e.value)


class _Probe(Agent):
    """Notes, when a restore builds it, whether the restoring session's inbox had
    started subscribing."""

    restoring: lr.ResumableSession | None = None
    seen: ClassVar[list[bool]] = []

    def __init__(self) -> None:
        rs = _Probe.restoring
        _Probe.seen.append(rs is not None and rs._control._task is not None)
        super().__init__(instructions="probe")


async def test_the_inbox_subscribes_while_the_history_is_decoded_and_rebuilt(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """A restore overlaps the inbox's subscription with the decode (on a thread past
    OFFLOAD_ITEMS items) and rebuild of the history; it returns with the inbox active,
    and a restore refused after its lease leaves nobody listening."""
    registry = lr.AgentRegistry()
    registry.register(_Probe)
    first = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(first)
    rs = lr.ResumableSession(store, KEY, registry=registry, autosave=False)
    await first.start(await rs.restore(first, default=_Probe))
    for n in range(OFFLOAD_ITEMS + 1):
        first.history.items.append(ChatMessage(role="user", content=[f"note {n}"]))
    await rs.checkpoint()
    await rs.suspend()

    again = make_text_session(ScriptedLLM(default="noted"))
    sessions.append(again)
    _Probe.restoring = rs2 = lr.ResumableSession(store, KEY, registry=registry, autosave=False)
    _Probe.seen.clear()
    await rs2.restore(again, default=_Probe)
    assert _Probe.seen == [isinstance(store, Controllable)]
    assert rs2._control.listening.is_set() == isinstance(store, Controllable)
    await rs2.aclose()

    broken = lr.AgentRegistry()  # the saved agent is unknown here: refused after the lease
    rs3 = lr.ResumableSession(store, KEY, registry=broken, autosave=False)
    with pytest.raises(lr.UnknownAgent):
        await rs3.restore(make_text_session(ScriptedLLM(default="noted")), default=_Probe)
    assert rs3._control._task is None and not rs3._control.listening.is_set()
    info = await store.info(KEY)
    assert info is not None and info.owner is None  # the lease released


async def test_a_command_aimed_at_an_older_epoch_is_refused(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    old = await live(store, sessions, owner="w1")
    aimed = old._holder.epoch
    new = await live(store, sessions, owner="w2", takeover=True)
    assert new._holder.epoch > aimed
    remote = lr.control(store)

    with pytest.raises(lr.CommandRefused, match=rf"aimed at epoch {aimed}, .* \(taken over\)"):
        await asyncio.wait_for(remote.pause(KEY, epoch=aimed, timeout=NEVER), 30)
    assert old.state == new.state == "active"

    # the current epoch reaches the worker that took over, never the one it fenced
    await remote.pause(KEY)
    assert state(new) == "paused" and state(old) == "active"


async def test_the_owner_refuses_a_command_for_an_epoch_it_left(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """The sender checks the epoch before sending; the owner checks again on arrival,
    for a takeover that lands in between."""
    rs = await live(store, sessions)
    assert isinstance(store, Controllable)
    channel = store.commands()
    stale = Command(uuid.uuid4().hex, KEY, "pause", rs._holder.epoch - 1)
    await channel.send(stale)

    async def answered() -> bool:
        return (await channel.reply(stale)).status == "refused"

    await eventually(answered, "the owner refused the stale command")
    assert "(taken over)" in (await channel.reply(stale)).reason
    assert rs.state == "active"


async def test_an_owner_that_does_not_answer_is_refused_and_the_command_withdrawn(
    store: Store,
) -> None:
    """A live lease whose holder does not listen (a worker without the hooks, or a
    process gone): refused at once where the transport counts listeners (memory, Redis),
    after the timeout where it cannot (SQLite); never applied later either way."""
    await store.acquire(KEY, "silent-worker")
    remote = lr.control(store)
    with pytest.raises(lr.CommandRefused, match="silent-worker") as e:
        await asyncio.wait_for(remote.pause(KEY, timeout=0.3), 30)
    assert "not listening" in e.value.reason or "did not answer within 0.3 s" in e.value.reason


async def test_a_command_is_claimed_once_or_withdrawn_never_both(store: Store) -> None:
    assert isinstance(store, Controllable)
    channel = store.commands()
    taken = Command(uuid.uuid4().hex, KEY, "pause", 1)
    await channel.send(taken)
    assert (await channel.reply(taken)).status == "pending"
    assert await channel.claim(taken)
    assert not await channel.claim(taken) and not await channel.withdraw(taken)
    await channel.answer(taken, CommandReply("done", 7))
    assert await channel.reply(taken) == CommandReply("done", 7)

    given_up = Command(uuid.uuid4().hex, KEY, "resume", 1)
    await channel.send(given_up)
    assert await channel.withdraw(given_up)
    assert not await channel.claim(given_up)
    assert (await channel.reply(given_up)).status == "withdrawn"


async def test_an_inbox_hears_only_its_key_from_the_moment_it_is_active(store: Store) -> None:
    assert isinstance(store, Controllable)
    channel = store.commands()
    before = Command(uuid.uuid4().hex, KEY, "pause", 1)
    await channel.send(before)
    async with channel.inbox(KEY) as inbox:
        assert await channel.send(Command(uuid.uuid4().hex, "other", "pause", 1)) in (0, None)
        mine = Command(uuid.uuid4().hex, KEY, "suspend", 3)
        assert await channel.send(mine) in (1, None)
        assert await asyncio.wait_for(anext(inbox), 10) == mine


async def test_bad_arguments_are_value_errors(store: Store) -> None:
    remote = lr.control(store)
    for timeout in (0, MAX_TIMEOUT + 1, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            await remote.pause(KEY, timeout=timeout)
    with pytest.raises(ValueError, match="session key"):
        await remote.pause("")


# --------------------------------------------------- across two OS processes (voice)
# The owner runs in a real LiveKit job process: a voice session (fake VAD, STT, TTS and
# audio in/out from tests.lk) under resumable hooks, its room LiveKit's stand-in for
# fake jobs, whose attribute updates the job reports as ``ATTRS <json>`` lines.

ENTRY = "tests.test_control:_entry_voice"


async def _entry_voice(ctx: JobContext) -> None:
    opts: dict[str, Any] = json.loads(ctx.job.metadata)
    store = lr.open_store(opts["store"], **opts.get("store_options", {}))
    model = ScriptedLLM(default="Noted, go on.")
    session = make_voice_session(model)
    fakes = voice_fakes(session)
    ctx.room.local_participant.set_attributes.side_effect = (  # type: ignore[attr-defined]
        lambda attributes: jobs.report("ATTRS", json.dumps(attributes))
    )
    rs = lr.ResumableSession(store, ctx.room.name, registry=REGISTRY, debounce=0.01)
    await session.start(await rs.restore(session, default=Counter))
    await asyncio.wait_for(rs._control.listening.wait(), 10)

    async def say(args: list[str]) -> None:
        utterance = fakes.audio_in.say(" ".join(args))
        await utterance.done
        jobs.report("SAID", int(utterance.dropped))

    def probe(_: list[str]) -> None:
        counts = {
            "frames": len(fakes.audio_out.frames),
            "tts": len(fakes.tts.requests),
            "llm": len(model.requests),
            "items": len(session.history.items),
            "state": rs.state,
        }
        jobs.report("PROBE", json.dumps(counts))

    jobs.on_command("say", say)
    jobs.on_command("probe", probe)
    ctx.add_shutdown_callback(rs.aclose)
    jobs.report("READY", rs._holder.epoch)


def open_target(target: dict[str, Any]) -> Store:
    return lr.open_store(target["store"], **target.get("store_options", {}))


async def probe(job: RunningJob) -> dict[str, Any]:
    await job.send("probe")
    result: dict[str, Any] = await job.expect_json("PROBE")
    return result


async def attribute_state(job: RunningJob, want: str, version: int | None = None) -> dict[str, str]:
    """The job's next room-attribute update that sets ``resume.state`` to ``want`` (at
    ``version``: an autosave landing as the pause begins shows "paused" at the version
    before the pause's own save, which is shown next)."""
    while True:
        attributes: dict[str, str] = await job.expect_json("ATTRS")
        if attributes.get("resume.state") == want and (
            version is None or attributes.get("resume.version") == str(version)
        ):
            return attributes


async def cli(target: dict[str, Any], *args: str) -> tuple[int, str, str]:
    """``python -m livekit_resume`` in a process of its own: exit code, stdout, stderr."""
    options = ["--store", target["store"], "--json"]
    if "store_options" in target:
        options += ["--namespace", target["store_options"]["namespace"]]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livekit_resume", *options, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_pause_from_another_process_silences_the_owner_and_resume_brings_it_back(
    target: dict[str, Any],
) -> None:
    store = open_target(target)
    try:
        async with JobHarness() as harness:
            job = await harness.start_job(ENTRY, room="call-x", metadata=json.dumps(target))
            await job.expect("READY")
            await job.send("say remember the blue door")
            assert (await job.expect("SAID")).split()[1] == "0"

            async def replied() -> bool:
                p = await probe(job)
                return bool(p["llm"] == 1 and p["frames"] > 0 and p["tts"] == 1)

            await eventually(replied, "the owner answered aloud", 20)

            # pause from this process, through the command line
            code, out, err = await cli(target, "pause", "call-x")
            assert code == 0, err
            paused = json.loads(out)
            assert paused["command"] == "pause" and paused["key"] == "call-x"
            await attribute_state(job, "paused", paused["version"])
            info = await store.info("call-x")
            assert info is not None and info.info["state"] == "paused"

            # while paused: the caller speaks, nothing is heard, asked or said
            before = await probe(job)
            await job.send("say are you still there")
            assert (await job.expect("SAID")).split()[1] == "1"  # dropped, never heard
            await asyncio.sleep(0.5)  # time a (wrongly) live pipeline would take to answer
            assert await probe(job) == before

            # resume from this process, through the API: the conversation goes on
            version = await lr.control(store).resume("call-x")
            assert version >= paused["version"]
            await attribute_state(job, "active")
            await job.send("say I am back")
            assert (await job.expect("SAID")).split()[1] == "0"

            async def answered_again() -> bool:
                p = await probe(job)
                return bool(p["llm"] == 2 and p["frames"] > before["frames"])

            await eventually(answered_again, "the owner answered after resuming", 20)
            await job.shutdown()
    finally:
        await store.aclose()


async def test_a_command_aimed_before_a_takeover_is_refused_and_a_stopped_owner_times_out(
    target: dict[str, Any],
) -> None:
    store = open_target(target)
    try:
        async with JobHarness() as harness:
            job = await harness.start_job(ENTRY, room="call-y", metadata=json.dumps(target))
            epoch = int((await job.expect("READY")).split()[1])

            # a frozen owner (SIGSTOP) holds a live lease but answers nothing
            job.stop()
            try:
                with pytest.raises(lr.CommandRefused, match="did not answer within 1 s"):
                    await lr.control(store).pause("call-y", timeout=1.0)
            finally:
                job.cont()
            # the withdrawn command is never applied, even once the owner runs again
            await asyncio.sleep(0.5)  # longer than the owner's poll: it reads it, and skips it
            assert (await probe(job))["state"] == "active"

            # another worker takes the session over: the old epoch is refused by name
            taken = await store.acquire("call-y", "supervisor", takeover=True)
            assert taken.epoch > epoch
            code, _, err = await cli(target, "suspend", "call-y", "--epoch", str(epoch))
            assert code == 1
            refusal = json.loads(err.splitlines()[-1])  # after the store's own warnings
            assert refusal["error"] == "CommandRefused"
            assert (
                f"aimed at epoch {epoch}, the session is at epoch {taken.epoch}"
                in (refusal["message"])
            )
            assert (await probe(job))["state"] == "active"  # nothing reached the old owner

            # the job dies with its lease still live: refused (at once on Redis, which
            # counts listeners; after the timeout on SQLite, which cannot)
            await store.acquire("call-y", "supervisor")  # renewed: the lease stays live
            job.kill()
            await job.wait_exit()
            with pytest.raises(lr.CommandRefused, match="'supervisor'"):
                await lr.control(store).pause("call-y", timeout=1.0)
    finally:
        await store.aclose()


# ------------------------------------------------------------------ Redis specifics


@pytest.mark.parametrize("kind", ["redis", "redis_cluster"])
async def test_many_listening_sessions_share_one_connection_per_node(
    kind: str, request: pytest.FixtureRequest, sessions: list[AgentSession[Any]]
) -> None:
    """An owner per session, each listening: with a pool of 4 connections (per node),
    a connection each would leave none for commits and commands (10 keys put at least
    4 on one of the Cluster's 3 nodes)."""
    from tests.redis_servers import build_redis_store

    store = await build_redis_store(kind, request, namespace=f"p{uuid.uuid4().hex[:8]}",
                                    pool_size=4)  # fmt: skip
    try:
        owners: dict[str, lr.ResumableSession] = {}
        for n in range(10):
            session = make_text_session(ScriptedLLM(default="noted"))
            sessions.append(session)
            rs = lr.ResumableSession(store, f"room-{n}", registry=REGISTRY, autosave=False)
            await session.start(await rs.restore(session, default=Counter))
            await asyncio.wait_for(rs._control.listening.wait(), 10)
            owners[f"room-{n}"] = rs
        remote = lr.control(store)
        for key, rs in owners.items():
            await asyncio.wait_for(remote.pause(key), 30)
            assert state(rs) == "paused"
        for rs in owners.values():
            await rs.aclose()
    finally:
        await store.aclose()


async def test_sentinel_carries_commands_to_the_owner(
    redis_sentinel: Any, sessions: list[AgentSession[Any]]
) -> None:
    store = lr.open_store(redis_sentinel.url, namespace=f"s{uuid.uuid4().hex[:8]}")
    try:
        rs = await live(store, sessions)
        assert await lr.control(store).pause(KEY) == rs.version
        assert state(rs) == "paused"
        await rs.aclose()
    finally:
        await store.aclose()


async def test_an_owner_whose_subscription_drops_listens_again(
    disposable_redis: Any, sessions: list[AgentSession[Any]]
) -> None:
    store = lr.open_store(disposable_redis.url, namespace="relisten")
    try:
        rs = await live(store, sessions)
        disposable_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        remote = lr.control(store)

        async def paused() -> bool:
            try:
                await remote.pause(KEY, timeout=1.0)
            except lr.CommandRefused:
                return False  # pub/sub is at most once: sent again, as a caller would
            return True

        await eventually(paused, "the owner listened again and paused", 20)
        assert state(rs) == "paused"
        await rs.aclose()
    finally:
        await store.aclose()


def _connections(server: Any) -> int:
    """Connections the server has accepted so far."""
    stats = server.cli("INFO", "stats")
    line = next(ln for ln in stats.splitlines() if ln.startswith("total_connections_received:"))
    return int(line.split(":")[1])


def _subscribers(server: Any) -> int:
    """Connections that subscribe, or did last (one kept listening to nothing is no
    longer of type pubsub)."""
    lines = server.cli("CLIENT", "LIST").splitlines()
    return len([ln for ln in lines if re.search(r" cmd=(un)?subscribe ", ln)])


async def test_a_worker_restoring_sessions_one_after_another_makes_no_new_connection(
    disposable_redis: Any, sessions: list[AgentSession[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscriber connection of the last inbox to leave is kept a while (`LINGER`).
    Closed at once, it disconnected a connection of the store's pool, and the next
    restore's first round trip connected anew: a connection and a handshake on every
    restore of a worker whose sessions end and start one after another (a caller back in
    a new room). Kept, the next session's inbox subscribes on it; once idle for
    `LINGER`, it is closed."""
    from livekit_resume.stores.redis import control

    monkeypatch.setattr(control, "LINGER", 1.0, raising=False)
    store = lr.open_store(disposable_redis.url, namespace="linger")
    remote = lr.control(store)
    try:
        for n in range(4):
            if n == 1:  # the pool has the connections a turn of this test needs
                connections = _connections(disposable_redis)
            await (await live(store, sessions)).suspend()
        # 1: the count's own redis-cli (3 more on main: a connection per restore)
        assert _connections(disposable_redis) - connections == 1
        assert _subscribers(disposable_redis) == 1  # kept, listening to nothing
        rs = await live(store, sessions)
        assert await remote.pause(KEY) == rs.version  # heard on the kept connection
        await rs.suspend()

        async def closed() -> bool:
            return _subscribers(disposable_redis) == 0

        await eventually(closed, "the idle subscriber connection closed after LINGER", 10)
        rs = await live(store, sessions)  # a new one made when needed again
        assert await remote.pause(KEY) == rs.version
        await rs.aclose()
    finally:
        await store.aclose()
    assert _subscribers(disposable_redis) == 0


async def test_a_store_closed_while_its_subscriber_connection_is_kept_closes_it(
    disposable_redis: Any, sessions: list[AgentSession[Any]]
) -> None:
    store = lr.open_store(disposable_redis.url, namespace="linger-close")
    try:
        await (await live(store, sessions)).suspend()
        assert _subscribers(disposable_redis) == 1
    finally:
        await store.aclose()

    async def closed() -> bool:
        return _subscribers(disposable_redis) == 0

    await eventually(closed, "the store's aclose closed the kept subscriber connection", 5)


async def test_a_kept_subscriber_connection_killed_while_idle_is_made_anew(
    disposable_redis: Any, sessions: list[AgentSession[Any]]
) -> None:
    """A failover's Sentinel kills the pub/sub clients of the old primary: an idle kept
    connection is dropped, and the next session subscribes on a new one."""
    store = lr.open_store(disposable_redis.url, namespace="linger-kill")
    try:
        await (await live(store, sessions)).suspend()
        disposable_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        rs = await live(store, sessions)
        assert await lr.control(store).pause(KEY, timeout=5.0) == rs.version
        assert state(rs) == "paused"
        await rs.aclose()
    finally:
        await store.aclose()


# ------------------------------------------------------------------ command line


def _create_store(url: str) -> None:
    async def go() -> None:
        store = lr.open_store(url)
        try:
            await store.keys()
        finally:
            await store.aclose()

    asyncio.run(go())


def test_the_cli_refuses_on_one_line_and_keeps_its_exit_codes(tmp_path: Path) -> None:
    from tests.test_cli import run

    url = f"sqlite:///{tmp_path}/cli.db"
    _create_store(url)  # a store without the session (a missing file is StoreUnavailable)
    refused = run(url, "pause", "nobody")
    assert refused.exit_code == 1
    assert refused.stderr.strip().startswith("error (CommandRefused): pause of session")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert run(url, "resume", "nobody", "--timeout", "500").exit_code == 2  # usage
    assert run(url, "suspend", "").exit_code == 2  # an invalid key is a usage error


async def test_unknown_verbs_are_refused_under_one_metric_label(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Whoever can publish on the channel names the verb: counted each under its own
    label, a stream of made-up verbs grew the worker's metrics without bound."""
    from prometheus_client import REGISTRY

    from livekit_resume.agent_hooks.control import COMMANDS

    rs = await live(store, sessions)
    assert isinstance(store, Controllable)
    channel = store.commands()
    made_up = [Command(uuid.uuid4().hex, KEY, f"verb-{i}", rs._holder.epoch) for i in range(3)]
    for command in made_up:
        await channel.send(command)

    async def all_refused() -> bool:
        replies = [await channel.reply(c) for c in made_up]
        return all(r.status == "refused" for r in replies)

    await eventually(all_refused, "the owner refused every made-up verb")
    labels = {m.labels["command"] for metric in COMMANDS.collect() for m in metric.samples}
    assert not {c.verb for c in made_up} & labels
    assert REGISTRY.get_sample_value(
        "livekit_resume_remote_commands_total", {"command": "unknown", "outcome": "refused"}
    )
    assert rs.state == "active"


async def test_a_flood_of_commands_waits_in_a_bounded_line_and_the_owner_still_answers(
    store: Store, sessions: list[AgentSession[Any]]
) -> None:
    """Commands are applied one at a time; whoever can publish on the channel could pile
    up one waiting task per message without end. Past `MAX_WAITING` a command is left
    unclaimed (its sender withdraws it at its timeout), and the owner answers the rest."""
    from prometheus_client import REGISTRY

    from livekit_resume.agent_hooks.control import MAX_WAITING

    rs = await live(store, sessions)
    assert isinstance(store, Controllable)
    channel = store.commands()
    labels = {"command": "any", "outcome": "dropped"}
    dropped = REGISTRY.get_sample_value("livekit_resume_remote_commands_total", labels) or 0
    flood = [Command(uuid.uuid4().hex, KEY, "resume", rs._holder.epoch) for _ in range(50)]
    async with rs._control._applying:  # the owner busy applying a command meanwhile
        for command in flood:
            await channel.send(command)

        async def all_heard() -> bool:
            now = REGISTRY.get_sample_value("livekit_resume_remote_commands_total", labels)
            return (now or 0) - dropped == len(flood) - MAX_WAITING

        await eventually(all_heard, "the owner heard every command of the flood")
        assert len(rs._control._handling) == MAX_WAITING

    async def line_empty() -> bool:
        # a pause heard while the line is still full is dropped by design
        return not rs._control._handling

    await eventually(line_empty, "the owner answered the commands in its line")
    version = await asyncio.wait_for(lr.control(store).pause(KEY), NEVER)
    assert state(rs) == "paused" and version == rs.version
