"""How many values a msgpack body holds, counted without building them.

The decoders bound every length by the bytes they are given, but not the objects those
bytes become: an empty map is one byte of msgpack and about 72 bytes of memory, so a
small deflated body of empty maps can take gigabytes to unpack. A body read from a store
or a file is therefore refused when it holds more than `MAX_VALUES` values, and nothing
holding more is ever written. Only a body longer than `MAX_VALUES` bytes can hold more
(each value takes a byte at least), so the count runs for large bodies alone, and there
it steps over strings and binaries by their lengths: a 50 MB tool output is a few steps.
"""

from __future__ import annotations

__all__ = ["MAX_VALUES", "too_many_values"]

# Two million values take about 150 MB at most once unpacked (the strings' own bytes
# aside). A conversation's frame holds a few per item; a userdata or tool value of that
# many is a bug or an attack.
MAX_VALUES = 2_000_000

# For the first bytes 0xc4 to 0xdf: how many bytes a length field takes (0: none), the
# bytes that follow it whatever the length (a fixed-size number, an ext's type byte),
# and what the length counts: 0 bytes to skip, 1 values, 2 pairs of values.
_WIDE: dict[int, tuple[int, int, int]] = {
    0xC4: (1, 0, 0), 0xC5: (2, 0, 0), 0xC6: (4, 0, 0),  # bin 8/16/32
    0xC7: (1, 1, 0), 0xC8: (2, 1, 0), 0xC9: (4, 1, 0),  # ext 8/16/32
    0xCA: (0, 4, 0), 0xCB: (0, 8, 0),  # float 32/64
    0xCC: (0, 1, 0), 0xCD: (0, 2, 0), 0xCE: (0, 4, 0), 0xCF: (0, 8, 0),  # uint
    0xD0: (0, 1, 0), 0xD1: (0, 2, 0), 0xD2: (0, 4, 0), 0xD3: (0, 8, 0),  # int
    0xD4: (0, 2, 0), 0xD5: (0, 3, 0), 0xD6: (0, 5, 0), 0xD7: (0, 9, 0), 0xD8: (0, 17, 0),
    0xD9: (1, 0, 0), 0xDA: (2, 0, 0), 0xDB: (4, 0, 0),  # str 8/16/32
    0xDC: (2, 0, 1), 0xDD: (4, 0, 1),  # array 16/32
    0xDE: (2, 0, 2), 0xDF: (4, 0, 2),  # map 16/32
}  # fmt: skip


def too_many_values(body: bytes, limit: int = MAX_VALUES) -> bool:
    """Whether the msgpack ``body`` holds more than ``limit`` values (a map's keys and
    values counted apart, a list or map itself once). Damaged bytes are left to the
    decoder to refuse: the count stops where they end."""
    if len(body) <= limit:
        return False
    pos, end = 0, len(body)
    pending, seen = 1, 0  # values announced and not read yet; values read
    while pending and pos < end:
        if seen + pending > limit:  # each value announced takes a byte at least
            return True
        b = body[pos]
        pos += 1
        pending -= 1
        seen += 1
        if b < 0x80 or b >= 0xE0 or 0xC0 <= b <= 0xC3:
            continue  # fixint, nil, false, true (0xc1 is never used)
        if b < 0x90:
            pending += 2 * (b & 0x0F)  # fixmap
        elif b < 0xA0:
            pending += b & 0x0F  # fixarray
        elif b < 0xC0:
            pos += b & 0x1F  # fixstr
        else:
            size, fixed, counts = _WIDE[b]
            n = int.from_bytes(body[pos : pos + size], "big")
            pos += size + fixed
            if counts:
                pending += counts * n
            else:
                pos += n
    return seen + pending > limit
