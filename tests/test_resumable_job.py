"""`resumable_job` on LiveKit's real job machinery (issue 19): each entrypoint runs in a
LiveKit job process started by ``tests.lk.jobs`` (no LiveKit server; the room is LiveKit's
own stand-in for fake jobs), against a real SQLite file or redis-server. The tests shut
jobs down as a worker does, SIGKILL, SIGSTOP and SIGCONT them, and re-dispatch the key
to a new job, as the LiveKit server does after a crash.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
from livekit.agents import Agent, AgentSession, JobContext
from livekit.agents.voice import room_io

import livekit_resume as lr
from livekit_resume.testing.poll import eventually
from tests.lk import jobs
from tests.lk.jobs import JobHarness, RunningJob
from tests.lk.scripted_llm import ScriptedLLM, make_text_session

ENTRY = "tests.test_resumable_job:_entry"
TURNS = ("remember the blue door", "remember the code 4711", "remember the cat is Tom")


# ------------------------------------------------------------ the job process side


class Clerk(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You remember what the caller says.")


async def _entry(ctx: JobContext) -> None:
    opts: dict[str, Any] = json.loads(ctx.job.metadata)
    in_code: dict[str, Any] = {}
    if opts.get("keys_in_code"):
        in_code["signing_keys"] = opts["signing_keys"]
    elif "signing_keys" in opts:
        os.environ["RESUME_SIGNING_KEYS"] = opts["signing_keys"]
    registry = lr.AgentRegistry()
    registry.register(Clerk)
    model = ScriptedLLM(default="noted", chunk_delay=opts.get("chunk_delay", 0.0))
    session = make_text_session(model)
    store = lr.open_store(opts["store"], **opts.get("store_options", {}))

    def caller(ctx: JobContext) -> str:  # the caller, wherever they call from
        return next(iter(ctx.room.remote_participants.values())).identity

    rs = await lr.resumable_job(
        ctx,
        session,
        registry=registry,
        default=Clerk,
        store=store,
        key=caller if opts.get("key") == "identity" else None,
        token=opts.get("token"),
        leave_grace=opts.get("leave_grace"),
        room_options=room_io.RoomOptions(audio_input=False, audio_output=False, text_output=False),
        debounce=0.01,
        lease_ttl=opts.get("lease_ttl", 30.0),
        **in_code,
    )
    if opts.get("twice"):
        try:
            await lr.resumable_job(
                ctx, make_text_session(model), registry=registry, default=Clerk, store=store
            )
        except lr.SessionBusy as e:
            jobs.report("TWICE", type(e).__name__)

    def lost_watch(_: list[str]) -> None:
        jobs.report("STATE", shown_state(session, rs), int(rs._autosave.lost is not None))

    async def turn(args: list[str]) -> None:
        await session.run(user_input=" ".join(args))
        await rs._autosave.idle.wait()
        jobs.report("TURN", rs.version)

    async def end(_: list[str]) -> None:
        jobs.report("ENDED", await rs.end())

    jobs.on_command("turn", turn)
    jobs.on_command("end", end)
    jobs.on_command("state", lost_watch)
    session.on("close", lambda ev: jobs.report("CLOSED", ev.reason.value))
    first = model.requests[0].texts("user") if model.requests else []
    jobs.report("READY", int(rs.resumed), rs.version, json.dumps(first))


# ------------------------------------------------------------------------ helpers


def shown_state(session: AgentSession[Any], rs: lr.ResumableSession) -> str:
    """``rs.state`` as a test waits on it: a restore in place is ``active`` as soon as
    its history is back, a moment before the policy has restarted the session, and a
    turn in that moment fails ("AgentSession isn't running")."""
    return "starting" if rs.state == "active" and not session._started else rs.state


def metadata(target: dict[str, Any], **extra: Any) -> str:
    return json.dumps({**target, **extra})


@pytest.fixture(params=["sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"store": f"sqlite:///{tmp_path}/jobs.db"}
    server = request.getfixturevalue("redis_server")
    return {"store": server.url, "store_options": {"namespace": f"j{uuid.uuid4().hex[:8]}"}}


async def ready(job: RunningJob) -> tuple[bool, int, list[str]]:
    _, resumed, version, first = (await job.expect("READY")).split(" ", 3)
    return resumed == "1", int(version), json.loads(first)


async def turn(job: RunningJob, text: str) -> int:
    await job.send(f"turn {text}")
    return int((await job.expect("TURN")).split()[1])


async def stored(target: dict[str, Any], key: str) -> lr.Snapshot:
    from livekit_resume.bridge import from_stored
    from livekit_resume.snapshot.codec import Codec

    store = lr.open_store(target["store"], **target.get("store_options", {}))
    try:
        return from_stored(Codec(), await store.load(key))
    finally:
        await store.aclose()


def user_texts(snap: lr.Snapshot) -> list[str]:
    return [
        " ".join(str(c) for c in i["content"])
        for i in snap.history
        if i["type"] == "message" and i["role"] == "user"
    ]


# -------------------------------------------------------------------------- tests


async def test_a_job_shut_down_mid_reply_is_continued_by_the_next_job(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        first = await harness.start_job(
            ENTRY, room="call-1", metadata=metadata(target, chunk_delay=0.2)
        )
        assert (await ready(first))[0] is False
        for text in TURNS[:2]:
            await turn(first, text)
        await first.send(f"turn {TURNS[2]}")  # its reply streams slowly...
        await first.shutdown()  # ...when the worker shuts the job down
        assert first.exitcode == 0

        second = await harness.start_job(ENTRY, room="call-1", metadata=metadata(target))
        resumed, version, _ = await ready(second)
        assert resumed and version >= 3
        await turn(second, "what did I tell you?")
    snap = await stored(target, "call-1")
    assert user_texts(snap)[:4] == [*TURNS, "what did I tell you?"]


async def test_a_killed_job_is_taken_over_at_once_by_the_redispatched_job(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        first = await harness.start_job(ENTRY, room="call-2", metadata=metadata(target))
        await ready(first)
        acknowledged = [await turn(first, text) for text in TURNS]
        first.kill()
        await first.wait_exit()
        # the dead job's lease is live for 30 s more: the new job does not wait for it
        second = await harness.start_job(ENTRY, room="call-2", metadata=metadata(target))
        resumed, version, _ = await ready(second)
        assert resumed and version == acknowledged[-1]
        assert second.job_id != first.job_id
        await turn(second, "and now?")
    assert user_texts(await stored(target, "call-2")) == [*TURNS, "and now?"]


async def test_a_frozen_job_is_fenced_when_its_key_is_redispatched_and_goes_quiet(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        first = await harness.start_job(ENTRY, room="call-3", metadata=metadata(target))
        await ready(first)
        await turn(first, TURNS[0])
        first.stop()
        try:
            second = await harness.start_job(ENTRY, room="call-3", metadata=metadata(target))
            resumed, _, _ = await ready(second)
            assert resumed
            taken_at = await turn(second, TURNS[1])
        finally:
            first.cont()
        await first.send(f"turn {TURNS[2]}")  # the zombie's user speaks again...
        closed = await first.expect("CLOSED")  # ...and the zombie goes quiet and ends
        assert closed.split()[1] in ("user_initiated", "job_shutdown")
        assert await first.wait_exit() == 0
        await turn(second, "still there?")
    snap = await stored(target, "call-3")
    assert TURNS[2] not in user_texts(snap)  # nothing the zombie heard was written
    assert snap.version > taken_at


async def test_the_same_job_restoring_a_key_twice_is_refused(target: dict[str, Any]) -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(ENTRY, room="call-4", metadata=metadata(target, twice=1))
        assert (await job.expect("TWICE")).split()[1] == "SessionBusy"
        assert (await ready(job))[0] is False  # the first call stands


async def test_a_sigterm_to_the_process_group_does_not_end_a_resumable_job(
    target: dict[str, Any],
) -> None:
    async with JobHarness(start_method="forkserver") as harness:
        job = await harness.start_job(ENTRY, room="call-5", metadata=metadata(target))
        await ready(job)
        job.signal(signal.SIGTERM)
        assert await turn(job, TURNS[0]) >= 1  # still answering and saving
        await job.shutdown()
        assert job.exitcode == 0
    assert user_texts(await stored(target, "call-5")) == [TURNS[0]]


async def state(job: RunningJob) -> tuple[str, bool]:
    await job.send("state")
    _, value, lost, *_earlier = (await job.expect("STATE")).split()
    return value, lost == "1"


async def until_state(job: RunningJob, want: str) -> None:
    async def reached() -> bool:
        return (await state(job))[0] == want

    await eventually(reached, f"the job's session is {want}", 20.0)


async def test_a_caller_back_in_a_new_room_continues_and_another_caller_does_not(
    target: dict[str, Any],
) -> None:
    by_caller = metadata(target, key="identity")
    async with JobHarness() as harness:
        first = await harness.start_job(
            ENTRY, room="web-1", metadata=by_caller, participant_identity="alice"
        )
        await ready(first)
        await turn(first, TURNS[0])
        await first.shutdown()  # the tab closed; the front end makes a new room next time

        again = await harness.start_job(
            ENTRY, room="web-2", metadata=by_caller, participant_identity="alice"
        )
        resumed, _, _ = await ready(again)
        assert resumed
        await turn(again, "I am back")
        await again.shutdown()

        other = await harness.start_job(
            ENTRY, room="web-3", metadata=by_caller, participant_identity="bob"
        )
        assert (await ready(other))[0] is False
        await other.shutdown()
    snap = await stored(target, "alice")
    assert user_texts(snap) == [TURNS[0], "I am back"]
    assert snap.meta.room == "web-2"  # the store knows where the conversation is now


async def test_the_caller_leaving_pauses_rejoining_resumes_and_the_grace_suspends(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(
            ENTRY, room="call-6", metadata=metadata(target, leave_grace=30)
        )
        await ready(job)
        await turn(job, TURNS[0])
        await job.send("leave caller CONNECTION_TIMEOUT")  # a dropped network
        await until_state(job, "paused")
        await job.send("join caller")
        await until_state(job, "active")
        await turn(job, TURNS[1])  # answered in place: nothing lost
        await job.shutdown()

        short = await harness.start_job(
            ENTRY, room="call-6", metadata=metadata(target, leave_grace=0.3)
        )
        assert (await ready(short))[0]
        await short.send("leave caller CLIENT_INITIATED")
        await until_state(short, "suspended")
        await short.shutdown()
    snap = await stored(target, "call-6")
    assert user_texts(snap) == list(TURNS[:2]) and snap.state == "suspended"


SIGN = "j1:" + base64.b64encode(b"j" * 32).decode()


async def test_a_reconnect_token_resumes_its_conversation_in_a_new_room_and_nothing_else(
    target: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    signed = {**target, "signing_keys": SIGN}
    store = lr.open_store(target["store"], **target.get("store_options", {}))
    try:
        async with JobHarness() as harness:
            first = await harness.start_job(ENTRY, room="web-1", metadata=metadata(signed))
            await ready(first)
            await turn(first, TURNS[0])
            await first.shutdown()
            token = await lr.issue_token(store, "web-1", ttl=600)

            back = await harness.start_job(
                ENTRY, room="web-2", metadata=metadata(signed, token=token)
            )
            assert (await ready(back))[0]  # the token's conversation, in a new room
            await turn(back, "I am back")
            forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            await back.send("end")  # the app treats this call as over
            await back.expect("ENDED")
            await back.shutdown()

            stranger = await harness.start_job(
                ENTRY, room="web-3", metadata=metadata(signed, token=forged)
            )
            assert not (await ready(stranger))[0]  # forged: refused, a fresh call
            await stranger.shutdown()
            again = await harness.start_job(
                ENTRY, room="web-4", metadata=metadata(signed, token=token)
            )
            assert not (await ready(again))[0]  # ended: the token is revoked
            await again.shutdown()
        with pytest.raises(lr.TokenRefused):
            await lr.verify_token(store, token)
    finally:
        await store.aclose()


async def test_keys_given_in_code_sign_the_job_and_check_its_tokens(
    target: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``resumable_job(..., signing_keys=K)`` raised ValueError ("pass the keys to the
    Codec, or keys without a codec, not both") on every job: it made a codec from the
    environment and passed the keys beside it. Its token check read the environment's
    keys alone, so a token signed with K was refused there too."""
    monkeypatch.delenv("RESUME_SIGNING_KEYS", raising=False)
    signed = {**target, "signing_keys": SIGN, "keys_in_code": True}
    store = lr.open_store(target["store"], **target.get("store_options", {}))
    try:
        async with JobHarness() as harness:
            first = await harness.start_job(ENTRY, room="code-1", metadata=metadata(signed))
            await ready(first)
            await turn(first, TURNS[0])
            await first.shutdown()
            with pytest.raises(lr.SignatureMismatch):  # signed with K: not readable without
                await stored(target, "code-1")
            token = await lr.issue_token(store, "code-1", ttl=600, signing_keys=SIGN)
            back = await harness.start_job(
                ENTRY, room="code-2", metadata=metadata(signed, token=token)
            )
            assert (await ready(back))[0]  # the token's conversation, in a new room
            await back.shutdown()
    finally:
        await store.aclose()


async def _entry_example(ctx: JobContext) -> None:
    """An example's own call logic (``serve_call`` of examples/worker.py, or of the file
    the metadata names, with its keyword arguments), with the demo's scripted model."""
    import importlib.util

    from livekit_resume.cli.demo.agents import Visit
    from livekit_resume.cli.demo.rules import demo_llm

    opts: dict[str, Any] = json.loads(ctx.job.metadata)
    os.environ["RESUME_STORE"] = opts["store"]
    path = EXAMPLES / opts.get("example", "worker.py")
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = demo_llm()
    session = make_text_session(model, userdata=Visit())
    rs = await example.serve_call(ctx, session, **opts.get("serve", {}))

    async def turn(args: list[str]) -> None:
        await session.run(user_input=" ".join(args))
        await rs._autosave.idle.wait()
        jobs.report("TURN", rs.version, json.dumps(session.userdata.model_dump(mode="json")))

    jobs.on_command("turn", turn)
    jobs.on_command("state", lambda _: jobs.report("STATE", rs.state, 0))
    jobs.report("READY", int(rs.resumed), rs.version, json.dumps([]))


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def test_the_example_worker_survives_a_shutdown_under_the_demos_conditions(
    tmp_path: Path,
) -> None:
    """The example's entrypoint logic, in real job processes, with the demo's model."""
    meta = json.dumps({"store": f"sqlite:///{tmp_path}/example.db"})
    entry = "tests.test_resumable_job:_entry_example"
    async with JobHarness() as harness:
        first = await harness.start_job(entry, room="example-room", metadata=meta)
        assert not (await ready(first))[0]
        for text in ("Hi, I'm Ada.", "I'd like to book a check-up.", "Monday, please."):
            await first.send(f"turn {text}")
            await first.expect("TURN")
        await first.shutdown()

        second = await harness.start_job(entry, room="example-room", metadata=meta)
        resumed, version, _ = await ready(second)
        assert resumed and version > 0
        await second.send("turn Sorry, which day did I book?")
        _, _, userdata = (await second.expect("TURN")).split(" ", 2)
        assert json.loads(userdata)["name"] == "Ada"
        assert json.loads(userdata)["day"] is not None  # booked in the first job
        await second.shutdown()


async def test_the_lifecycle_example_pauses_suspends_and_restores_in_place_when_the_caller_is_back(
    tmp_path: Path,
) -> None:
    """examples/lifecycle.py (shown in docs/lifecycle.md), with short times."""
    meta = json.dumps(
        {
            "store": f"sqlite:///{tmp_path}/lifecycle.db",
            "example": "lifecycle.py",
            "serve": {"leave_grace": 0.3, "suspend_after": 0.3},
        }
    )
    async with JobHarness() as harness:
        job = await harness.start_job(
            "tests.test_resumable_job:_entry_example", room="clinic-7", metadata=meta
        )
        assert not (await ready(job))[0]
        await job.send("turn Hi, I'm Ada.")
        await job.expect("TURN")
        await job.send("leave caller CONNECTION_TIMEOUT")  # the caller's network drops
        await until_state(job, "suspended")  # the grace ran out
        await job.send("join caller")  # back in the same room
        await until_state(job, "active")
        await job.send("turn I'd like to book a check-up.")
        _, _, userdata = (await job.expect("TURN")).split(" ", 2)
        assert json.loads(userdata)["name"] == "Ada"  # restored in place
        await job.shutdown()


# ------------------------------------------- a suspend in the job, then the caller is back

REJOIN = "tests.test_resumable_job:_entry_rejoin"
WELCOME = "Welcome to the clinic!"


class Greeter(Agent):
    """Greets a new caller once; rebuilt from a snapshot it does not greet again."""

    def __init__(self, *, restored: bool = False) -> None:
        super().__init__(instructions="You greet a new caller, then remember what they say.")
        self._restored = restored

    async def on_enter(self) -> None:
        if not self._restored:
            self.session.generate_reply(instructions="greet the caller")


async def _entry_rejoin(ctx: JobContext) -> None:
    opts: dict[str, Any] = json.loads(ctx.job.metadata)
    registry = lr.AgentRegistry()
    registry.register(Greeter, factory=lambda _state: Greeter(restored=True))
    model = ScriptedLLM([WELCOME], default="noted")
    store = lr.open_store(opts["store"], **opts.get("store_options", {}))

    async def run(session: AgentSession[Any]) -> lr.ResumableSession:
        return await lr.resumable_job(
            ctx,
            session,
            registry=registry,
            default=Greeter,
            store=store,
            leave_grace=opts.get("leave_grace"),
            suspend_after=opts.get("suspend_after"),
            room_options=room_io.RoomOptions(
                audio_input=False, audio_output=False, text_output=False
            ),
            debounce=0.01,
        )

    first = make_text_session(model)
    live: list[tuple[AgentSession[Any], lr.ResumableSession]] = [(first, await run(first))]

    async def turn(args: list[str]) -> None:
        session, rs = live[-1]
        asked = len(model.requests)
        await session.run(user_input=" ".join(args))
        await rs._autosave.idle.wait()
        sent = model.requests[asked].texts("user") if len(model.requests) > asked else []
        jobs.report("TURN", rs.version, json.dumps(sent))

    async def pause(_: list[str]) -> None:
        jobs.report("PAUSED", await live[-1][1].pause())

    async def again(_: list[str]) -> None:
        # the documented path by hand: a new AgentSession and another resumable_job call
        session = make_text_session(model)
        live.append((session, await run(session)))
        jobs.report("AGAIN", int(live[-1][1].resumed))

    def state(_: list[str]) -> None:
        jobs.report("STATE", shown_state(*live[-1]), 0, *(rs.state for _, rs in live))

    def history(_: list[str]) -> None:
        session = live[-1][0]
        said = [m.text_content for m in session.history.messages() if m.role == "assistant"]
        # the stand-in room records the attributes published (an autospec mock)
        calls = cast(Any, ctx.room.local_participant.set_attributes).call_args_list
        attrs = calls[-1].args[0] if calls else {}
        jobs.report(
            "HISTORY",
            json.dumps(
                {
                    "ids": [i.id for i in session.history.items],
                    "said": said,
                    "asked": len(model.requests),
                    "attributes": attrs,
                }
            ),
        )

    jobs.on_command("turn", turn)
    jobs.on_command("pause", pause)
    jobs.on_command("again", again)
    jobs.on_command("state", state)
    jobs.on_command("history", history)
    jobs.report("READY", int(live[0][1].resumed), live[0][1].version, "[]")


async def history(job: RunningJob) -> dict[str, Any]:
    await job.send("history")
    result: dict[str, Any] = await job.expect_json("HISTORY")
    return result


async def test_after_suspend_after_a_participant_joining_restores_the_call_in_this_job(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(
            REJOIN, room="hold-1", metadata=metadata(target, suspend_after=0.3)
        )
        assert (await ready(job))[0] is False
        for text in TURNS[:2]:
            await turn(job, text)
        await job.send("pause")  # e.g. the caller asked to hold; nobody resumes in time
        await job.expect("PAUSED")
        await until_state(job, "suspended")

        async def released() -> bool:  # a suspend sets its state, then frees the lease
            info = await _info(target, "hold-1")
            return info.owner is None and info.info["state"] == "suspended"

        await eventually(released, "the suspended session's lease is released", 20.0)
        before = await history(job)  # the attributes went out before the release
        assert before["attributes"]["resume.state"] == "suspended"

        await job.send("leave caller CONNECTION_TIMEOUT")  # the caller's client reconnects
        await job.send("join caller")
        await until_state(job, "active")
        after = await history(job)
        assert after["ids"][: len(before["ids"])] == before["ids"]  # every item back, once
        assert after["said"].count(WELCOME) == 1 and after["asked"] == before["asked"]
        assert after["attributes"]["resume.state"] == "active"
        await job.send("turn what did I tell you?")
        _, _, sent = (await job.expect("TURN")).split(" ", 2)
        assert json.loads(sent) == [*TURNS[:2], "what did I tell you?"]  # the whole call
        await job.shutdown()
    snap = await stored(target, "hold-1")
    assert user_texts(snap) == [*TURNS[:2], "what did I tell you?"]


async def test_after_the_leave_grace_suspends_the_caller_rejoining_is_restored_in_place(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(
            REJOIN, room="drop-1", metadata=metadata(target, leave_grace=0.3)
        )
        await ready(job)
        await turn(job, TURNS[0])
        await job.send("leave caller CONNECTION_TIMEOUT")
        await until_state(job, "suspended")
        await job.send("join caller")
        await until_state(job, "active")
        await job.send(f"turn {TURNS[1]}")
        _, _, sent = (await job.expect("TURN")).split(" ", 2)
        assert json.loads(sent) == list(TURNS[:2])
        await job.send("leave caller CLIENT_INITIATED")  # the grace works again after it
        await until_state(job, "suspended")
        assert (await history(job))["said"].count(WELCOME) == 1
        await job.shutdown()


async def _info(target: dict[str, Any], key: str) -> Any:
    store = lr.open_store(target["store"], **target.get("store_options", {}))
    try:
        return await store.info(key)
    finally:
        await store.aclose()


async def test_after_a_suspend_a_second_resumable_job_call_in_the_job_restores_it(
    target: dict[str, Any],
) -> None:
    async with JobHarness() as harness:
        job = await harness.start_job(
            REJOIN, room="hold-2", metadata=metadata(target, suspend_after=0.3)
        )
        await ready(job)
        for text in TURNS[:2]:
            await turn(job, text)
        await job.send("pause")
        await until_state(job, "suspended")
        await job.send("again")  # a new AgentSession, a second resumable_job call
        assert (await job.expect("AGAIN")).split()[1] == "1"
        await job.send("leave caller CONNECTION_TIMEOUT")
        await job.send("join caller")  # the first call's policy is retired: it takes nothing
        await job.send(f"turn {TURNS[2]}")
        _, _, sent = (await job.expect("TURN")).split(" ", 2)
        assert json.loads(sent) == list(TURNS)
        await job.send("state")
        assert (await job.expect("STATE")).split()[1:] == ["active", "0", "suspended", "active"]
        assert (await history(job))["said"].count(WELCOME) == 1
        await job.shutdown()
    assert user_texts(await stored(target, "hold-2")) == list(TURNS)
