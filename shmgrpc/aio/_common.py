"""What the aio interceptors do around their awaits: what runs off the
event loop (and why), and the slots a call must free when it ends.

Off the loop. What holds the GIL blocks the event loop wherever it runs, a
worker thread included: protobuf's SerializeToString and FromString (at
256 MiB 0.3-2 s on a 2-core VM, mostly page faults of fresh memory), the
mmap slice copy into a slot (~40 ms warm), zeroing a bytearray. What drops
the GIL does not: process_vm_readv behind cma (ctypes drops it around every
foreign call; 256 MiB in ~50-150 ms).

So a restore of a large handle runs in a worker thread. The loop then stalls
for the longest single GIL-holding step instead of the sum of the steps
(on a server: restore, handler and serializing the reply used to run as one
step), and not at all while cma reads. A send stays on the loop: its size
is only known once it is serialized, and serializing is the step that holds
the GIL longest; grpc.aio serializes on the loop too, so offload adds one
copy into the slot there (shm), or nothing (cma).

`python -m shmgrpc.aio._loopstall` measures it end to end. One 256 MiB echo,
worst stall per call, client / server, median of 5 calls (2-core VM, shared
with other jobs while measured):

    plain grpc.aio        1365 / 1776 ms
    shm                    902 / 1019 ms   (every restore on the loop: 1327 / 2048)
    cma                   1047 / 1143 ms   (every restore on the loop: 1080 / 1670)

What remains is protobuf serializing the 256 MiB message, which plain
grpc.aio pays on the loop just the same.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any, Callable, List

from .. import wire
from .._core import Engine
from ..config import MiB

# Restores of handles at least this long run in the loop's default executor.
# A round trip through it costs ~0.14 ms here, about what cma's read of 1 MiB
# keeps the GIL free for (0.16 ms); parsing 1 MiB from shm is ~0.05 ms warm.
OFF_LOOP_BYTES = 1 * MiB


def handle_length(raw) -> int:
    """The payload length a raw handle announces; 0 if it does not parse
    (the restore itself then reports the error, on the loop)."""
    try:
        return wire.decode(raw).length
    except Exception:
        return 0


async def run(nbytes: int, fn: Callable, *args) -> Any:
    """fn(*args), in a worker thread when it moves `nbytes` >= OFF_LOOP_BYTES.

    If the awaiting task is cancelled the thread still finishes: callers make
    `fn` leave nothing behind on its own (a slot it allocates is registered
    from inside the thread, see Sent)."""
    if nbytes < OFF_LOOP_BYTES:
        return fn(*args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args))


class Sent:
    """What holds one call's offloaded messages (shm slots, cma pin tickets:
    Engine.offload's `keep`), to free when the call ends without its reader,
    who by then read them (they are acked) or never will.

    The client frees at the end of every call (the server is done reading);
    the server only when the call was cancelled (a finished call's responses
    may still be in flight to the client). `add` after the end frees at once.
    Tickets carry their generation: one whose slot or pin was reused for
    another message since is ignored by Engine.release."""

    __slots__ = ("_engine", "_lock", "_slots", "_open")

    def __init__(self, engine: Engine):
        self._engine = engine
        self._lock = threading.Lock()  # protects _slots and _open
        self._slots: List[Any] = []
        self._open = True

    def add(self, slot) -> None:
        with self._lock:
            if self._open:
                self._slots.append(slot)
                return
        self._engine.release(slot)

    def end(self, release: bool = True) -> None:
        with self._lock:
            self._open = False
            slots, self._slots = self._slots, []
        if not release:
            return
        for ticket in slots:
            self._engine.release(ticket)

    def end_with(self, call) -> None:
        """End when `call` is done (at once if it already is)."""
        call.add_done_callback(lambda _: self.end())
