"""The names of a namespace's keys (the layout is in the package docstring)."""

from __future__ import annotations

import binascii
import hashlib

__all__ = ["KeyNames", "glob_escape", "slot_tags"]

# A Cluster slot is the CRC16 (XMODEM) of a key's hash tag, mod 16384. That CRC is linear
# over GF(2) for messages of one length, so a tag of four characters 0x40 | nibble has
# 16 free bits, and any slot is reached by solving for them: the basis below (each
# vector with the free bits that make it) is reduced on its highest bit once, at import.
# Two of the 16 bits are left over (the kernel): four tags per slot.
_TAG_CHARS = 4
_TAG_BASE = binascii.crc_hqx(bytes([0x40] * _TAG_CHARS), 0)


def _slot_basis() -> tuple[dict[int, tuple[int, int]], list[int]]:
    basis: dict[int, tuple[int, int]] = {}
    kernel: list[int] = []
    for bit in range(4 * _TAG_CHARS):
        unit = bytearray(_TAG_CHARS)
        unit[bit // 4] = 1 << bit % 4
        vector, bits = binascii.crc_hqx(bytes(unit), 0) & 0x3FFF, 1 << bit
        for top in sorted(basis, reverse=True):
            if vector >> top & 1:
                vector ^= basis[top][0]
                bits ^= basis[top][1]
        if vector:
            basis[vector.bit_length() - 1] = (vector, bits)
        else:
            kernel.append(bits)  # free bits whose CRC is 0 mod 16384
    return dict(sorted(basis.items(), reverse=True)), kernel


_SLOT_BASIS, _SLOT_KERNEL = _slot_basis()
assert len(_SLOT_BASIS) == 14, "four such characters reach every one of 16384 slots"


def _tag(key: str) -> str:
    """The key as a hash tag body: no brace may end (or empty) the tag early."""
    return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def slot_tags(text: str) -> list[str]:
    """The four hash tags of four letters (``@`` to ``O``) in the Cluster slot of hash tag
    ``text``: a key named with one lives on the node of ``text``'s keys."""
    rest = (binascii.crc_hqx(text.encode(), 0) ^ _TAG_BASE) & 0x3FFF
    bits = 0
    for top, (vector, made_by) in _SLOT_BASIS.items():
        if rest >> top & 1:
            rest ^= vector
            bits ^= made_by
    k1, k2 = _SLOT_KERNEL
    return [_letters(bits ^ extra) for extra in (0, k1, k2, k1 ^ k2)]


def _letters(bits: int) -> str:
    return "".join(chr(0x40 | bits >> 4 * i & 15) for i in range(_TAG_CHARS))


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class KeyNames:
    """Key names of one namespace: every key of a session shares the hash tag ``{key}``."""

    def __init__(self, namespace: str, database: int = 0) -> None:
        self.namespace = namespace
        self.index = f"{namespace}:sessions"
        # Redis pub/sub ignores the database number: the same namespace in another
        # database would hear this one's events
        self._db = f":db{database}" if database else ""
        self.channel = f"{namespace}:events{self._db}"

    def prefix(self, key: str) -> str:
        """What every key of the session starts with."""
        return f"{self.namespace}:{{{_tag(key)}}}:"

    def control(self, key: str) -> str:
        """The session's command channel (stores/redis/control.py): its hash tag, outside
        its prefix, so that the session's own keys never include a command's."""
        return f"{self.namespace}:ctl:{{{_tag(key)}}}"

    def control_channel(self, key: str) -> str:
        """Where the session's commands are published: `control`, and the database."""
        return self.control(key) + self._db

    def head(self, key: str) -> str:
        return self.prefix(key) + "head"

    def is_body(self, key: str, name: str) -> bool:
        """Whether ``name`` is one of the session's version bodies (``v:<n>:b``)."""
        rest = name.removeprefix(self.prefix(key) + "v:")
        return rest != name and rest.endswith(":b") and rest[:-2].isdigit()

    def log(self, key: str, gen: int) -> str:
        return f"{self.prefix(key)}log:{gen}"

    def staged(self, key: str, token: str) -> str:
        """Where a large log element waits for the script that appends it (`records`,
        `STAGED`): the session's hash tag, outside its prefix, so that one left behind
        is never taken for the remains of the session."""
        return f"{self.namespace}:up:{{{_tag(key)}}}:{token}"

    def tombstone(self, key: str) -> str:
        """What a delete of the session leaves (tombstone.lua): named by a SHA-256 of
        the key, never the key itself (`rm` leaves no trace of it), and a hash tag of
        the session's slot (`slot_tags`), so on a Cluster it lives and fails over with
        the session's keys. Of the slot's four tags, the first that spells the key in
        no part of the name it adds (only a key made to do so meets all four). No
        namespace's session prefix (``N:{tag}:``) includes it: its tag follows the hash
        with no colon, and nothing follows the tag."""
        return self.tombstones(key)[0]

    def tombstones(self, key: str) -> tuple[str, str]:
        """Both names a delete lays, in the order it lays them: `tombstone`, then
        `legacy_tombstone`."""
        legacy = self.legacy_tombstone(key)
        # where an occurrence of the key would reach into what the tag adds
        start = max(0, len(legacy) - len(key) + 1)
        for tag in slot_tags(_tag(key)):
            name = f"{legacy}{{{tag}}}"
            if key not in name[start:]:
                break
        return name, legacy

    def legacy_tombstone(self, key: str) -> str:
        """The tombstone of releases before the session-slot one (`tombstone`), in a slot
        of its own: still laid and read, for their workers during a rolling deploy."""
        return f"{self.namespace}:rm:{hashlib.sha256(key.encode()).hexdigest()}"
