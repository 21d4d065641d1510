"""The POSIX shared-memory pool: segments, size classes, slots, generations.

The sender owns its pool. A segment is a file under the shm directory, created
with O_EXCL and mode 0600, named shmgrpc-<pid>-<start ticks>-<random>-<n>, and
space is reserved with posix_fallocate when it is made: a full tmpfs (Docker's
64 MiB /dev/shm) then fails at creation with ENOSPC and the message goes inline,
instead of killing the process with SIGBUS on first touch.

The receiver only attaches (Attacher): it maps a peer's segment, checks the slot
against the handle, reads, re-checks, and writes ACKED into the slot header. It
never unlinks what it did not create (CPython's resource tracker does, gh-82300;
we do not use it).

Segment layout, little-endian:

    offset size field
    0      8    magic        b"SHMGSEG1"
    8      4    header_size  bytes before the first slot (page aligned)
    12     4    slot_count
    16     8    slot_size
    24     4    owner_pid
    28     4    retired      1 once the owner is about to unlink it
    32     16   owner_inst   the owner's instance id (binds slots to a session)
    48     16   reserved
    64     64*n slot headers, then the slots at header_size + i * slot_size

Slot header:

    0      8    generation   bumped each time the slot is handed out or freed
    8      4    state        0 free, 1 writing, 2 ready, 3 acked, 4 being read,
                             5 held (its reader keeps a view: a memoryview of
                             buffer_deserializer)
    12     4    reserved
    16     8    length       payload bytes in this use
    24     16   token        random per use; the handle must carry the same
    40     16   claim        the token of the use its reader claimed (READING,
                             HELD) or acknowledged (ACKED)
    56     8    reserved

The reader writes `claim` before `state`, and the sender believes a READING
or ACKED state only with the current use's token in `claim` (or zeros: a 0.2
reader, which wrote the state only). Between a reader's last check and its
write the sender may have freed the slot (the call ended) and handed it to
another message; that late write leaves the old token, so the newer message
is neither freed as read nor refused as "not ready" by its own reader.

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
process exited), and only if no reader marked it HELD meanwhile. A reader checks the generation again after writing HELD;
one whose check raced with the revocation finds its HELD seen by then (the
sender looks a whole quarantine later), so the bytes it keeps never change
under it. A slot HELD by a memfd reader whose side connection closed is never
handed out again, unless that reader's process is seen to have exited (not
from another pid namespace): its segment goes when it is otherwise idle.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

from .. import shmdir, wire
from .._buffer import kept_view
from ..errors import DataLossError, HandleError, HandleTooLarge, ShmGrpcError, SlotReclaimed
from .base import FREE_ON_ACK, KEEP_UNTIL_END, KEEP_WHILE_ROOM, Part, Transport  # noqa: F401  (the held values, here too)

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MIN_CLASS = 4096  # one page: smaller slots would share pages between messages
# A segment none of whose slots was handed out for this long is given back
# (unlinked and unmapped). Long enough that steady traffic, even bursty, keeps
# its warm slots; short enough that a burst's peak does not stay for good.
IDLE_SECONDS = 30.0
CLASSES_PER_DOUBLING = 4  # slot sizes 1, 1.25, 1.5, 1.75 x 2**k: at most 25% slack

_SEG = struct.Struct("<8sIIQII16s16x")
_SLOT = struct.Struct("<QI4xQ16s16s8x")
SEG_MAGIC = b"SHMGSEG1"
SLOT_HEADER = _SLOT.size  # 64: one cache line per slot header
_STATE_AT = 8  # offset of `state` inside a slot header
_CLAIM_AT = 40  # offset of `claim`
_NO_CLAIM = bytes(16)  # `claim` as alloc leaves it
FREE, WRITING, READY, ACKED, READING, HELD = 0, 1, 2, 3, 4, 5  # READING: a single-use reader claimed it
# How long a revoked use waits before its slot is handed out again: far
# longer than any reader's store can take to be seen (see the docstring).
QUARANTINE_SECONDS = 1.0



def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def size_class(length: int) -> int:
    """The slot size a payload of `length` bytes goes into."""
    if length <= MIN_CLASS:
        return MIN_CLASS
    step = max(PAGE, 1 << (length.bit_length() - 1 - 2))  # a quarter of the power of two below
    return round_up(length, step)


class Liveness:
    """`gone(reader)` for one reclaim scan: each reader's /proc entry is read
    once, however many of its slots are waiting (a fast stream has dozens).
    `dead(reader)`: its process is known to have exited, so it can neither
    read nor keep anything (a closed side connection alone does not say so)."""

    def __init__(self):
        self._known: Dict[Tuple[int, int], bool] = {}  # (pid, start) -> gone

    def __call__(self, reader) -> bool:
        if not isinstance(reader, tuple):  # a side.Conn: gone when its connection is
            return not reader.alive
        return self._exited(reader)

    def dead(self, reader) -> bool:
        if isinstance(reader, tuple):
            return self._exited(reader)
        return not reader.alive and reader.process is not None and self._exited(reader.process)

    def _exited(self, process: Tuple[int, int]) -> bool:
        if process not in self._known:
            self._known[process] = not shmdir.alive(*process)
        return self._known[process]


# --- the sender's pool --------------------------------------------------------


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
        _SEG.pack_into(mm, 0, SEG_MAGIC, self.header_size, self.count, self.slot_size, os.getpid(), 0, owner_inst)
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
            _SLOT.pack_into(segment.mm, base, slot.generation, WRITING, length, slot.token, _NO_CLAIM)
            self._busy[(segment.name, slot.index)] = slot
            if peer:
                self._by_peer[peer] = self._by_peer.get(peer, 0) + slot.size
            return slot, ""

    @staticmethod
    def publish(slot: Slot) -> None:
        """The payload is written: readers may take it."""
        base = SLOT_HEADER * slot.index + 64
        struct.pack_into("<I", slot.segment.mm, base + _STATE_AT, READY)

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
        it (module docstring: only with its token, or a 0.2 reader's zeros),
        else None."""
        base = SLOT_HEADER * slot.index + 64
        (state,) = struct.unpack_from("<I", slot.segment.mm, base + _STATE_AT)
        if state != READING and state != ACKED and state != HELD:
            return None
        # Read after the state: the reader writes the claim first.
        (claim,) = struct.unpack_from("16s", slot.segment.mm, base + _CLAIM_AT)
        return state if claim == slot.token or claim == _NO_CLAIM else None

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


# --- the receiver's side ------------------------------------------------------


def _claim(mm: mmap.mmap, base: int, token: bytes, state: int) -> None:
    """Mark the slot header at `base` READING or ACKED for the use `token`:
    the token first, then the state (module docstring)."""
    mm[base + _CLAIM_AT : base + _CLAIM_AT + 16] = token
    struct.pack_into("<I", mm, base + _STATE_AT, state)


@dataclass
class _Attached:
    name: str
    mm: mmap.mmap
    fd: int  # kept open: fstat before every access (see intact())
    size: int
    owner: Tuple[int, int]  # owner pid and start time, from the name
    owner_inst: bytes
    header_size: int
    count: int
    slot_size: int
    views: int = 0  # readers inside open()..finish(); never unmapped while > 0
    dropped: bool = False  # out of the cache; unmapped by the last reader
    kind: str = "shm"  # "memfd": came over a side connection, sealed, no name


class Attacher:
    """Maps peers' segments (cached), checks handles against slot headers,
    and acknowledges slots once their bytes are consumed.

    A mapping is dropped (unmapped, its descriptor closed, so the tmpfs
    space can return) when its owner retires the segment or exits, when the
    cache is over MAX_CACHED, or when the file was truncated; never while a
    reader is inside it."""

    MAX_CACHED = 64  # mappings kept for reuse; older ones are unmapped
    TRIM_SECONDS = 1.0  # at most this long between checks for retired or dead owners

    def __init__(self, shm_dir: str, max_message: int):
        self.shm_dir = shm_dir
        self.max_message = max_message
        self._lock = threading.Lock()  # protects _cache, _memfd, every views/dropped, _trimmed
        self._cache: "OrderedDict[str, _Attached]" = OrderedDict()
        # memfd segments by (side connection id, the sender's segment number);
        # they go when their sender retires them or its connection closes.
        self._memfd: Dict[Tuple[int, int], _Attached] = {}
        # (segment, slot, token) -> views kept of that use (hold()): HELD
        # until the last is given back (a request gRPC resent may be kept twice)
        self._holds: Dict[Tuple[str, int, bytes], int] = {}
        # Kept views given back (unhold), to acknowledge under the lock: a
        # finalizer runs wherever the last reference went, maybe in a thread
        # that holds this lock, so it only queues and settles if it can.
        self._let_go: "deque[Tuple[Any, _Attached]]" = deque()
        self._trimmed = time.monotonic()

    def open(self, h: wire.ShmHandle, owner_inst: bytes, reread: bool = False,
             hold: bool = False) -> Tuple[memoryview, _Attached]:
        """A read-only view of the payload `h` names, after checking it.

        `reread`: a slot we acknowledged already may be read again (a request
        gRPC resent; its sender keeps it until the call ends). The caller must
        call finish() when done with the view; with `hold` (the handle says
        its sender honours HELD), unhold() instead, whenever it is done: the
        slot is HELD, its sender keeps it until then."""
        if h.length > self.max_message:
            raise HandleTooLarge(
                f"handle offers {h.length} bytes; this receiver accepts at most "
                f"{self.max_message} (SHMGRPC_MAX_MESSAGE)"
            )
        self.settle()
        return self._view(self._attach(h.name), h, owner_inst, reread, hold)

    def open_memfd(self, key: Tuple[int, int], h, owner_inst: bytes, reread: bool = False,
                   arrive: Callable[[], Optional[str]] = lambda: None, hold: bool = False):
        """open() for a memfd handle: the segment came over the side
        connection `key[0]` (its descriptor was sent before the handle).
        Never waits: if it is not here yet, `arrive()` reads what that
        connection has queued and says why it is not, if it still is not
        (side.Side.arrive); then DATA_LOSS at once, in those words."""
        if h.length > self.max_message:
            raise HandleTooLarge(
                f"handle offers {h.length} bytes; this receiver accepts at most "
                f"{self.max_message} (SHMGRPC_MAX_MESSAGE)"
            )
        self.settle()
        seg = self._take_memfd(key)
        if seg is None:
            why = arrive()
            seg = self._take_memfd(key)
            if seg is None:
                raise DataLossError(f"memfd segment {key[1]} {why or 'is not here'}")
        return self._view(seg, h, owner_inst, reread, hold)

    def _take_memfd(self, key: Tuple[int, int]) -> Optional[_Attached]:
        """The memfd segment `key`, with a view reference, or None."""
        with self._lock:
            seg = self._memfd.get(key)
            if seg is not None:
                seg.views += 1
            return seg

    def add_memfd(self, key: Tuple[int, int], mm: mmap.mmap, size: int) -> bool:
        """Take a mapped memfd segment that arrived on side connection key[0]."""
        try:
            magic, header_size, count, slot_size, _pid, _retired, owner = _SEG.unpack_from(mm, 0)
        except struct.error:
            magic = None
        if magic != SEG_MAGIC or header_size < 64 + SLOT_HEADER * count or header_size + count * slot_size != size:
            mm.close()
            return False
        seg = _Attached(f"memfd:{key[0]}:{key[1]}", mm, -1, size, (0, 0), owner, header_size, count, slot_size,
                        kind="memfd")
        with self._lock:
            old = self._memfd.pop(key, None)
            self._memfd[key] = seg
            unmap_old = old is not None and self._drop_locked(old)
        if old is not None and unmap_old:
            _unmap(old)
        return True

    def drop_memfd(self, conn_id: int, number: Optional[int] = None) -> None:
        """Forget one memfd segment of a connection (its sender retired it),
        or all of them (the connection closed: the peer is gone)."""
        with self._lock:
            keys = [k for k in self._memfd if k[0] == conn_id and (number is None or k[1] == number)]
            gone = [self._memfd.pop(k) for k in keys]
            unmap = [seg for seg in gone if self._drop_locked(seg)]
        for seg in unmap:
            _unmap(seg)

    @staticmethod
    def _drop_locked(seg: _Attached) -> bool:
        """Mark dropped; True if nobody reads it now (the caller unmaps)."""
        seg.dropped = True
        return seg.views == 0

    def _view(self, seg: _Attached, h, owner_inst: bytes, reread: bool,
              hold: bool = False) -> Tuple[memoryview, _Attached]:
        """The checks of open(), on a segment we hold a view reference of."""
        try:
            if seg.owner_inst != owner_inst:
                raise HandleError(
                    f"segment {seg.name} belongs to another shmgrpc instance, not to this call's peer"
                )
            if h.slot >= seg.count:
                raise HandleError(f"slot {h.slot} is outside segment {seg.name} ({seg.count} slots)")
            if h.offset != seg.header_size + h.slot * seg.slot_size or h.length > seg.slot_size:
                raise HandleError(
                    f"handle range offset {h.offset} length {h.length} is outside slot {h.slot} "
                    f"of {seg.name}"
                )
            self._check_intact(seg)
            base = 64 + SLOT_HEADER * h.slot
            with self._lock:  # check and claim as one step: a single-use handle is read once
                generation, state, length, token, claim = _SLOT.unpack_from(seg.mm, base)
                # READING or ACKED under another use's token: a late write
                # of an earlier reader of this slot (module docstring), not a
                # claim on this message.
                ours = secrets.compare_digest(claim, h.token)
                unread = state == READY or (state in (READING, ACKED, HELD) and not ours)
                current = generation == h.generation and length == h.length and secrets.compare_digest(token, h.token)
                if hold:
                    key = (seg.name, h.slot, h.token)
                    kept = self._holds.get(key, 0)
                    if current and (unread or (reread and state in (READY, ACKED, READING, HELD))):
                        if not kept:
                            _claim(seg.mm, base, h.token, HELD)
                        self._holds[key] = kept + 1
                        unread = True
                elif unread and not reread and current:
                    _claim(seg.mm, base, h.token, READING)
            if generation != h.generation:
                raise SlotReclaimed(
                    f"slot {h.slot} of {seg.name} was reused (generation {generation}, handle has "
                    f"{h.generation}): the lease expired or the call ended before it was read"
                )
            if not secrets.compare_digest(token, h.token):
                raise HandleError(f"slot {h.slot} of {seg.name} was not offered for this message (token mismatch)")
            readable = state in (READY, ACKED, READING, HELD) if reread else unread
            if not readable or length != h.length:
                raise HandleError(
                    f"slot {h.slot} of {seg.name} is not ready for reading (state {state}); "
                    "handles are single-use"
                )
            if hold:
                # Our HELD is written; if the sender revoked this use before
                # it could see it, the generation says so now (module
                # docstring). Else the bytes are ours until unhold().
                (now,) = struct.unpack_from("<Q", seg.mm, base)
                if now != h.generation:
                    with self._lock:
                        self._unhold_locked(seg, h)
                    raise SlotReclaimed(
                        f"slot {h.slot} of {seg.name} was reused (generation {now}, handle has "
                        f"{h.generation}): the lease expired or the call ended before it was read"
                    )
            return memoryview(seg.mm)[h.offset : h.offset + h.length].toreadonly(), seg
        except BaseException:
            self._unref(seg)
            raise

    def unhold(self, h, seg: _Attached) -> None:
        """A view kept of `h` (open(hold=True)) is gone: acknowledge the slot
        once no other is kept, and let go of the mapping. A finalizer calls
        it: it never blocks nor raises; when the lock is busy (maybe held by
        this very thread, which the collector interrupted) the next open or
        trim settles it."""
        self._let_go.append((h, seg))
        if self._lock.acquire(blocking=False):
            try:
                unmap = self._settle_locked()
            finally:
                self._lock.release()
            for one in unmap:
                _unmap(one)

    def settle(self) -> None:
        """Acknowledge the kept views given back since (unhold)."""
        if self._let_go:
            with self._lock:
                unmap = self._settle_locked()
            for one in unmap:
                _unmap(one)

    def _settle_locked(self) -> List[_Attached]:
        unmap = []
        while self._let_go:
            h, seg = self._let_go.popleft()
            try:
                self._unhold_locked(seg, h)
            except Exception:  # the mapping was truncated under us: nothing to acknowledge
                log.debug("acknowledging a kept slot failed", exc_info=True)
            seg.views -= 1
            if seg.dropped and seg.views == 0:
                unmap.append(seg)
        return unmap

    def _unhold_locked(self, seg: _Attached, h) -> None:
        key = (seg.name, h.slot, h.token)
        kept = self._holds.pop(key, 0) - 1
        if kept > 0:
            self._holds[key] = kept
            return
        if seg.kind == "memfd" or shmdir.intact(seg.fd, seg.size):
            _claim(seg.mm, 64 + SLOT_HEADER * h.slot, h.token, ACKED)

    def finish(self, h: wire.ShmHandle, seg: _Attached, consumed: bool = True) -> None:
        """Check nothing changed while we read, then acknowledge the slot.

        Raises DataLossError if the slot was reused under us."""
        base = 64 + SLOT_HEADER * h.slot
        try:
            self._check_intact(seg)
            generation, _, _, token, _ = _SLOT.unpack_from(seg.mm, base)
            if generation != h.generation or token != h.token:
                raise SlotReclaimed(
                    f"slot {h.slot} of {seg.name} changed while it was read "
                    f"(generation {h.generation} -> {generation}); the bytes are discarded"
                )
            if consumed:
                _claim(seg.mm, base, h.token, ACKED)
        finally:
            self._unref(seg)
        self.maybe_trim()

    def maybe_trim(self) -> None:
        """trim(), if the last one is TRIM_SECONDS old (cheap to call per call)."""
        self.settle()
        if time.monotonic() - self._trimmed >= self.TRIM_SECONDS:
            self.trim()

    def _check_intact(self, seg: _Attached) -> None:
        if seg.kind == "memfd":
            return  # sealed against shrinking: side.check_sealed before it was mapped
        if not shmdir.intact(seg.fd, seg.size):
            with self._lock:
                if self._cache.get(seg.name) is seg:
                    del self._cache[seg.name]
                    seg.dropped = True
            raise DataLossError(f"segment {seg.name} was truncated by another process; its bytes are gone")

    def _unref(self, seg: _Attached) -> None:
        with self._lock:
            seg.views -= 1
            last = seg.dropped and seg.views == 0
        if last:
            _unmap(seg)

    def _attach(self, name: str) -> _Attached:
        """The cached mapping of `name` (made if needed), with a view
        reference taken under the lock: no trim can unmap it before the
        caller's _unref."""
        with self._lock:
            seg = self._cache.get(name)
            if seg is not None:
                self._cache.move_to_end(name)
                seg.views += 1
                return seg
        match = wire.NAME_RE.match(name)
        fd, st = shmdir.open_peer_file(self.shm_dir, name, writable=True)
        assert match is not None  # open_peer_file refuses any name NAME_RE does not match
        try:
            if st.st_size < 64 + SLOT_HEADER:
                # Our names are made with their full size reserved: a shorter
                # one was truncated (by its owner's uid), its bytes are gone.
                raise DataLossError(f"segment {name} was truncated ({st.st_size} bytes); its bytes are gone")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        magic, header_size, count, slot_size, _pid, _retired, owner = _SEG.unpack_from(mm, 0)
        problem: Optional[ShmGrpcError] = None
        if magic != SEG_MAGIC or header_size < 64 + SLOT_HEADER * count:
            problem = HandleError(f"segment {name} has a corrupt or foreign header")
        elif header_size + count * slot_size > st.st_size:
            problem = DataLossError(f"segment {name} was truncated ({st.st_size} bytes); its bytes are gone")
        elif header_size + count * slot_size != st.st_size:
            problem = HandleError(f"segment {name} has a corrupt or foreign header")
        if problem is not None:
            mm.close()
            os.close(fd)
            raise problem
        seg = _Attached(name, mm, fd, st.st_size, (int(match.group(1)), int(match.group(2))), owner,
                        header_size, count, slot_size, views=1)
        with self._lock:
            existing = self._cache.get(name)
            if existing is not None:  # another thread attached it meanwhile
                existing.views += 1
                seg.views, seg.dropped = 0, True
            else:
                self._cache[name] = seg
                drop = self._trim_locked(over_only=True)
        if existing is not None:
            _unmap(seg)
            return existing
        for old in drop:
            _unmap(old)
        return seg

    def trim(self) -> None:
        """Drop mappings whose owner retired them or exited (a small tmpfs
        gets its space back once the owner has let go)."""
        with self._lock:
            drop = self._trim_locked(over_only=False)
        for seg in drop:
            _unmap(seg)

    def _trim_locked(self, over_only: bool) -> List[_Attached]:
        """Take out of the cache what should go; returns those nobody reads
        now (the caller unmaps them outside the lock; the others are unmapped
        by their last reader)."""
        out = []
        if not over_only:
            self._trimmed = time.monotonic()
        gone = Liveness()
        for name, seg in list(self._cache.items()):
            over = len(self._cache) > self.MAX_CACHED
            if not over and over_only:
                break
            if not over:
                if not shmdir.intact(seg.fd, seg.size):
                    stale = True
                else:
                    stale = struct.unpack_from("<I", seg.mm, 28)[0] != 0 or gone(seg.owner)
                if not stale:
                    continue
            del self._cache[name]
            seg.dropped = True
            if seg.views == 0:
                out.append(seg)
        return out

    def close(self) -> None:
        with self._lock:
            cached, self._cache = list(self._cache.values()), OrderedDict()
            cached += list(self._memfd.values())
            self._memfd = {}
            for seg in cached:
                seg.dropped = True
        for seg in cached:
            if seg.views == 0:
                _unmap(seg)


def _unmap(seg: _Attached) -> None:
    try:
        seg.mm.close()
    except (BufferError, ValueError):
        pass
    fd, seg.fd = seg.fd, -1
    if fd >= 0:
        os.close(fd)


class Slots(Part):
    """The slots of the transports that keep messages in a shared mapping
    (shm and memfd), per node: the pool this process sends from, made on
    first use, and the attacher of the peers' segments it reads.

    Each such transport registers its Segment class in `kinds`."""

    def __init__(self, node):
        self._node = node
        self._lock = threading.Lock()  # protects the pool's creation
        self.kinds: Dict[str, Type[Segment]] = {}
        self.pool: Optional[Pool] = None  # see get_pool()
        # The receive limit is the engine's (it knows its gRPC options); the
        # attacher only refuses what no engine here could accept.
        self.attacher = Attacher(node.config.shm_dir, node.config.max_message)

    def get_pool(self) -> Pool:
        if self.pool is None:
            with self._lock:
                if self.pool is None:
                    c = self._node.config
                    pool = Pool(c.shm_dir, c.pool_size, c.segment_size, c.lease_seconds,
                                self._node.identity.inst, peer_share=c.peer_share, kinds=self.kinds)
                    self.pool = pool
                    self._node.start_janitor()
        return self.pool

    def tidy(self) -> None:
        self.attacher.maybe_trim()

    def housekeep(self) -> None:
        if self.pool is not None:
            self.pool.trim_idle()
        self.attacher.maybe_trim()

    def stats(self) -> Dict[str, int]:
        if self.pool is None:
            return {}
        s = self.pool.stats()
        return {"capacity": s.capacity, "bytes_mapped": s.bytes_mapped, "bytes_in_use": s.bytes_in_use,
                "segments": s.segments}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.attacher.close()

    def abandon(self) -> None:
        if self.pool is not None:
            self.pool.abandon()


class SlotTransport(Transport):
    """A transport whose messages are slots of the node's pool (shm, memfd):
    what it adds is how a segment is made and named (`segment_class`) and
    how a handle finds its mapping (_attach); reading, keeping and freeing
    a slot are the same for both."""

    segment_class: ClassVar[Type[Segment]] = Segment

    def __init__(self, node):
        super().__init__(node)
        self.slots: Slots = node.part("slots", Slots)
        self.slots.kinds[self.name] = self.segment_class

    def _attach(self, h, peer, reread: bool, hold: bool) -> Tuple[memoryview, _Attached]:
        """Attacher.open (or open_memfd) of `h`: a view and its mapping."""
        raise NotImplementedError

    def open(self, h, peer, reread: bool) -> Tuple[memoryview, Callable[[], None]]:
        view, seg = self._attach(h, peer, reread, False)
        attacher = self.slots.attacher
        return view, lambda: attacher.finish(h, seg)

    def keep(self, h, peer, reread: bool) -> memoryview:
        """The slot itself, HELD: acknowledged, and its mapping let go, when
        the view and everything made from it are gone (_buffer.kept_view).
        A copy from a sender that may reuse it (no FLAG_HOLDS)."""
        if not h.flags & wire.FLAG_HOLDS:
            return super().keep(h, peer, reread)
        view, seg = self._attach(h, peer, reread, True)
        view.release()
        attacher = self.slots.attacher
        try:
            return kept_view(seg.mm, h.offset, h.length, lambda: attacher.unhold(h, seg))
        except BaseException:
            attacher.unhold(h, seg)
            raise

    def release(self, ticket, unread_only: bool = False) -> None:
        if self.slots.pool is not None:
            self.slots.pool.release(ticket, unread_only)
