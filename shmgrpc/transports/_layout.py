"""What the sender's pool (_pool.py) and the receiver's attacher (_attacher.py)
agree on: the layout of a segment (memfd's and shm's alike), the size classes,
the claim a reader writes, and Liveness. Neither side imports the other; both
import this.

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
"""

from __future__ import annotations

import mmap
import struct
from typing import Dict, Tuple

from .. import shmdir

PAGE = mmap.PAGESIZE
MIN_CLASS = 4096  # one page: smaller slots would share pages between messages
CLASSES_PER_DOUBLING = 4  # slot sizes 1, 1.25, 1.5, 1.75 x 2**k: at most 25% slack

SEG = struct.Struct("<8sIIQII16s16x")
SLOT = struct.Struct("<QI4xQ16s16s8x")
SEG_MAGIC = b"SHMGSEG1"
SLOT_HEADER = SLOT.size  # 64: one cache line per slot header
STATE_AT = 8  # offset of `state` inside a slot header
CLAIM_AT = 40  # offset of `claim`
NO_CLAIM = bytes(16)  # `claim` as alloc leaves it
FREE, WRITING, READY, ACKED, READING, HELD = 0, 1, 2, 3, 4, 5  # READING: a single-use reader claimed it


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def size_class(length: int) -> int:
    """The slot size a payload of `length` bytes goes into."""
    if length <= MIN_CLASS:
        return MIN_CLASS
    step = max(PAGE, (1 << (length.bit_length() - 1)) // CLASSES_PER_DOUBLING)  # of the power of two below
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


def claim(mm: mmap.mmap, base: int, token: bytes, state: int) -> None:
    """Mark the slot header at `base` READING, HELD or ACKED for the use `token`:
    the token first, then the state (module docstring)."""
    mm[base + CLAIM_AT : base + CLAIM_AT + 16] = token
    struct.pack_into("<I", mm, base + STATE_AT, state)
