"""`gc_paused`: no cyclic garbage collection over a synchronous burst of allocations.

Shared by the snapshot decode and the stores' record reading (neither imports the
other), so that a restore pays one collection per burst, not one per few hundred
objects allocated."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["gc_paused"]

# The collector is the process's: pauses on several threads at once (restores decoding
# side by side) are counted, and the last one to end turns it back on.
_lock = threading.Lock()
_pauses = 0


@contextlib.contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """No cyclic garbage collection inside: decoding a long history allocates many small
    objects (and no cycles), which would trigger full collections of the whole heap
    over and over, each holding the GIL from start to end. The pause is the process's:
    on a worker thread, the loop's other sessions run without collections meanwhile too
    (tens of milliseconds; what they allocate is collected once it ends). Pauses that
    overlap end with the last of them. ``pause=False`` changes nothing (a caller that
    decides at run time); an application that turned the collector off keeps it off (one
    that turns it off while a pause runs has it on again when the pause ends)."""
    global _pauses
    with _lock:
        if not pause or (_pauses == 0 and not gc.isenabled()):
            held = False
        else:
            held = True
            if _pauses == 0:
                gc.disable()
            _pauses += 1
    try:
        yield
    finally:
        if held:
            with _lock:
                _pauses -= 1
                if _pauses == 0:
                    gc.enable()
