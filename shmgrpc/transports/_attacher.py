"""The receiver's side of the slots.

The receiver only attaches (Attacher): it maps a peer's segment, checks the slot
against the handle, reads, re-checks, and writes ACKED into the slot header. It
never unlinks what it did not create (CPython's resource tracker does, gh-82300;
we do not use it).

The layout of a slot header and the order of a claim's writes are in
_layout.py; what the sender makes of them (when a slot is freed, HELD,
revocation and the quarantine) in _pool.py.
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
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import shmdir, wire
from ..errors import DataLossError, HandleError, HandleTooLarge, ShmGrpcError, SlotReclaimed
from ._layout import ACKED, HELD, READING, READY, SEG, SEG_MAGIC, SLOT, SLOT_HEADER, Liveness, claim

log = logging.getLogger(__name__)


@dataclass
class Attached:
    name: str
    mm: mmap.mmap
    fd: int  # kept open: fstat before every access (shmdir.intact)
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
        self._cache: "OrderedDict[str, Attached]" = OrderedDict()
        # memfd segments by (side connection id, the sender's segment number);
        # they go when their sender retires them or its connection closes.
        self._memfd: Dict[Tuple[int, int], Attached] = {}
        # (segment, slot, token) -> views kept of that use (hold()): HELD
        # until the last is given back (a request gRPC resent may be kept twice)
        self._holds: Dict[Tuple[str, int, bytes], int] = {}
        # Kept views given back (unhold), to acknowledge under the lock: a
        # finalizer runs wherever the last reference went, maybe in a thread
        # that holds this lock, so it only queues and settles if it can.
        self._let_go: "deque[Tuple[Any, Attached]]" = deque()
        self._trimmed = time.monotonic()

    def open(self, h: wire.ShmHandle, owner_inst: bytes, reread: bool = False,
             hold: bool = False) -> Tuple[memoryview, Attached]:
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

    def _take_memfd(self, key: Tuple[int, int]) -> Optional[Attached]:
        """The memfd segment `key`, with a view reference, or None."""
        with self._lock:
            seg = self._memfd.get(key)
            if seg is not None:
                seg.views += 1
            return seg

    def add_memfd(self, key: Tuple[int, int], mm: mmap.mmap, size: int) -> bool:
        """Take a mapped memfd segment that arrived on side connection key[0]."""
        try:
            magic, header_size, count, slot_size, _pid, _retired, owner = SEG.unpack_from(mm, 0)
        except struct.error:
            magic = None
        if magic != SEG_MAGIC or header_size < 64 + SLOT_HEADER * count or header_size + count * slot_size != size:
            mm.close()
            return False
        seg = Attached(f"memfd:{key[0]}:{key[1]}", mm, -1, size, (0, 0), owner, header_size, count, slot_size,
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
    def _drop_locked(seg: Attached) -> bool:
        """Mark dropped; True if nobody reads it now (the caller unmaps)."""
        seg.dropped = True
        return seg.views == 0

    def _view(self, seg: Attached, h, owner_inst: bytes, reread: bool,
              hold: bool = False) -> Tuple[memoryview, Attached]:
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
                generation, state, length, token, claimed = SLOT.unpack_from(seg.mm, base)
                # READING, HELD or ACKED under another use's token: a late write
                # of an earlier reader of this slot (_layout's docstring), not a
                # claim on this message.
                ours = secrets.compare_digest(claimed, h.token)
                unread = state == READY or (state in (READING, ACKED, HELD) and not ours)
                current = generation == h.generation and length == h.length and secrets.compare_digest(token, h.token)
                if hold:
                    key = (seg.name, h.slot, h.token)
                    kept = self._holds.get(key, 0)
                    if current and (unread or (reread and state in (READY, ACKED, READING, HELD))):
                        if not kept:
                            claim(seg.mm, base, h.token, HELD)
                        self._holds[key] = kept + 1
                        unread = True
                elif unread and not reread and current:
                    claim(seg.mm, base, h.token, READING)
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
                # it could see it, the generation says so now (_pool's
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

    def unhold(self, h, seg: Attached) -> None:
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

    def _settle_locked(self) -> List[Attached]:
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

    def _unhold_locked(self, seg: Attached, h) -> None:
        key = (seg.name, h.slot, h.token)
        kept = self._holds.pop(key, 0) - 1
        if kept > 0:
            self._holds[key] = kept
            return
        if seg.kind == "memfd" or shmdir.intact(seg.fd, seg.size):
            claim(seg.mm, 64 + SLOT_HEADER * h.slot, h.token, ACKED)

    def finish(self, h: wire.ShmHandle, seg: Attached, consumed: bool = True) -> None:
        """Check nothing changed while we read, then acknowledge the slot.

        Raises DataLossError if the slot was reused under us."""
        base = 64 + SLOT_HEADER * h.slot
        try:
            self._check_intact(seg)
            generation, _, _, token, _ = SLOT.unpack_from(seg.mm, base)
            if generation != h.generation or token != h.token:
                raise SlotReclaimed(
                    f"slot {h.slot} of {seg.name} changed while it was read "
                    f"(generation {h.generation} -> {generation}); the bytes are discarded"
                )
            if consumed:
                claim(seg.mm, base, h.token, ACKED)
        finally:
            self._unref(seg)
        self.maybe_trim()

    def maybe_trim(self) -> None:
        """trim(), if the last one is TRIM_SECONDS old (cheap to call per call)."""
        self.settle()
        if time.monotonic() - self._trimmed >= self.TRIM_SECONDS:
            self.trim()

    def _check_intact(self, seg: Attached) -> None:
        if seg.kind == "memfd":
            return  # sealed against shrinking: side.check_sealed before it was mapped
        if not shmdir.intact(seg.fd, seg.size):
            with self._lock:
                if self._cache.get(seg.name) is seg:
                    del self._cache[seg.name]
                    seg.dropped = True
            raise DataLossError(f"segment {seg.name} was truncated by another process; its bytes are gone")

    def _unref(self, seg: Attached) -> None:
        with self._lock:
            seg.views -= 1
            last = seg.dropped and seg.views == 0
        if last:
            _unmap(seg)

    def _attach(self, name: str) -> Attached:
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
        magic, header_size, count, slot_size, _pid, _retired, owner = SEG.unpack_from(mm, 0)
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
        seg = Attached(name, mm, fd, st.st_size, (int(match.group(1)), int(match.group(2))), owner,
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

    def _trim_locked(self, over_only: bool) -> List[Attached]:
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


def _unmap(seg: Attached) -> None:
    try:
        seg.mm.close()
    except (BufferError, ValueError):
        pass
    fd, seg.fd = seg.fd, -1
    if fd >= 0:
        os.close(fd)
