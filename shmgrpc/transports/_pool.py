"""The sender's pool: segments, size classes, slots, generations. The layout
of a segment and of a slot header, and what a reader's claim means, are in
_layout.py; the receiver's side is _attacher.py.

The sender owns its pool; a transport makes its segments (shm.ShmSegment: a
file under the shm directory, created with O_EXCL and mode 0600, named
shmgrpc-<pid>-<start ticks>-<random>-<n>; memfd.MemfdSegment: an anonymous
sealed memfd). Space is reserved with posix_fallocate when a segment is
made: a full tmpfs (Docker's 64 MiB /dev/shm) then fails at creation with
ENOSPC and the message goes inline (or takes the next transport), instead of
killing the process with SIGBUS on first touch.

The sender frees a slot (bumping its generation) only when its reader
acknowledged it, its reader is gone, its call ended, or its lease ran out:
never because the pool is full or the peer over its share (then the message
takes the next rung, or goes inline).

A HELD slot is its reader's until the reader acknowledges it or is gone:
neither the end of its call nor its lease frees it (it counts against that
reader's share of the pool). A use freed before its reader acknowledged it
(the call ended, the lease ran out) is *revoked*: its generation moves on at
once, so a reader that comes later fails with DATA_LOSS, but the slot is
handed out again only after QUARANTINE_SECONDS (at once if its reader's
process exited), and only if no reader marked it HELD meanwhile. A reader
checks the generation again after writing HELD; one whose check raced with
the revocation finds its HELD seen by then (the sender looks a whole
quarantine later), so the bytes it keeps never change under it. A slot HELD
by a memfd reader whose side connection closed is never handed out again,
unless that reader's process is seen to have exited (not from another pid
namespace): its segment goes when it is otherwise idle.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Type

from .. import shmdir, wire
from ._layout import (
    ACKED,
    CLAIM_AT,
    FREE,
    HELD,
    MIN_CLASS,
    NO_CLAIM,
    PAGE,
    READING,
    READY,
    SEG,
    SEG_MAGIC,
    SLOT,
    SLOT_HEADER,
    STATE_AT,
    WRITING,
    Liveness,
    round_up,
    size_class,
)
from .base import FREE_ON_ACK, KEEP_WHILE_ROOM

log = logging.getLogger(__name__)

# A segment none of whose slots was handed out for this long is given back
# (unlinked and unmapped). Long enough that steady traffic, even bursty, keeps
# its warm slots; short enough that a burst's peak does not stay for good.
IDLE_SECONDS = 30.0
# How long a revoked use waits before its slot is handed out again: far
# longer than any reader's store can take to be seen (microseconds; see the
# docstring), and short, since the slot is out of use meanwhile: a flood of
# calls that end before their large requests are read holds about this many
# seconds of their bytes (DESIGN 4c).
QUARANTINE_SECONDS = 0.1


class Segment:
    """One mapped segment of the owner's pool, cut into equal slots. A
    transport makes the mapping (shm.ShmSegment: a named file in the shm
    directory; memfd.MemfdSegment: an anonymous sealed memfd) and says how a
    handle names one of its slots; the pool does the rest."""

    kind = ""  # the transport's name
    name = ""  # unique in the pool; a file's name for kind "shm"
    path = ""  # the file to unlink at destroy(), if any
    orphans = 0  # slots never handed out again (HELD by a reader whose connection closed)

    @classmethod
    def make(cls, pool: "Pool", number: int, slot_size: int, count: int) -> "Segment":
        """A new segment of `count` slots of `slot_size` bytes, the pool's
        `number`th. Raises shmdir.NoSpace where it cannot be made."""
        raise NotImplementedError

    def _layout(self, slot_size: int, count: int) -> None:
        self.slot_size = slot_size
        self.count = count
        self.header_size = round_up(64 + SLOT_HEADER * count, PAGE)
        self.size = self.header_size + slot_size * count
        self.fd = -1

    def _start(self, mm: mmap.mmap, owner_inst: bytes) -> None:
        """The mapping is made: write the segment header."""
        self.mm = mm
        SEG.pack_into(mm, 0, SEG_MAGIC, self.header_size, self.count, self.slot_size, os.getpid(), 0, owner_inst)
        self.generations = [0] * self.count  # the owner's own copy: never trust shared memory for it
        self.last_used = time.monotonic()  # the pool gives back segments idle for IDLE_SECONDS

    def handle(self, slot: "Slot") -> "wire.ShmHandle | wire.MemfdHandle":
        """The handle of `slot`'s current use."""
        raise NotImplementedError

    def data_offset(self, index: int) -> int:
        return self.header_size + index * self.slot_size

    def intact(self) -> bool:
        return self.fd >= 0 and shmdir.intact(self.fd, self.size)

    def close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def retire(self) -> None:
        """Tell its readers it is going (they drop their mapping)."""
        try:
            if self.intact():
                struct.pack_into("<I", self.mm, 28, 1)
        except ValueError:
            pass  # already closed

    def destroy(self) -> None:
        """Owner only: mark retired (attached readers drop their mapping), unlink, unmap."""
        self.retire()
        if self.path:
            shmdir.remove(self.path)
        self.close_fd()
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass  # a view is still alive somewhere; the mapping dies with it


@dataclass
class Slot:
    segment: Segment
    index: int
    generation: int = 0
    token: bytes = b""
    length: int = 0
    reader: object = (0, 0)  # (pid, start) of the process that will read it, or its side.Conn
    deadline: float = 0.0
    # FREE_ON_ACK, KEEP_WHILE_ROOM or KEEP_UNTIL_END: how long an
    # acknowledged use stays readable for a resend (see there).
    held: int = FREE_ON_ACK
    peer: bytes = b""  # the reader's instance id: whose share this use counts against
    revoked: float = 0.0  # when this use was revoked (see the module docstring); 0: it was not

    @property
    def size(self) -> int:
        return self.segment.slot_size

    @property
    def offset(self) -> int:
        return self.segment.data_offset(self.index)

    def handle(self) -> "wire.ShmHandle | wire.MemfdHandle":
        return self.segment.handle(self)


@dataclass(frozen=True)
class Ticket:
    """One use of a slot as its sender knows it. Releasing a ticket whose slot
    was reclaimed and handed out again since (its generation moved on) is a
    no-op: that slot now belongs to another message."""

    slot: Slot
    generation: int


@dataclass
class PoolStats:
    capacity: int = 0
    bytes_mapped: int = 0
    bytes_in_use: int = 0
    segments: int = 0
    slots_in_use: int = 0


class Pool:
    """Size classes of slots, grown on demand up to `capacity` bytes.

    A slot is handed out again only after its reader acknowledged it, its
    reader is gone, its call ended, or its lease expired; every hand-out bumps
    its generation, so a late reader sees the change and fails with DATA_LOSS.
    `alloc` never blocks: when nothing can be freed it returns None and the
    caller sends the message inline.

    `peer_share`: the fraction of `capacity` the slots in use for one reader
    (its instance id, whatever the transport) may hold: one peer that reads
    nothing fills its share, and the other peers still find the rest.
    """

    def __init__(
        self,
        shm_dir: str,
        capacity: int,
        segment_size: int,
        lease_seconds: float,
        owner_inst: bytes,
        clock: Callable[[], float] = time.monotonic,
        peer_share: float = 1.0,
        kinds: Optional[Dict[str, Type[Segment]]] = None,
    ):
        self.shm_dir = shm_dir
        self.capacity = capacity
        self.peer_capacity = int(capacity * peer_share)
        # A pool smaller than one segment still serves messages that fit it.
        self.segment_size = max(MIN_CLASS * 2, min(segment_size, capacity))
        self.lease_seconds = lease_seconds
        self.owner_inst = owner_inst
        self._clock = clock
        self.base_name = shmdir.new_base_name()  # of the files of kind "shm"
        # kind -> its Segment class: each transport that keeps its messages
        # in this pool's slots registers its own (Slots.kinds).
        self.kinds: Dict[str, Type[Segment]] = {} if kinds is None else kinds
        self._counter = 0
        self._lock = threading.Lock()  # protects everything below
        self._segments: Dict[str, Segment] = {}
        self._free: Dict[Tuple[str, int], List[Slot]] = {}  # (kind, slot size) -> free slots, LIFO: warm first
        self._busy: Dict[Tuple[str, int], Slot] = {}
        self._by_peer: Dict[bytes, int] = {}  # reader's instance id -> bytes of its slots in use
        self._mapped = 0
        self._closed = False
        self._no_space_logged = False

    # sender side

    def alloc(self, length: int, reader, kind: str = "shm", held: int = FREE_ON_ACK,
              peer: bytes = b"") -> Tuple[Optional[Slot], str]:
        """A slot for `length` bytes in a segment of `kind` ("shm" or
        "memfd"), or (None, reason). `reader`: (pid, start) of the process
        that will read it, or its side.Conn (memfd). `held`: see Slot.held.
        `peer`: the reader's instance id, whose share the slot counts
        against (b"": none)."""
        cls = (kind, size_class(length))
        with self._lock:
            if self._closed:
                return None, "pool_closed"
            if cls[1] > self.capacity:
                return None, "pool_too_small"
            if peer and self._by_peer.get(peer, 0) + cls[1] > self.peer_capacity:
                self._reclaim_locked(short=True)  # what this peer read since may go first
                if self._by_peer.get(peer, 0) + cls[1] > self.peer_capacity:
                    return None, "peer_share_full"
            slot = self._take(cls)
            if slot is None:
                self._reclaim_locked(short=True)
                slot = self._take(cls)
            if slot is not None and not slot.segment.intact():
                self._drop_broken_locked(slot.segment)
                slot = None
            if slot is None:
                slot, reason = self._grow(cls)
                if slot is None:
                    return None, reason
            segment = slot.segment
            segment.last_used = self._clock()
            segment.generations[slot.index] += 1
            slot.generation = segment.generations[slot.index]
            slot.token = secrets.token_bytes(16)
            slot.length = length
            slot.reader = reader
            slot.held = held
            slot.peer = peer
            slot.revoked = 0.0
            slot.deadline = self._clock() + self.lease_seconds
            # Generation first, then the bytes: a reader that checks the generation
            # after its copy sees any reuse that overlapped it.
            base = SLOT_HEADER * slot.index + 64
            SLOT.pack_into(segment.mm, base, slot.generation, WRITING, length, slot.token, NO_CLAIM)
            self._busy[(segment.name, slot.index)] = slot
            if peer:
                self._by_peer[peer] = self._by_peer.get(peer, 0) + slot.size
            return slot, ""

    @staticmethod
    def publish(slot: Slot) -> None:
        """The payload is written: readers may take it."""
        base = SLOT_HEADER * slot.index + 64
        struct.pack_into("<I", slot.segment.mm, base + STATE_AT, READY)

    def release(self, ticket: Ticket, unread_only: bool = False) -> None:
        """The sender knows nobody will read this use of a slot any more (its
        call ended). `unread_only` (a server's cancelled call): leave a slot a
        reader has claimed or acknowledged to that reader's ack, or the lease;
        the reader may be parsing it right now."""
        with self._lock:
            slot = ticket.slot
            if slot.segment.generations[slot.index] != ticket.generation or slot.revoked:
                return
            if not slot.segment.intact():
                self._free_locked(slot)  # drops the broken segment
                return
            claimed = self._claimed_locked(slot)
            if claimed == HELD:
                slot.held = FREE_ON_ACK  # its reader keeps it: its ack frees it now
            elif claimed == ACKED:
                self._free_locked(slot)
            elif claimed is None or not unread_only:
                self._revoke_locked(slot)

    def peer_bytes(self, peer: bytes) -> int:
        """Bytes of the slots in use now for the reader `peer`."""
        with self._lock:
            return self._by_peer.get(peer, 0)

    def reclaim(self) -> int:
        with self._lock:
            return self._reclaim_locked()

    def stats(self) -> PoolStats:
        with self._lock:
            self._reclaim_locked()
            return PoolStats(
                capacity=self.capacity,
                bytes_mapped=self._mapped,
                bytes_in_use=sum(s.size for s in self._busy.values()),
                segments=len(self._segments),
                slots_in_use=len(self._busy),
            )

    def close(self) -> None:
        """Unlink and unmap everything this pool created. Safe to call twice."""
        with self._lock:
            self._closed = True
            segments, self._segments = list(self._segments.values()), {}
            self._free.clear()
            self._busy.clear()
            self._by_peer.clear()
            self._mapped = 0
        for segment in segments:
            segment.destroy()

    def abandon(self) -> None:
        """After fork, in the child: forget the parent's segments without touching them."""
        with self._lock:
            self._closed = True
            for segment in self._segments.values():
                segment.close_fd()  # the child's copy of the descriptor only
            self._segments, self._free, self._busy, self._by_peer, self._mapped = {}, {}, {}, {}, 0

    # internals, lock held

    def _take(self, cls: Tuple[str, int]) -> Optional[Slot]:
        free = self._free.get(cls)
        return free.pop() if free else None

    def _claimed_locked(self, slot: Slot) -> Optional[int]:
        """READING, HELD or ACKED if this use's reader claimed or acknowledged
        it (_layout's docstring: only with its token, or a 0.2 reader's zeros),
        else None."""
        base = SLOT_HEADER * slot.index + 64
        (state,) = struct.unpack_from("<I", slot.segment.mm, base + STATE_AT)
        if state != READING and state != ACKED and state != HELD:
            return None
        # Read after the state: the reader writes the claim first.
        (claim,) = struct.unpack_from("16s", slot.segment.mm, base + CLAIM_AT)
        return state if claim == slot.token or claim == NO_CLAIM else None

    def _unbusy_locked(self, key: Tuple[str, int]) -> Optional[Slot]:
        slot = self._busy.pop(key, None)
        if slot is not None and slot.peer:
            left = self._by_peer[slot.peer] - slot.size
            if left:
                self._by_peer[slot.peer] = left
            else:
                del self._by_peer[slot.peer]
        return slot

    def _free_locked(self, slot: Slot) -> None:
        if self._unbusy_locked((slot.segment.name, slot.index)) is None:
            return
        segment = slot.segment
        if not segment.intact():
            self._drop_broken_locked(segment)
            return
        # A new generation now, not only at reuse: a reader that comes after
        # the call ended or the lease expired gets DATA_LOSS, not "not ready".
        segment.generations[slot.index] += 1
        base = SLOT_HEADER * slot.index + 64
        struct.pack_into("<QI", segment.mm, base, segment.generations[slot.index], FREE)
        self._free.setdefault((segment.kind, segment.slot_size), []).append(slot)

    def _revoke_locked(self, slot: Slot) -> None:
        """A use its reader has not acknowledged ends (its call ended, its
        lease ran out): a new generation now, so a reader that comes later
        gets DATA_LOSS; the state is left for the quarantine's look
        (_reclaim_locked), after which the slot is free unless a reader
        marked it HELD meanwhile."""
        segment = slot.segment
        segment.generations[slot.index] += 1
        struct.pack_into("<Q", segment.mm, SLOT_HEADER * slot.index + 64, segment.generations[slot.index])
        slot.revoked = self._clock()

    def _gone_locked(self, slot: Slot, exited: bool) -> None:
        """The reader of a HELD slot is gone. A process that exited keeps
        nothing; a side connection that closed may leave its process alive
        with the view (or one we cannot see, in another pid namespace): that
        slot is never handed out again (its segment goes when its other
        slots are idle)."""
        if exited:
            self._free_locked(slot)
        elif self._unbusy_locked((slot.segment.name, slot.index)) is not None:
            slot.segment.orphans += 1

    def _drop_broken_locked(self, segment: Segment) -> None:
        """Somebody truncated one of our segments: never touch its mapping
        again. Its slots are gone (a reader of them gets DATA_LOSS)."""
        if self._segments.pop(segment.name, None) is None:
            return
        log.warning("segment %s was truncated by another process; dropping it", segment.name)
        self._mapped -= segment.size
        key = (segment.kind, segment.slot_size)
        self._free[key] = [s for s in self._free.get(key, []) if s.segment is not segment]
        for key in [k for k, s in self._busy.items() if s.segment is segment]:
            self._unbusy_locked(key)
        if segment.path:
            shmdir.remove(segment.path)
        segment.close_fd()
        try:
            segment.mm.close()  # unmapping a truncated mapping is safe; touching it is not
        except (BufferError, ValueError):
            pass

    def _reclaim_locked(self, short: bool = False) -> int:
        """Free busy slots that are done with: acknowledged (see Slot.held;
        `short`: an alloc needs room, so KEEP_WHILE_ROOM ones go too), their
        reader gone, or their lease over. Never a slot its reader has not
        read, nor a request a retry plain gRPC would make may read again,
        while its call lives and its lease runs, however full the pool: the
        next message goes elsewhere instead."""
        now = self._clock()
        gone = Liveness()
        freed = 0
        checked: Dict[str, bool] = {}
        keep = KEEP_WHILE_ROOM if short else FREE_ON_ACK  # the most held an acked slot may be to go
        for slot in list(self._busy.values()):
            segment = slot.segment
            ok = checked.get(segment.name)
            if ok is None:
                ok = checked[segment.name] = segment.intact()
                if not ok:
                    self._drop_broken_locked(segment)
            if not ok:
                continue
            claimed = self._claimed_locked(slot)
            if claimed == HELD:  # its reader keeps it: until it acknowledges, or is gone
                if gone(slot.reader):
                    self._gone_locked(slot, gone.dead(slot.reader))
                    freed += 1
            elif slot.revoked:
                # An exited reader has no store in flight: no need to wait.
                if now - slot.revoked >= QUARANTINE_SECONDS or gone.dead(slot.reader):
                    self._free_locked(slot)
                    freed += 1
            elif (slot.held <= keep and claimed == ACKED) or gone(slot.reader):
                self._free_locked(slot)
                freed += 1
            elif now >= slot.deadline:
                self._revoke_locked(slot)
        return freed

    def _grow(self, key: Tuple[str, int]) -> Tuple[Optional[Slot], str]:
        kind, cls = key
        count = max(1, self.segment_size // cls) if cls * 2 <= self.segment_size else 1
        header = round_up(64 + SLOT_HEADER * count, PAGE)
        size = header + cls * count
        if size > self.capacity:
            return None, "pool_too_small"
        if self._mapped + size > self.capacity and not self._evict_free(size):
            return None, "pool_full"
        self._counter += 1
        try:
            segment = self.kinds[kind].make(self, self._counter, cls, count)
        except shmdir.NoSpace as err:
            if not self._no_space_logged:  # once: every large message would say it again
                self._no_space_logged = True
                log.info("%s; such messages take the next transport, or go inline", err)
            return None, f"{kind}_no_space"
        self._segments[segment.name] = segment
        self._mapped += segment.size
        slots = [Slot(segment, i) for i in range(count)]
        self._free.setdefault(key, []).extend(reversed(slots[1:]))
        return slots[0], ""

    def trim_idle(self, idle_seconds: Optional[float] = None) -> int:
        """Give back segments none of whose slots was handed out for
        `idle_seconds` (IDLE_SECONDS) and none is in use: the pool shrinks to
        what recent traffic needs. Returns the bytes given back."""
        idle = IDLE_SECONDS if idle_seconds is None else idle_seconds
        with self._lock:
            if self._closed:
                return 0
            self._reclaim_locked()
            now = self._clock()
            busy_names = {name for name, _ in self._busy}
            given = 0
            for name, segment in list(self._segments.items()):
                if name in busy_names or now - segment.last_used < idle:
                    continue
                key = (segment.kind, segment.slot_size)
                self._free[key] = [s for s in self._free.get(key, []) if s.segment is not segment]
                del self._segments[name]
                self._mapped -= segment.size
                given += segment.size
                segment.destroy()
        return given

    def _evict_free(self, needed: int) -> bool:
        """Destroy whole segments whose slots are all free until `needed` fits."""
        busy_names = {name for name, _ in self._busy}
        for name, segment in list(self._segments.items()):
            if self._mapped + needed <= self.capacity:
                break
            if name in busy_names:
                continue
            key = (segment.kind, segment.slot_size)
            self._free[key] = [s for s in self._free.get(key, []) if s.segment is not segment]
            del self._segments[name]
            self._mapped -= segment.size
            segment.destroy()
        return self._mapped + needed <= self.capacity
