"""Identity and the co-location proof.

Every engine (one per interceptor) owns an *id segment*: a 4 KiB shm file,
0600, that holds its instance id and a 32-byte secret. A peer proves it is on
this host, in this shm namespace and of this uid by opening that file: it
answers with HMAC(secret, label + its own instance id), which it cannot compute
otherwise. The secret itself never crosses the socket.

Id segment layout, little-endian:

    offset size field
    0      8    magic       b"SHMGID01"
    8      4    pid
    12     4    reserved
    16     8    start       process start time, clock ticks since boot
    24     16   inst        instance id (random)
    40     32   secret      random; proves whoever quotes an HMAC of it read this file
    72     8    probe_addr  address, in the owner, of 16 bytes equal to inst: a peer
                            reads them with process_vm_readv to test cma permission
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import mmap
import os
import secrets
import struct
from dataclasses import dataclass, field
from typing import Dict, Optional

from . import shmdir
from .errors import HandleError

ID_SIZE = 4096
ID_MAGIC = b"SHMGID01"
_ID = struct.Struct("<8sI4xQ16s32sQ")

LABEL_HELLO = b"shmgrpc hello v1"  # client proves it read the server's id segment
LABEL_WELCOME = b"shmgrpc welcome v1"  # server proves it read the client's
LABEL_CMA_KEY = b"shmgrpc cma key v1"


def proof(secret: bytes, label: bytes, inst: bytes) -> bytes:
    return hmac.new(secret, label + inst, hashlib.sha256).digest()[:16]


def proved(secret: bytes, label: bytes, inst: bytes, quoted: Optional[bytes]) -> bool:
    """Did the peer `inst` quote the proof of having read the id segment that
    holds `secret`? Constant time, like every other secret comparison."""
    return quoted is not None and hmac.compare_digest(quoted, proof(secret, label, inst))


NO_SEGMENT = "-"  # the id segment name of a process that has none


class Identity:
    """This process's id segment and the secrets that never leave it.

    `named=False`: no id segment (no usable shm directory); the process can
    still prove itself over a side connection (memfd)."""

    def __init__(self, shm_dir: str, named: bool = True):
        self.shm_dir = shm_dir
        self.inst = secrets.token_bytes(16)
        self.secret = secrets.token_bytes(32)
        # Derives the keys peers must write beside cma payloads addressed to us.
        # Unlike `secret`, it is in no file: a process that can read our segments
        # still cannot forge what we issued to a peer over its connection.
        self._master = secrets.token_bytes(32)
        self._probe = ctypes.create_string_buffer(self.inst, len(self.inst))
        self._mm: Optional[mmap.mmap] = None  # None: no id segment, or abandoned after fork
        self._fd = -1
        self.name = NO_SEGMENT
        if not named:
            return
        self.name = shmdir.new_base_name() + "-id"
        self._mm, self._fd = shmdir.create_mapping(shm_dir, self.name, ID_SIZE, keep_fd=True)
        _ID.pack_into(
            self._mm,
            0,
            ID_MAGIC,
            os.getpid(),
            shmdir.process_start(os.getpid()) or 0,  # not cached at import: a forked child has its own
            self.inst,
            self.secret,
            ctypes.addressof(self._probe),
        )

    def cma_key_for(self, peer_inst: bytes) -> bytes:
        return hmac.new(self._master, LABEL_CMA_KEY + peer_inst, hashlib.sha256).digest()[:16]

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def named(self) -> bool:
        return self.name != NO_SEGMENT

    def close(self) -> None:
        """Owner: unlink and unmap. Safe to call twice."""
        if self.named:
            shmdir.remove(os.path.join(self.shm_dir, self.name))
        self._close_fd()
        try:
            if self._mm is not None:
                self._mm.close()
        except (BufferError, ValueError):
            pass

    def abandon(self) -> None:
        """After fork, in the child: the parent still owns the file (and its
        lock; the child's copy of the descriptor is closed)."""
        self._close_fd()
        self._mm = None


@dataclass
class Peer:
    """A remote engine whose id segment we opened and checked."""

    inst: bytes
    pid: int
    start: int
    secret: bytes
    id_segment: str
    probe_addr: int
    # transport name -> why this process may not read what the peer sends
    # that way (None: it may), for the transports that test it (cma).
    probed: Dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def named(self) -> bool:
        """We opened its id segment (same shm directory): shm and cma may work."""
        return self.id_segment != NO_SEGMENT


def side_peer(inst: bytes, ticket: bytes, pid: int = 0) -> Peer:
    """A peer known only through a side connection (another /dev/shm, maybe
    another pid namespace): its secret is the connection's ticket."""
    return Peer(inst, pid, 0, ticket, NO_SEGMENT, 0)


def read_peer(shm_dir: str, name: str, inst: bytes) -> Peer:
    """Open a peer's id segment and check it names `inst` and a live process.

    Raises HandleError (or DataLossError if the file is gone): the caller takes
    that as "not co-located" and stays with plain gRPC."""
    fd, _ = shmdir.open_peer_file(shm_dir, name, writable=False)
    try:
        data = os.pread(fd, _ID.size, 0)
    finally:
        os.close(fd)
    if len(data) < _ID.size:
        raise HandleError(f"id segment {name} is truncated")
    magic, pid, start, file_inst, secret, probe_addr = _ID.unpack(data)
    if magic != ID_MAGIC:
        raise HandleError(f"id segment {name} has a foreign header")
    if not hmac.compare_digest(file_inst, inst):
        raise HandleError(f"id segment {name} belongs to another instance than the peer claims")
    if not shmdir.alive(pid, start):
        raise HandleError(f"id segment {name} names pid {pid}, which is not running")
    return Peer(inst, pid, start, secret, name, probe_addr)
