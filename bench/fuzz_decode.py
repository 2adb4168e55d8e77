"""Fuzz `Codec.decode` with mutated real frames: only typed errors, bounded time and
memory per frame.

Real snapshots (a conversation with tool calls, a handoff, userdata) are encoded by four
codecs: signed, encrypted, both, neither. Each fuzzed frame is one of them mutated at
random: bits flipped, bytes overwritten or inserted or deleted, the frame cut short or
extended, a header field (length, flags, format version) rewritten, or two frames
spliced. Every frame is decoded by the codec that wrote it (and the codec of another
mode, for downgrades and mix-ups). The outcome is a `ResumeError`, or a `Snapshot` when the
mutation left the bytes as they were; anything else is a finding (an untyped error, or a
changed frame accepted by a codec with keys), printed with the seed and frame number.

    python bench/fuzz_decode.py [--frames 100000] [--seed 15]

Prints the outcomes by error type, the slowest frame and the largest peak of memory
allocated while decoding one frame (tracemalloc). The suite runs a slice of it
(tests/test_security.py).
"""

from __future__ import annotations

import argparse
import base64
import random
import struct
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field

from livekit.agents import llm

from livekit_resume.errors import ResumeError
from livekit_resume.snapshot.chat import item_to_data
from livekit_resume.snapshot.codec import Codec
from livekit_resume.snapshot.model import AgentFrame, SessionMeta, Snapshot, ToolCallRecord

__all__ = ["MODES", "Report", "codecs", "fuzz", "mutate", "real_frames"]

_SIGN = "s1:" + base64.b64encode(b"signing-key-of-the-fuzz-run-32b!").decode()
_ENC = "e1:" + base64.b64encode(b"encryption-key-of-the-fuzz-32by!").decode()
MODES = ("neither", "signed", "encrypted", "both")


def codecs() -> dict[str, Codec]:
    """One codec per mode."""
    return {
        "neither": Codec(),
        "signed": Codec(signing_keys=_SIGN),
        "encrypted": Codec(encryption_keys=_ENC),
        "both": Codec(signing_keys=_SIGN, encryption_keys=_ENC),
    }


def _snapshot(turns: int) -> Snapshot:
    history = []
    for i in range(turns):
        history.append(
            item_to_data(
                llm.ChatMessage(
                    id=f"u{i}", role="user", content=[f"question {i} ünïcødé"], created_at=i
                )
            )
        )
        if i % 3 == 1:
            history.append(
                item_to_data(
                    llm.FunctionCall(
                        id=f"fc{i}", call_id=f"c{i}", name="lookup", arguments='{"n": 1}'
                    )
                )
            )
            history.append(
                item_to_data(
                    llm.FunctionCallOutput(
                        id=f"fo{i}", call_id=f"c{i}", name="lookup", output="42", is_error=False
                    )
                )
            )
        history.append(
            item_to_data(
                llm.ChatMessage(
                    id=f"a{i}", role="assistant", content=[f"answer {i}"], created_at=i + 0.5
                )
            )
        )
    return Snapshot(
        key=f"fuzz-{turns}",
        version=turns + 1,
        meta=SessionMeta(room="room", turn_count=turns, extra={"tier": "gold"}),
        history=history,
        agent=AgentFrame(agent_id="Receptionist", chat_ctx=history[-4:], instructions="be kind"),
        userdata={"balance": 500, "facts": ["blue door", "4711"], "raw": b"\x00\x01"},
        tool_calls=[ToolCallRecord(call_id="c99", name="book", arguments="{}")],
    )


def real_frames() -> list[tuple[str, bytes]]:
    """(mode, frame) for snapshots of a few sizes, in every mode."""
    all_codecs = codecs()
    return [
        (mode, codec.encode(_snapshot(turns)))
        for turns in (0, 1, 5, 40)
        for mode, codec in all_codecs.items()
    ]


def mutate(rng: random.Random, frame: bytes, other: bytes) -> bytes:
    """One random mutation of ``frame`` (``other``: a second frame to splice in)."""
    data = bytearray(frame)
    kind = rng.randrange(9)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrite bytes
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:  # insert bytes
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # delete a range
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 64)]
    elif kind == 4:  # cut short
        del data[rng.randrange(len(data)) :]
    elif kind == 5:  # extend
        data += rng.randbytes(rng.randint(1, 256))
    elif kind == 6:  # a header field: 4-byte magic, then version, flags, reserved, length
        field_at = rng.choice((4, 5, 6, 8))
        if field_at == 8 and len(data) >= 12:
            data[8:12] = struct.pack(">I", rng.choice((0, 1, len(data), 2**31, 2**32 - 1)))
        elif len(data) > field_at:
            data[field_at] = rng.randrange(256)
    elif kind == 7:  # splice two frames
        i, j = rng.randrange(len(data) + 1), rng.randrange(len(other) + 1)
        data = data[:i] + other[j:]
    else:  # random bytes of the same length
        data = bytearray(rng.randbytes(len(data)))
    return bytes(data)


@dataclass
class Report:
    frames: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    max_seconds: float = 0.0
    max_peak_bytes: int = 0
    largest_frame: int = 0

    def lines(self) -> list[str]:
        out = [
            f"frames decoded: {self.frames} (largest {self.largest_frame} bytes)",
            *(f"  {name}: {n}" for name, n in sorted(self.outcomes.items())),
            f"untyped errors: {len(self.findings)}",
            f"slowest frame: {self.max_seconds * 1000:.2f} ms",
            f"largest peak allocated while decoding one frame: {self.max_peak_bytes} bytes",
        ]
        return out + [f"  finding: {f}" for f in self.findings[:20]]


def fuzz(frames: int, seed: int = 15) -> Report:
    """Decode ``frames`` mutated frames; see the module docstring."""
    rng = random.Random(seed)
    all_codecs = codecs()
    sources = real_frames()
    report = Report()
    tracemalloc.start()
    try:
        for n in range(frames):
            mode, frame = rng.choice(sources)
            fuzzed = mutate(rng, frame, rng.choice(sources)[1])
            # mostly the writer's own codec; sometimes another mode's (downgrade, mix-up)
            reader = mode if rng.random() < 0.75 else rng.choice(MODES)
            report.largest_frame = max(report.largest_frame, len(fuzzed))
            tracemalloc.reset_peak()
            start = time.perf_counter()
            try:
                all_codecs[reader].decode(fuzzed)
                # a mutation may leave the bytes as they were (a byte overwritten by
                # itself): that is the real frame, rightly accepted
                outcome = "accepted (bytes unchanged)" if fuzzed == frame else "accepted CHANGED"
                if fuzzed != frame and reader != "neither":
                    report.findings.append(f"seed {seed} frame {n}: a changed frame accepted")
            except ResumeError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # a finding: every refusal must be typed
                outcome = "UNTYPED " + type(exc).__name__
                report.findings.append(f"seed {seed} frame {n}: {exc!r}")
            elapsed = time.perf_counter() - start
            report.max_peak_bytes = max(report.max_peak_bytes, tracemalloc.get_traced_memory()[1])
            report.max_seconds = max(report.max_seconds, elapsed)
            report.outcomes[outcome] += 1
            report.frames += 1
    finally:
        tracemalloc.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    started = time.perf_counter()
    report = fuzz(args.frames, args.seed)
    print("\n".join(report.lines()))
    print(f"wall time: {time.perf_counter() - started:.1f} s (seed {args.seed})")
    raise SystemExit(1 if report.findings else 0)


if __name__ == "__main__":
    main()
