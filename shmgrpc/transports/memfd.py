"""memfd: slots in anonymous sealed segments, passed over a side connection.

The sender's pool makes each segment with memfd_create, sealed against
shrinking and growing, and sends its descriptor once to each reader's node
over the side connection between the two processes (_side.py), before any
handle names it; the handle then names (segment number, slot). Nothing has
a name in any directory, so it needs no shared /dev/shm and no shared pid
namespace (two containers of a pod), and the kernel frees a segment with its
last descriptor and mapping, wherever that is: nothing is left behind.

The slots themselves, their headers, generations, claims and acks, are the
same as shm's (_layout.py, _pool.py, _attacher.py, _slots.py).
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from typing import Dict, Optional, Tuple

from .. import shmdir, wire
from ..errors import DataLossError
from . import _side
from ._attacher import Attached
from ._pool import Pool, Segment, Slot, Ticket
from ._slots import SlotTransport
from .base import Sent


class MemfdSegment(Segment):
    """A segment with no name: memfd_create, sealed against shrinking and
    growing, passed to each reader's node once over the side connection
    (_side.Conn.send_segment). Freed by the kernel with the last descriptor
    and mapping, in whichever process that is."""

    kind = "memfd"

    @classmethod
    def make(cls, pool: Pool, number: int, slot_size: int, count: int) -> "MemfdSegment":
        return cls(number, slot_size, count, pool.owner_inst)

    def __init__(self, number: int, slot_size: int, count: int, owner_inst: bytes):
        self.number = number
        self.name = f"memfd-{os.getpid()}-{number}"  # for keys and logs; nothing has this name
        self._layout(slot_size, count)
        try:
            self.fd = _side.memfd_segment(self.name, self.size)
        except OSError as err:
            raise shmdir.NoSpace(f"cannot reserve a {self.size}-byte memfd segment: {err.strerror}") from err
        try:
            mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._start(mm, owner_inst)
        self.conns: "weakref.WeakSet" = weakref.WeakSet()  # side connections that hold it

    def handle(self, slot: Slot) -> wire.MemfdHandle:
        return wire.MemfdHandle(slot.length, slot.token, slot.generation, slot.offset, slot.index, self.number,
                                wire.FLAG_HOLDS)

    def intact(self) -> bool:
        return self.fd >= 0  # sealed: nobody can shrink it

    def retire(self) -> None:
        try:
            struct.pack_into("<I", self.mm, 28, 1)
        except ValueError:
            pass
        for conn in list(self.conns):
            conn.retire(self.number)


class Memfd(SlotTransport):
    name = "memfd"
    letter = "m"
    handle_type = wire.MemfdHandle
    ticket_type = Ticket
    segment_class = MemfdSegment
    via_id_segment = False  # the side connection proves the peer

    def unusable(self) -> Optional[str]:
        if _side.available():
            return None
        return "not available here (memfd_create, SCM_RIGHTS or SO_PEERCRED missing)"

    def why_peer_does_not_send(self, route, who: str, notes: Dict[str, str]) -> Optional[str]:
        if not route.sends(self.name):
            return f"no side connection with {who}" + (f" ({notes['memfd']})" if "memfd" in notes else "")
        return super().why_peer_does_not_send(route, who, notes)

    def offload(self, data, route, held: int) -> Sent:
        side = self.node.side
        peer = route.peer
        conn = side.conn_for(peer.inst) if side is not None else None
        if conn is None:
            return None, None, "side_closed"
        pool = self.slots.get_pool()
        slot, reason = pool.alloc(len(data), conn, self.name, held=held, peer=peer.inst)
        if slot is None:
            return None, None, reason
        segment = slot.segment
        assert isinstance(segment, MemfdSegment)  # a "memfd" alloc
        segment.conns.add(conn)
        # "" once the peer holds the segment; else side_closed, side_budget
        # (the peer's grant is used up) or side_busy (its queue is full)
        reason = conn.send_segment(segment.number, segment.size, segment.fd)
        if reason:
            pool.release(Ticket(slot, slot.generation))
            return None, None, reason
        off = slot.offset
        segment.mm[off : off + len(data)] = data
        pool.publish(slot)
        return wire.encode_memfd(segment.handle(slot)), Ticket(slot, slot.generation), ""

    def _attach(self, h, peer, reread: bool, hold: bool) -> Tuple[memoryview, Attached]:
        side = self.node.side
        conn = side.conn_for(peer.inst) if side is not None else None
        if side is None or conn is None:
            raise DataLossError("received a memfd handle, but the side connection to its sender is closed")
        return self.slots.attacher.open_memfd((conn.id, h.segment), h, peer.inst, reread,
                                              arrive=lambda: side.arrive(conn, h.segment), hold=hold)

    def side_segment(self, conn, number: int, mm, size: int) -> bool:
        return self.slots.attacher.add_memfd((conn.id, number), mm, size)

    def side_retired(self, conn, number: int) -> None:
        self.slots.attacher.drop_memfd(conn.id, number)

    def side_lost(self, conn) -> None:
        # Unmap what it sent us and free what it was reading, now.
        self.slots.attacher.drop_memfd(conn.id)
        if self.slots.pool is not None:
            self.slots.pool.reclaim()
