"""Sent: what an aio server call must free when it ends (shmgrpc.aio._server).

(The client's counterpart is shmgrpc._codec.Tickets. Restoring no longer
runs off the event loop: see shmgrpc.aio._channel and
`python -m shmgrpc.aio._loopstall`.)"""

from __future__ import annotations

import threading
from typing import Any, List

from .._core import Engine


class Sent:
    """The tickets of one aio server call's offloaded responses (shm slots,
    cma pins: Engine.offload's `keep`), freed when the call was cancelled
    (client cancel, deadline, server stop): their reader never will read
    them. A call that ended normally leaves them to the client's ack (its
    responses may still be in flight): end(release=False).

    `add` after the end frees at once. Tickets carry their generation: one
    whose slot or pin was reused for another message since is ignored by
    Engine.release."""

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
