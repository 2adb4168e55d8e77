"""`gc_paused`: no cyclic garbage collection over a synchronous burst of allocations.

Shared by the snapshot decode and the stores' record reading (neither imports the
other), so that a restore pays one collection per burst, not one per few hundred
objects allocated."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """No cyclic garbage collection inside: decoding a long history allocates many small
    objects (and no cycles), which would trigger full collections of the whole heap
    over and over. Synchronous code only (the loop runs nothing else meanwhile).
    ``pause=False`` changes nothing (a caller that decides at run time)."""
    if not pause or not gc.isenabled():
        yield  # not asked, or the application turned it off: it stays off
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
