"""The cma transport: the sender pins its serialized bytes; the receiver pulls.

The sender keeps the `bytes` object that serialization produced (no copy) and
describes it in an *entry* of its pin table, a plain ctypes array in its own
memory. The handle carries pid, entry address and the payload's iovec. The
receiver reads the entry first (one small process_vm_readv) and uses no byte
of the payload unless the entry shows, with values the sender cannot choose
freely, that this region was offered to *it* for *this* message:

- `key`: the key this receiver issued to this peer at handshake (an HMAC of a
  secret that is in no file), so another process's memory cannot pass;
- `token`, `generation`: match the handle, so a stale or replayed handle fails;
- `addr`, `length`: the handle's iovec must be exactly the offered region.

After the copy the receiver reads the generation again (a sender that revoked
the pin bumps it *before* letting go of the bytes), then acknowledges with one
process_vm_writev: the handle's token into `acked`, then ACKED into `state`.
The sender frees acknowledged entries lazily, and counts an entry as
acknowledged only when `acked` holds the token of its current use: between
the reader's last check and its write the sender may have freed the entry
(the call ended) and pinned another message there, and such a late ack must
not mark the newer message read (its sender would free it before its reader
came). A late ack leaves its own token, so the newer message's reader sees
an ACKED state that is not its own and reads on. An `acked` of zeros with
state ACKED is a 0.2 reader's ack (it wrote the state only): honoured.

A sender frees an entry (bumping the generation) only when its reader acked
it, its reader exited, its call ended, or its lease ran out; never because
the table or the pin budget is full (the message takes the next rung then).

Entry layout (96 bytes), little-endian:

    offset size field
    0      8    magic       b"SHMGCMA1"
    8      8    generation
    16     4    state       0 free, 2 ready, 3 acked (same codes as shm slots)
    20     4    reserved
    24     8    length
    32     16   token
    48     16   key         issued by the receiver for this sender
    64     8    addr        first byte of the offered payload
    72     16   acked       the token of the use its reader acknowledged
    88     8    reserved
"""

from __future__ import annotations

import ctypes
import hmac
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .. import wire
from . import _layout, _vm
from ..errors import CmaBadAddress, HandleError, HandleTooLarge, SlotReclaimed, StaleSessionError
from .base import FREE_ON_ACK, KEEP_WHILE_ROOM

ENTRY = struct.Struct("<8sQI4xQ16s16sQ16s8x")
ENTRY_MAGIC = b"SHMGCMA1"
_GEN_AT = 8
_STATE_AT = 16
_ACKED_AT = 72
_NO_ACK = bytes(16)  # `acked` as pin() leaves it
_ACKED_STATE = struct.pack("<I", _layout.ACKED)
DEFAULT_ENTRIES = 4096  # concurrent unacknowledged cma messages; past it, the next rung


@dataclass(frozen=True)
class Ticket:
    """One pin as its sender knows it: entry and generation. Releasing a
    ticket whose entry was reused since (its generation moved on) is a no-op."""

    entry: int
    generation: int


@dataclass
class _Pin:
    payload: bytes  # holding the reference is what keeps the memory valid
    reader: Tuple[int, int]
    deadline: float
    token: bytes  # this use's: an ack counts only if it carries it
    peer: bytes  # the reader's instance id: whose share the bytes count against
    held: int = FREE_ON_ACK  # see _pool.Slot.held


class Pins:
    """Sender side: the pin table and the pinned payloads.

    `peer_share`: the fraction of `max_pinned` the unacknowledged pins of one
    reader (its instance id) may hold; past it, that reader's messages take
    the next rung, or go inline, while other readers' still pin."""

    def __init__(
        self,
        max_pinned: int,
        lease_seconds: float,
        entries: int = DEFAULT_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        peer_share: float = 1.0,
    ):
        self.max_pinned = max_pinned
        self.peer_max = int(max_pinned * peer_share)
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._table = ctypes.create_string_buffer(ENTRY.size * entries)
        self._base = ctypes.addressof(self._table)
        self._lock = threading.Lock()  # protects everything below
        self._free: List[int] = list(range(entries - 1, -1, -1))
        self._generations = [0] * entries
        self._busy: Dict[int, _Pin] = {}
        self._pinned = 0
        self._by_peer: Dict[bytes, int] = {}  # reader's instance id -> bytes pinned for it

    def pin(
        self, payload: bytes, key: bytes, receiver: bytes, reader: Tuple[int, int], pid: int,
        held: int = FREE_ON_ACK
    ) -> Tuple[Optional[bytes], Optional[Ticket], str]:
        """Pin `payload` for the reader `receiver` (its instance id); returns
        (encoded handle, its ticket, "") or (None, None, reason). `held`: see
        _pool.Slot.held."""
        length = len(payload)
        with self._lock:
            if self._busy:
                self._reclaim_locked()  # what readers are done with goes first
            if (self._pinned + length > self.max_pinned or not self._free
                    or self._by_peer.get(receiver, 0) + length > self.peer_max):
                self._reclaim_locked(short=True)
            if self._pinned + length > self.max_pinned:
                return None, None, "cma_pinned_full"
            if self._by_peer.get(receiver, 0) + length > self.peer_max:
                return None, None, "cma_peer_share_full"
            if not self._free:
                return None, None, "cma_entries_full"
            index = self._free.pop()
            self._generations[index] += 1
            generation = self._generations[index]
            token = secrets.token_bytes(16)
            addr = _vm.address_of(payload)
            ENTRY.pack_into(
                self._table,
                index * ENTRY.size,
                ENTRY_MAGIC,
                generation,
                _layout.READY,
                length,
                token,
                key,
                addr,
                _NO_ACK,
            )
            self._busy[index] = _Pin(payload, reader, self._clock() + self.lease_seconds, token, receiver, held)
            self._pinned += length
            self._by_peer[receiver] = self._by_peer.get(receiver, 0) + length
        handle = wire.CmaHandle(
            length=length,
            token=token,
            generation=generation,
            pid=pid,
            entry=index,
            entry_addr=self._base + index * ENTRY.size,
            receiver=receiver,
            iovecs=((addr, length),),
        )
        return wire.encode_cma(handle), Ticket(index, generation), ""

    def reclaim(self) -> int:
        with self._lock:
            return self._reclaim_locked()

    def release(self, ticket: Ticket) -> None:
        """The call that carried this pin is over: nobody will read it any more."""
        with self._lock:
            if ticket.entry in self._busy and self._generations[ticket.entry] == ticket.generation:
                self._unpin_locked(ticket.entry)

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            self._reclaim_locked()
            return self._pinned

    def peer_bytes(self, receiver: bytes) -> int:
        """Bytes pinned now for the reader `receiver`."""
        with self._lock:
            return self._by_peer.get(receiver, 0)

    def close(self) -> None:
        with self._lock:
            for index in list(self._busy):
                self._unpin_locked(index)

    def _acked_locked(self, index: int, pin: _Pin) -> bool:
        """Did this use's reader acknowledge it? (See the module docstring:
        only an ack carrying this use's token, or a 0.2 reader's.)"""
        base = index * ENTRY.size
        (state,) = struct.unpack_from("<I", self._table, base + _STATE_AT)
        if state != _layout.ACKED:
            return False
        # Read after the state: the reader writes `acked` before the state
        # (one process_vm_writev, in order), so an ACKED state seen here has
        # its token in place (the ordering _pool.Pool.alloc relies on too).
        (acked,) = struct.unpack_from("16s", self._table, base + _ACKED_AT)
        return acked == pin.token or acked == _NO_ACK

    def _reclaim_locked(self, short: bool = False) -> int:
        """Free the pins that are done with: acknowledged (see _pool.Slot.held;
        `short`: a pin needs room, so KEEP_WHILE_ROOM ones go too), their
        reader gone, or their lease over. Never a pin its reader has not
        read, nor a request a retry plain gRPC would make may read again,
        while its call lives and its lease runs: a full table or budget
        sends the next message elsewhere instead."""
        now = self._clock()
        gone = _layout.Liveness()
        freed = 0
        keep = KEEP_WHILE_ROOM if short else FREE_ON_ACK
        for index, pin in list(self._busy.items()):
            acked = pin.held <= keep and self._acked_locked(index, pin)
            if acked or now >= pin.deadline or gone(pin.reader):
                self._unpin_locked(index)
                freed += 1
        return freed

    def _unpin_locked(self, index: int) -> None:
        pin = self._busy.pop(index)
        # Bump the generation *before* dropping the bytes: a reader still copying
        # them re-reads the generation afterwards and discards what it got.
        self._generations[index] += 1
        base = index * ENTRY.size
        struct.pack_into("<QI", self._table, base + _GEN_AT, self._generations[index], _layout.FREE)
        self._pinned -= len(pin.payload)
        left = self._by_peer[pin.peer] - len(pin.payload)
        if left:
            self._by_peer[pin.peer] = left
        else:
            del self._by_peer[pin.peer]
        self._free.append(index)


# Single-use handles being read in this process, by (pid, entry address,
# generation): the entry's state lives in the sender's memory, so "check
# READY, then ack" cannot be one step there; two readers of one handle can
# only race inside one receiving process, and this set makes the second one
# fail as a replay.
_reading: set = set()
_reading_lock = threading.Lock()  # protects _reading


def _check_generation(h: wire.CmaHandle) -> None:
    after = bytearray(8)
    _vm.read_into(h.pid, [(h.entry_addr + _GEN_AT, 8)], after)
    if struct.unpack("<Q", after)[0] != h.generation:
        raise SlotReclaimed(
            f"cma entry {h.entry} was revoked while it was read (the lease expired or the call "
            "ended); the bytes are discarded"
        )


def read(
    h: wire.CmaHandle,
    peer_pid: int,
    my_inst: bytes,
    my_key: bytes,
    max_message: int,
    dest: Callable[[int], memoryview] = lambda n: memoryview(bytearray(n)),
    reread: bool = False,
) -> memoryview:
    """Receiver side: check the handle against the sender's entry, pull the
    payload into `dest(length)`, re-check, acknowledge. Returns that view.

    `reread`: an entry we acknowledged already may be read again (a request
    gRPC resent; its sender keeps it pinned until the call ends)."""
    if h.length > max_message:
        raise HandleTooLarge(
            f"handle offers {h.length} bytes; this receiver accepts at most {max_message} "
            "(SHMGRPC_MAX_MESSAGE)"
        )
    if h.pid != peer_pid:
        raise HandleError(
            f"cma handle names pid {h.pid}, but this call's peer is pid {peer_pid}: refused"
        )
    if not hmac.compare_digest(h.receiver, my_inst):
        raise StaleSessionError(
            "cma handle was addressed to another receiver (the channel reconnected to "
            "another server process)"
        )
    raw = bytearray(ENTRY.size)
    _vm.read_into(h.pid, [(h.entry_addr, ENTRY.size)], raw)
    magic, generation, state, length, token, key, addr, acked = ENTRY.unpack(raw)
    if magic != ENTRY_MAGIC:
        raise HandleError(f"cma handle entry at {h.entry_addr:#x} is not a shmgrpc pin entry")
    # The generation before the key: an entry that moved on since the handle
    # was made may hold another peer's pin now (another key), and that is
    # data loss, not a forgery. No payload byte is read either way.
    if generation != h.generation:
        raise SlotReclaimed(
            f"cma entry {h.entry} was reused (generation {generation}, handle has "
            f"{h.generation}): the lease expired or the call ended before it was read"
        )
    if not hmac.compare_digest(key, my_key):
        raise HandleError("cma entry does not carry the key issued to this peer: not offered to us")
    if not hmac.compare_digest(token, h.token):
        raise HandleError("cma entry was not offered for this message (token mismatch)")
    # ACKED with another token: a late ack of an earlier use of this entry
    # (module docstring), not ours: this message is unread.
    ours = hmac.compare_digest(acked, h.token)
    if not (state == _layout.READY or (state == _layout.ACKED and (reread or not ours))):
        raise HandleError(f"cma entry {h.entry} is not ready (state {state}); handles are single-use")
    if length != h.length or h.iovecs != ((addr, length),):
        raise HandleError(
            f"cma handle range {[(hex(a), n) for a, n in h.iovecs]} is not the region "
            f"offered ({addr:#x}, {length})"
        )
    claim = None if reread else (h.pid, h.entry_addr, h.generation)
    if claim is not None:
        with _reading_lock:
            if claim in _reading:
                raise HandleError(f"cma entry {h.entry} is being read already; handles are single-use")
            _reading.add(claim)
    try:
        payload = dest(h.length)
        try:
            _vm.read_into(h.pid, h.iovecs, payload)
        except CmaBadAddress:
            # The sender may have revoked the pin and freed the bytes meanwhile:
            # that is DATA_LOSS, not a bad handle.
            _check_generation(h)
            raise
        _check_generation(h)
        # The ack names this use: its token first, then the state (see the
        # module docstring), in one call.
        _vm.write_from(h.pid, [(h.entry_addr + _ACKED_AT, 16), (h.entry_addr + _STATE_AT, 4)],
                       h.token + _ACKED_STATE)
    finally:
        if claim is not None:
            with _reading_lock:
                _reading.discard(claim)
    return payload


class Buffers:
    """Receive buffers kept for reuse: a fresh buffer costs a page fault per
    4 KiB on first touch, which at 64 MiB is most of a read's time."""

    MAX_KEPT = 4  # buffers; enough for a few concurrent large reads

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # protects _kept
        self._kept: List[bytearray] = []

    def take(self, n: int) -> bytearray:
        with self._lock:
            fits = [b for b in self._kept if n <= len(b) <= 2 * n]
            if fits:
                buf = min(fits, key=len)
                self._kept.remove(buf)
                return buf
        return bytearray(_layout.size_class(n))

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._kept.append(buf)
            self._kept.sort(key=len)
            while len(self._kept) > self.MAX_KEPT or sum(map(len, self._kept)) > self.max_bytes:
                self._kept.pop(0)
