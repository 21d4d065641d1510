"""shm: slots in named segments of the shared shm directory (/dev/shm).

The sender's pool makes each segment as a file of its own in the shm
directory (shmdir.create_mapping: O_EXCL, 0600, space reserved up front, a
shared lock held for life); the handle names (file, slot), and the reader
maps the file once (_attacher.Attacher) after checking it is a regular file of
its own uid that nobody else may open. It needs the two processes to share
that directory and uid: the handshake proves it (each opens the other's id
segment, session.py).

The slot layout and claims are in _layout.py, the sender's pool (generations,
when a slot is freed) in _pool.py, the reader's checks and acks in
_attacher.py.
"""

from __future__ import annotations

import os
from typing import Tuple

from .. import shmdir, wire
from ..errors import HandleError
from ._attacher import Attached
from ._pool import Pool, Segment, Slot, Ticket
from ._slots import SlotTransport
from .base import Sent


class ShmSegment(Segment):
    """A segment that is a file in the shm directory, named
    shmgrpc-<pid>-<start>-<random>-<n>."""

    kind = "shm"

    @classmethod
    def make(cls, pool: Pool, number: int, slot_size: int, count: int) -> "ShmSegment":
        return cls(pool.shm_dir, f"{pool.base_name}-{number}", slot_size, count, pool.owner_inst)

    def __init__(self, shm_dir: str, name: str, slot_size: int, count: int, owner_inst: bytes):
        self.name = name
        self.path = os.path.join(shm_dir, name)
        self._layout(slot_size, count)
        mm, self.fd = shmdir.create_mapping(shm_dir, name, self.size, keep_fd=True)
        self._start(mm, owner_inst)

    def handle(self, slot: Slot) -> wire.ShmHandle:
        return wire.ShmHandle(slot.length, slot.token, slot.generation, slot.offset, slot.index, self.name,
                              wire.FLAG_HOLDS)


class Shm(SlotTransport):
    name = "shm"
    letter = "s"
    handle_type = wire.ShmHandle
    ticket_type = Ticket
    segment_class = ShmSegment

    def offload(self, data, route, held: int) -> Sent:
        pool = self.slots.get_pool()
        peer = route.peer
        slot, reason = pool.alloc(len(data), (peer.pid, peer.start), self.name, held=held, peer=peer.inst)
        if slot is None:
            return None, None, reason
        segment = slot.segment
        assert isinstance(segment, ShmSegment)  # a "shm" alloc
        off = slot.offset
        segment.mm[off : off + len(data)] = data
        pool.publish(slot)
        return wire.encode_shm(segment.handle(slot)), Ticket(slot, slot.generation), ""

    def _attach(self, h, peer, reread: bool, hold: bool) -> Tuple[memoryview, Attached]:
        if not peer.named:
            raise HandleError("received an shm handle from a peer whose id segment we cannot open")
        return self.slots.attacher.open(h, peer.inst, reread, hold=hold)
