"""The transports: each a module, behind one interface (base.Transport).

    memfd.py   slots in anonymous sealed segments, passed over a side
               connection (_side.py); nothing needs a shared directory
    shm.py     slots in named files of the shared shm directory
    cma.py     the receiver pulls the sender's bytes (process_vm_readv,
               _vm.py) after checking its pin table (_pins.py)

    _layout.py    the slots memfd and shm share: their segment and header
                  layout, the claim a reader writes
    _pool.py      the sender's pool of those slots
    _attacher.py  the receiver's side: maps, checks, reads, acknowledges
    _slots.py     the glue: the node's part (Slots) and SlotTransport, the
                  base of memfd and shm

The handle of each kind is encoded and decoded in ../wire.py. LADDER is the
order `SHMGRPC_TRANSPORT=auto` tries them in: memfd and shm are the same
slots in the same kind of warm mapping (measured alike, README
"Transports"); memfd comes first because it needs less (no shared /dev/shm,
no shared pid namespace) and leaves nothing behind. cma is last: its
receive buffer is fresh memory each time. A new transport is a module here
and one entry in LADDER.
"""

from __future__ import annotations

from typing import Tuple, Type

from .base import Transport
from .cma import Cma
from .memfd import Memfd
from .shm import Shm

LADDER: Tuple[Type[Transport], ...] = (Memfd, Shm, Cma)
NAMES: Tuple[str, ...] = tuple(t.name for t in LADDER)
BY_LETTER = {t.letter: t.name for t in LADDER}

__all__ = ["LADDER", "NAMES", "BY_LETTER", "Transport"]
