"""The side channel: a unix socket beside gRPC over which memfd segments
travel as file descriptors (SCM_RIGHTS). No names in any shm directory, so
nothing to reap: the kernel frees a segment with its last descriptor and
mapping, whoever dies.

Where: the server's node listens on an abstract-namespace unix socket
(`@shmgrpc-<pid>-<random>`), which every process of the same network
namespace can reach, e.g. the containers of one Kubernetes pod, or on a path
in SHMGRPC_SIDE_DIR (a volume shared between containers). The welcome tells
the client where, and hands it a one-time ticket.

Who: abstract sockets have no permissions, so a connection is accepted only
if (1) the kernel says the peer runs as our uid, or one allowed by
SHMGRPC_SIDE_UIDS (SO_PEERCRED, read when the connection is accepted: any
other uid is closed there and then), and (2) its first message, within
PENDING_SECONDS, carries a ticket this side issued, over the gRPC channel, in
the welcome to that very client instance, unexpired and unused. Connections
not authenticated yet are capped (PENDING_PER_UID per uid, PENDING_TOTAL in
all: past a cap the oldest one is settled at once, authenticated if its
first message is there, else closed), so no flood of connections can take
this process's descriptors. The client checks SO_PEERCRED of the server the
same way. This works across pid namespaces: no /proc, no pids, no file names.

Then: each side sends each of its memfd segments once on the connection
before the first handle into it, so the descriptor is in the peer's receive
queue before the handle can reach it. A background thread per node reads
every connection: segments are verified (sealed against shrinking, the size
announced, a shmgrpc header) and mapped; EOF means the peer is gone: its
mappings are dropped at once, and slots it was reading are freed. A handle
naming a segment not seen yet is never waited for (gRPC runs deserializers
on its dispatch thread, grpc.aio on the event loop): the receiver reads what
is queued on that connection itself, without blocking (arrive()), and a
segment still unknown then was never sent, or was refused or retired: the
handle fails at once, saying which.

Budgets: each segment a peer holds here costs one descriptor (Python's mmap
keeps a duplicate; the received one is closed once mapped) and one mapping.
This process gives memfd at most half of its RLIMIT_NOFILE soft limit (and of
vm.max_map_count), read once: the other half stays for gRPC's sockets and the
application (Budget). Every side connection reserves from it one descriptor
for itself plus the segments it may hold, its grant: an eighth of a peer's
share at first (at least FIRST_GRANT), raised on request (WANT, GRANT) while
the process has room, up to a peer's share, an eighth of the budget; and a
peer may have at most SHMGRPC_POOL_SIZE bytes
of segments mapped here. Grants are announced in AUTH / AUTH_OK and GRANT, and
an honest sender never exceeds one: it sends such a message inline, or asks
for more. A segment over the grant (a dishonest or broken peer) is refused:
its descriptor is closed at once, and the sender is told (REFUSED). Sends
never block: a peer whose queue is full (it does not read) gets that message
inline, and its retires are kept and sent when there is room.

Message (SOCK_SEQPACKET, one per datagram, 96 bytes, little-endian):

    offset size field
    0      4    magic     b"SGS1"
    4      1    type      1 auth, 2 auth ok, 3 segment (+1 fd), 4 retire,
                          5 refused, 6 want, 7 grant
    5      3    reserved
    8      8    segment   the sender's segment number (3, 4, 5); segments
                          the receiver of this message may hold at its
                          sender (1, 2, 7) or asks to hold (6)
    16     8    size      bytes of the segment (3); bytes of segments the
                          receiver of this message may map at its sender
                          (1, 2, 7) or asks to map (6)
    24     16   inst      the sender's instance id
    40     16   ticket    the one-time ticket from the welcome (1)
    56     40   reserved
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import resource
import secrets
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

from .. import shmdir
from .._log import RateLimit, repeats

log = logging.getLogger(__name__)

MSG = struct.Struct("<4sB3xQQ16s16s40x")
MAGIC = b"SGS1"
T_AUTH, T_AUTH_OK, T_SEGMENT, T_RETIRE, T_REFUSED, T_WANT, T_GRANT = 1, 2, 3, 4, 5, 6, 7
TICKET_SECONDS = 30.0  # a welcome's ticket must be used within this
CONNECT_SECONDS = 2.0  # a client's connect + authenticate, at most
# An accepted connection must authenticate within this: a client sends its
# ticket right after connect(), so a second is a loaded machine's margin.
PENDING_SECONDS = 1.0
PENDING_PER_UID = 8  # unauthenticated connections of one (allowed) uid at once
PENDING_TOTAL = 32  # unauthenticated connections at once, all uids together
ACCEPT_PAUSE = 0.1  # seconds without accept() after EMFILE: the backlog waits, the thread does not spin
# Messages one handle's arrive() reads at most: an honest sender's queue
# holds at most its grant of segments and their retires, far fewer.
DRAIN_MAX = 1024
READ_BATCH = 256  # messages the reader thread takes from one connection before looking at the others
FIRST_GRANT = 8  # the least a new connection may hold at first (Budget.first); more on request (WANT)
WANT_SECONDS = 1.0  # a sender asks for a larger grant at most this often
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # received descriptors close on exec
_GONE_KEPT = 256  # per connection: why recent segments are gone, for a late handle's error

# INFO lines about a peer's budget or a full queue: one per connection, cause and minute.
_BUDGET_LOG = RateLimit(60.0)


def available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and hasattr(socket, "SO_PEERCRED")


def peer_cred(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel. The
    pid is as seen from our pid namespace (0 when it is not visible here)."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def memfd_segment(name: str, size: int) -> int:
    """A sealed memfd of `size` bytes, reserved up front (a full tmpfs or
    memory cgroup fails here with OSError, never later with SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int, size: int) -> Optional[str]:
    """Why a received descriptor must not be mapped, or None: it must be a
    memfd sealed against shrinking (so no one can truncate it under us: no
    SIGBUS), of exactly the announced size."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as err:
        return f"not a sealable memfd ({err.strerror})"
    if not seals & fcntl.F_SEAL_SHRINK or not seals & fcntl.F_SEAL_SEAL:
        return f"not sealed against shrinking (seals {seals:#x})"
    actual = os.fstat(fd).st_size
    if actual != size:
        return f"{actual} bytes, announced {size}"
    return None


# --- the budget ---------------------------------------------------------------


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # the kernel's default


@dataclass(frozen=True)
class Budget:
    """What memfd may take of this process: `total` descriptors (side
    connections and the segments received over them, all peers together),
    at most `per_peer` segments for one peer. Half of the RLIMIT_NOFILE soft
    limit when it is read (and of vm.max_map_count: each segment is a
    mapping too); the other half stays for gRPC's sockets, the listener's
    accept()s and the application."""

    total: int
    per_peer: int

    @property
    def first(self) -> int:
        """A new connection's grant: an eighth of the per-peer share, at
        least FIRST_GRANT (more on request)."""
        return min(self.per_peer, max(FIRST_GRANT, self.per_peer // 8))

    @classmethod
    def of_this_process(cls) -> "Budget":
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1 << 20
        total = max(16, min(soft // 2, _max_map_count() // 2))
        return cls(total=total, per_peer=max(FIRST_GRANT, total // 8))


class Ledger:
    """The process's reservations against its Budget: every side connection,
    of every node, holds 1 + its grant until it closes."""

    def __init__(self):
        self._lock = threading.Lock()  # protects budget and reserved
        self.budget: Optional[Budget] = None
        self.reserved = 0

    def _budget_locked(self) -> Budget:
        if self.budget is None:  # read once, when the first side connection is made
            self.budget = Budget.of_this_process()
        return self.budget

    def open(self) -> Optional[int]:
        """Reserve a new connection and its first grant: the grant, or None
        when the process's budget has no room for one more connection."""
        with self._lock:
            budget = self._budget_locked()
            free = budget.total - self.reserved
            if free < 2:
                return None
            grant = min(budget.first, free - 1)
            self.reserved += 1 + grant
            return grant

    def grow(self, granted: int, wanted: int) -> int:
        """A connection granted `granted` segments asks for `wanted`: what it
        may hold now (at least `granted`; at most the per-peer share, and
        what the process has left)."""
        with self._lock:
            budget = self._budget_locked()
            target = min(budget.per_peer, max(wanted, 2 * granted))
            extra = max(0, min(target - granted, budget.total - self.reserved))
            self.reserved += extra
            return granted + extra

    def close(self, granted: int) -> None:
        with self._lock:
            self.reserved -= 1 + granted

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self.reserved = 0  # the parent's connections are not the child's (Side.abandon)
        self.budget = None


LEDGER = Ledger()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=LEDGER.after_fork_in_child)


_ids = itertools.count(1)


_SIDE_NAME = re.compile(r"^shmgrpc-\d{1,10}-[0-9a-f]{16}\.sock$")


def reap_side_dir(side_dir: str) -> list:
    """Remove side socket files of ours that nobody listens on any more (a
    server killed before it could close). A live one answers connect()."""
    removed: List[str] = []
    for name, path, st in shmdir.own_files(side_dir, _SIDE_NAME):
        if not stat.S_ISSOCK(st.st_mode):
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
        except OSError:
            pass  # busy, or not ours to judge: leave it
        finally:
            probe.close()
    return removed


class Conn:
    """One authenticated side connection to a peer node.

    Two ledgers, one per direction. As a sender: the segments we passed to
    the peer (`_sent`, plus retires not sent yet) against what the peer
    granted us. As a receiver: the segments the peer passed to us that we
    mapped (`_held`) against what we granted it (`granted`: reserved in the
    process's LEDGER)."""

    def __init__(self, side: "Side", sock: socket.socket, peer_inst: bytes, pid: int, uid: int,
                 granted: int = 0, granted_bytes: int = 0):
        self.id = next(_ids)  # keys what came over it (_attacher.Attacher)
        self.side = side
        self.sock = sock
        self.peer_inst = peer_inst
        self.pid = pid  # as seen from here; 0 in another pid namespace
        # The peer's process as (pid, start), when this pid namespace sees it:
        # once the connection is closed, whether that process is gone too.
        start = shmdir.process_start(pid) if pid else None
        self.process: Optional[Tuple[int, int]] = (pid, start) if start is not None else None
        self.uid = uid
        self.alive = True
        self.ticket = b""  # the ticket this connection was opened with (proves the hello)
        # -- we send (the peer holds)
        self._send_lock = threading.Lock()  # protects alive's change, sends and everything of this part
        self._sent: Dict[int, int] = {}  # our segment number -> its bytes, held by the peer
        self._retiring: Dict[int, int] = {}  # retired, RETIRE not sent yet (queue full): still held
        self.peer_grant = 0  # segments the peer lets us hold there (AUTH / AUTH_OK, GRANT)
        self.peer_grant_bytes = 0
        self._wanted = 0.0  # when we last asked for more (WANT)
        # -- we receive (we hold)
        # One reader at a time, so that a message read is a message handled
        # before anyone looks (the reader thread, or arrive() on a dispatch
        # thread). Reentrant: lost() takes it too, before closing the socket
        # (no recv on a descriptor number that may be reused), and is called
        # from inside a read at EOF.
        self._read_lock = threading.RLock()
        self.granted = granted  # segments we let the peer hold here (reserved in LEDGER)
        self.granted_bytes = granted_bytes
        self._held: Dict[int, int] = {}  # the peer's segment number -> bytes, mapped here
        self._held_bytes = 0
        self._gone: "collections.OrderedDict[int, str]" = collections.OrderedDict()  # number -> why

    # -- sending

    def _send(self, kind: int, number: int = 0, size: int = 0, fds: Sequence[int] = ()) -> bool:
        """One message, never blocking (the caller holds _send_lock). False:
        the peer's queue is full (it does not read). OSError: the
        connection broke."""
        message = MSG.pack(MAGIC, kind, number, size, self.side.inst, b"")
        try:
            if fds:
                socket.send_fds(self.sock, [message], list(fds), socket.MSG_DONTWAIT)
            else:
                self.sock.send(message, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def send_segment(self, number: int, size: int, fd: int) -> str:
        """Pass our segment's descriptor to the peer, once. Returns "" when
        the peer holds it (a handle may name it now), else why not, the
        caller's fallback reason: the connection is gone, the peer's grant
        is used up (we ask for more), or its queue is full."""
        if number in self._sent:
            return ""
        broke = False
        with self._send_lock:
            if number in self._sent:
                return ""
            if not self.alive:
                reason = "side_closed"
                return reason
            try:
                self._flush_retires_locked()
                held = len(self._sent) + len(self._retiring)
                held_bytes = sum(self._sent.values()) + sum(self._retiring.values())
                if held + 1 > self.peer_grant or held_bytes + size > self.peer_grant_bytes:
                    self._want_locked(held + 1, held_bytes + size)
                    reason = "side_budget"
                elif self._send(T_SEGMENT, number, size, [fd]):
                    self._sent[number] = size
                    if 4 * (held + 1) >= 3 * self.peer_grant:
                        # three quarters used: ask now, so that the grant
                        # has grown before a message must go inline for it
                        self._want_locked(held + 2, held_bytes + 2 * size)
                    return ""
                else:
                    reason = "side_busy"
            except OSError:
                broke, reason = True, "side_closed"
        if broke:
            self.side.lost(self)
        else:
            self._note(reason)
        return reason

    def _want_locked(self, segments: int, nbytes: int) -> None:
        now = time.monotonic()
        if now - self._wanted < WANT_SECONDS:
            return
        self._wanted = now
        self._send(T_WANT, segments, nbytes)

    def _note(self, reason: str) -> None:
        """One INFO line per connection, reason and minute."""
        suppressed = _BUDGET_LOG.allow((self.id, reason))
        if suppressed is None:
            return
        if reason == "side_busy":
            log.info("side connection to pid %d: its queue is full (it does not read); large messages to "
                     "it go inline until it does%s", self.pid, repeats(suppressed))
        elif reason == "side_budget":
            log.info("side connection to pid %d: we hold the %d segments (%d bytes) it grants us; large "
                     "messages that need another go inline until it grants more%s", self.pid,
                     self.peer_grant, self.peer_grant_bytes, repeats(suppressed))

    def retire(self, number: int) -> None:
        """Tell the peer to unmap a segment we destroyed. Until the RETIRE is
        sent (the peer's queue may be full) it counts against our grant."""
        with self._send_lock:
            if number not in self._sent or not self.alive:
                return
            self._retiring[number] = self._sent.pop(number)
        self.flush()

    def flush(self) -> None:
        """Send the retires not sent yet: retire() sends its own at once, the
        reader thread calls this each pass for those that found the peer's
        queue full."""
        if not self._retiring:
            return
        broke = False
        with self._send_lock:
            if self.alive:
                try:
                    self._flush_retires_locked()
                except OSError:
                    broke = True
        if broke:
            self.side.lost(self)

    def _flush_retires_locked(self) -> None:
        for number in list(self._retiring):
            if not self._send(T_RETIRE, number):
                return
            del self._retiring[number]

    def _granted(self, segments: int, nbytes: int) -> None:
        """The peer's grant (AUTH / AUTH_OK, GRANT)."""
        with self._send_lock:
            if segments > self.peer_grant:
                self._wanted = 0.0  # it grew: ask again as soon as it is needed
            self.peer_grant = max(self.peer_grant, segments)
            self.peer_grant_bytes = nbytes

    def _refused(self, number: int) -> None:
        """The peer refused one of our segments: it does not hold it. Ask no
        more of it until it grants more (an honest peer only refuses what
        was over its grant, or what it could not receive)."""
        with self._send_lock:
            if self._sent.pop(number, None) is None:
                return
            self.peer_grant = min(self.peer_grant, len(self._sent) + len(self._retiring))
        log.info("side connection to pid %d: it refused our segment %d; large messages that need another "
                 "segment go inline until it grants more", self.pid, number)

    # -- receiving

    def gone(self, number: int, why: str) -> None:
        self._gone[number] = why
        self._gone.move_to_end(number)
        while len(self._gone) > _GONE_KEPT:
            self._gone.popitem(last=False)


class Side:
    """One node's side channel: its listener (servers), its connections, and
    the thread that reads them.

    `on_segment(conn, number, mm, size) -> bool` (False: not a shmgrpc
    segment) / `on_retire(conn, number)` / `on_lost(conn)` are the node's:
    they keep the mappings (_attacher.Attacher). `peer_bytes`: how many bytes of
    segments one peer may have mapped here (SHMGRPC_POOL_SIZE)."""

    def __init__(self, inst: bytes, side_dir: str = "", uids=(), on_segment: Optional[Callable] = None,
                 on_retire: Optional[Callable] = None, on_lost: Optional[Callable] = None, peer_bytes: int = 1 << 30):
        self.inst = inst
        self.side_dir = side_dir
        self.uids = {os.geteuid(), *uids}
        self.peer_bytes = peer_bytes
        self._on_segment, self._on_retire, self._on_lost = on_segment, on_retire, on_lost
        self._lock = threading.Lock()  # protects everything below
        self._conns: Dict[bytes, Conn] = {}  # peer inst -> its live connection
        self._sel: Optional[selectors.BaseSelector] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.door = Door(self)  # a server's side socket, once it listens

    # -- the reader thread

    def _start_locked(self) -> None:
        if self._thread is not None:
            return
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="shmgrpc-side", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        wake_w = self._wake_w  # None: the thread never started
        try:
            if wake_w is not None:
                wake_w.send(b"x", socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None  # _start_locked made it before it started this thread
        while not self._closed:
            for key, _ in sel.select(timeout=self._next_timeout()):
                if key.fileobj is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                elif key.data == "listener":
                    self.door.accept()
                elif isinstance(key.data, Conn):
                    self._read(key.data)
                else:
                    self.door._authenticate(cast(socket.socket, key.fileobj))  # only sockets are registered
            self.door.expire()
            for conn in list(self._conns.values()):
                conn.flush()

    def _next_timeout(self) -> float:
        """Until the next thing to do without a wake-up: the oldest pending
        connection's deadline, the end of an accept pause, or a second."""
        now = time.monotonic()
        soonest = now + 1.0
        with self._lock:
            soonest = self.door.next_deadline(soonest)
        return max(0.0, soonest - now)

    def _register(self, sock: socket.socket, data) -> None:
        with self._lock:
            if self._closed:
                return
            self._start_locked()
            assert self._sel is not None  # _start_locked made it
            self._sel.register(sock, selectors.EVENT_READ, data)
        self._wake()

    def _unregister(self, sock: socket.socket) -> None:
        sel = self._sel  # None: the thread never started
        try:
            if sel is not None:
                sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- server: its side socket (Door)

    def listen(self) -> str:
        """Start listening (once); the address a welcome names."""
        return self.door.listen()

    def issue_ticket(self, client_inst: bytes) -> bytes:
        return self.door.issue_ticket(client_inst)

    def _adopt(self, conn: Conn) -> None:
        with self._lock:
            old = self._conns.get(conn.peer_inst)
            self._conns[conn.peer_inst] = conn
        if old is not None:
            self.lost(old)
        self._register(conn.sock, conn)

    # -- client: connect

    def connect(self, address: str, ticket: bytes, server_inst: bytes) -> Conn:
        """Connect to a server's side socket with the ticket of its welcome.
        Raises OSError (or ConnectionError) when it cannot be used."""
        with self._lock:
            old = self._conns.get(server_inst)
        if old is not None and old.alive:
            return old
        grant = LEDGER.open()
        if grant is None:
            raise ConnectionError("this process's memfd budget of descriptors is in use (half its RLIMIT_NOFILE)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + CONNECT_SECONDS
        try:
            sock.settimeout(CONNECT_SECONDS)
            while True:
                try:
                    sock.connect("\0" + address[1:] if address.startswith("@") else address)
                    break
                except BlockingIOError:
                    # The listener's backlog is full (a burst of clients, or
                    # a flood it is closing): room comes as it accepts.
                    if time.monotonic() >= deadline:
                        raise ConnectionError(f"side socket {address} is busy (its backlog stayed full)") from None
                    time.sleep(0.005)
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            pid, uid, _ = peer_cred(sock)
            if uid not in self.uids:
                raise ConnectionError(f"side socket {address} is served by uid {uid}, not an allowed uid")
            try:
                sock.send(MSG.pack(MAGIC, T_AUTH, grant, self.peer_bytes, self.inst, ticket))
                data = sock.recv(MSG.size)
            except (BrokenPipeError, ConnectionResetError):
                data = b""  # closed at accept: the server does not allow our uid
            if len(data) != MSG.size:
                raise ConnectionError(f"side socket {address} refused the ticket (or our uid; or the server "
                                      "has no descriptors to spare for memfd)")
            magic, kind, segments, nbytes, inst, _ = MSG.unpack(data)
            if magic != MAGIC or kind != T_AUTH_OK or not secrets.compare_digest(inst, server_inst):
                raise ConnectionError(f"side socket {address} is not the server that welcomed us")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            LEDGER.close(grant)
            raise
        conn = Conn(self, sock, server_inst, pid, uid, grant, self.peer_bytes)
        conn.ticket = ticket
        conn._granted(segments, nbytes)
        self._adopt(conn)
        return conn

    def conn_for(self, peer_inst: bytes) -> Optional[Conn]:
        conn = self._conns.get(peer_inst)
        return conn if conn is not None and conn.alive else None

    def ticket_of(self, peer_inst: bytes) -> Optional[bytes]:
        conn = self.conn_for(peer_inst)
        return conn.ticket if conn is not None else None

    # -- reading a connection

    def _read(self, conn: Conn) -> None:
        """The reader thread: what `conn` has queued, a batch at most (then
        the other connections get their turn)."""
        for _ in range(READ_BATCH):
            with conn._read_lock:
                if not self._read_one(conn):
                    return

    def arrive(self, conn: Conn, number: int) -> Optional[str]:
        """A handle names the peer's segment `number`: None once it is here,
        else why it is not. Never waits for the peer: its sender put the
        descriptor in our queue before the handle on gRPC, so what is not
        queued now will not come. Reads the queue itself (the reader thread
        may not have got to it yet), under the connection's read lock: a
        message the reader thread took is handled before this looks."""
        with conn._read_lock:
            for _ in range(DRAIN_MAX):
                if number in conn._held or not self._read_one(conn):
                    break
            if number in conn._held:
                return None
            why = conn._gone.get(number)
        if why is not None:
            return why
        if not conn.alive:
            return "cannot come: the side connection to its sender closed"
        return ("was never sent on the side connection of this handle's sender (a forged handle, or one made "
                "for an earlier connection)")

    def _read_one(self, conn: Conn) -> bool:
        """Read and handle one message (the caller holds conn._read_lock).
        False: nothing queued, or the connection is gone."""
        if not conn.alive:
            return False
        try:
            data, fds, flags, _ = socket.recv_fds(conn.sock, MSG.size, 1, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data, fds, flags = b"", [], 0
        try:
            if not data:  # EOF: the peer is gone
                self.lost(conn)
                return False
            self._message(conn, data, fds, flags)
        finally:
            for fd in fds:
                os.close(fd)  # a mapping keeps its own duplicate
        return True

    def _message(self, conn: Conn, data: bytes, fds, flags: int = 0) -> None:
        if len(data) != MSG.size:
            log.debug("side message of %d bytes ignored", len(data))
            return
        magic, kind, number, size, inst, _ = MSG.unpack(data)
        if magic != MAGIC or not secrets.compare_digest(inst, conn.peer_inst):
            return
        if kind == T_SEGMENT:
            self._segment(conn, number, size, fds, flags)
        elif kind == T_RETIRE:
            size = conn._held.pop(number, None)
            if size is not None:
                conn._held_bytes -= size
                conn.gone(number, "was retired by its sender (the call ended, or the lease expired, before it was read)")
                if self._on_retire is not None:
                    self._on_retire(conn, number)
        elif kind == T_WANT:
            granted = LEDGER.grow(conn.granted, number)
            conn.granted = granted
            try:
                with conn._send_lock:
                    if conn.alive:
                        conn._send(T_GRANT, granted, conn.granted_bytes)
            except OSError:
                pass  # the reader sees the EOF
        elif kind == T_GRANT:
            conn._granted(number, size)
        elif kind == T_REFUSED:
            conn._refused(number)

    def _segment(self, conn: Conn, number: int, size: int, fds, flags: int) -> None:
        """A segment the peer passes us: mapped if it is within the peer's
        grant and is what it says; else refused, its descriptor closed at
        once (by _read_one) and the peer told."""
        why = None
        if len(fds) != 1:
            why = ("no descriptor came with it (this process is at its descriptor limit)"
                   if flags & getattr(socket, "MSG_CTRUNC", 0) else "it came without a descriptor")
        elif number in conn._held:
            why = "its number is held already"
        elif len(conn._held) + 1 > conn.granted or conn._held_bytes + size > conn.granted_bytes:
            why = (f"over this peer's share: it holds {len(conn._held)} segments ({conn._held_bytes} bytes) "
                   f"here, its grant is {conn.granted} ({conn.granted_bytes} bytes)")
        else:
            why = check_sealed(fds[0], size)
            if why is None:
                try:
                    mm = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError) as err:
                    why = f"cannot map it: {err}"
                else:
                    if self._on_segment is not None and self._on_segment(conn, number, mm, size) is False:
                        why = "not a shmgrpc segment"
                    else:
                        conn._held[number] = size
                        conn._held_bytes += size
                        conn._gone.pop(number, None)
                        return
        conn.gone(number, f"was refused: {why}")
        if _BUDGET_LOG.allow((conn.id, "refused")) is not None:
            log.info("side connection of pid %d: segment %d refused: %s", conn.pid, number, why)
        try:
            with conn._send_lock:
                if conn.alive:
                    conn._send(T_REFUSED, number)
        except OSError:
            pass  # the reader sees the EOF

    def lost(self, conn: Conn) -> None:
        """The connection is gone (EOF, error, replaced, closing): forget it
        and everything that came over it."""
        with conn._send_lock:
            if not conn.alive:
                return
            conn.alive = False
        with self._lock:
            if self._conns.get(conn.peer_inst) is conn:
                del self._conns[conn.peer_inst]
        LEDGER.close(conn.granted)
        with conn._read_lock:
            self._unregister(conn.sock)
            try:
                conn.sock.close()
            except OSError:
                pass
        if self._on_lost is not None:
            self._on_lost(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns.values())
        for conn in conns:
            self.lost(conn)
        self.door.close()
        self._wake()

    def abandon(self) -> None:
        """In a forked child: close this process's copies, tell nobody."""
        self._closed = True
        for conn in list(self._conns.values()):
            conn.alive = False
            try:
                conn.sock.close()
            except OSError:
                pass
        self.door.abandon()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._conns.clear()


class Door:
    """A server's side socket: the listener, the tickets its welcomes
    issued, and the strangers that connected and have not shown one yet.
    SO_PEERCRED is checked at accept (a uid not allowed is closed there); a
    stranger has PENDING_SECONDS to send its ticket, and at most
    PENDING_PER_UID of one uid and PENDING_TOTAL in all wait at once (the
    oldest are settled first). Shares its Side's lock and reader thread."""

    def __init__(self, side: "Side"):
        self.side = side
        self._lock = side._lock  # protects everything below
        self.address: Optional[str] = None
        self._listener: Optional[socket.socket] = None
        self._path: Optional[str] = None
        self._tickets: Dict[bytes, Tuple[bytes, float]] = {}  # ticket -> (client inst, expiry)
        # accepted, not authenticated: socket -> (deadline, pid, uid), oldest first
        self._pending: "collections.OrderedDict[socket.socket, Tuple[float, int, int]]" = collections.OrderedDict()
        self._accept_paused = 0.0  # accept() stopped until then (EMFILE); 0: accepting

    def next_deadline(self, soonest: float) -> float:
        """The oldest pending connection's deadline or the end of an accept
        pause, if sooner than `soonest` (the caller holds the lock)."""
        if self._pending:
            soonest = min(soonest, next(iter(self._pending.values()))[0])
        if self._accept_paused:
            soonest = min(soonest, self._accept_paused)
        return soonest

    def listen(self) -> str:
        """Start listening (once); the address a welcome names."""
        with self._lock:
            if self.address is not None:
                return self.address
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            name = f"shmgrpc-{os.getpid()}-{secrets.token_hex(8)}"
            if self.side.side_dir:
                reap_side_dir(self.side.side_dir)
                path = os.path.join(self.side.side_dir, name + ".sock")
                old_umask = os.umask(0o177)  # 0600 from the start, not after a chmod
                try:
                    sock.bind(path)
                finally:
                    os.umask(old_umask)
                self._path, address = path, path
            else:
                sock.bind("\0" + name)
                address = "@" + name
            sock.listen(64)
            sock.setblocking(False)
            self._listener = sock
            self.address = address
        self.side._register(sock, "listener")
        return address

    def issue_ticket(self, client_inst: bytes) -> bytes:
        ticket = secrets.token_bytes(16)
        with self._lock:
            self._tickets[ticket] = (client_inst, time.monotonic() + TICKET_SECONDS)
        return ticket

    def accept(self) -> None:
        """Take every connection waiting: SO_PEERCRED at once (a uid not
        allowed is closed there), then a pending place, within the caps."""
        listener, sel = self._listener, self.side._sel
        if listener is None or sel is None:  # closed since the event
            return
        while not self.side._closed:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: leave the rest in the backlog for a
                    # moment rather than spin on a listener that stays readable.
                    self._pause_accepting()
                return
            try:
                pid, uid, _ = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            if uid not in self.side.uids:
                sock.close()
                if _BUDGET_LOG.allow(("uid", uid)) is not None:
                    log.debug("side connection refused at accept: uid %d is not allowed (SO_PEERCRED; "
                              "allowed: %s)", uid, sorted(self.side.uids))
                continue
            sock.setblocking(False)
            with self._lock:
                self._pending[sock] = (time.monotonic() + PENDING_SECONDS, pid, uid)
                evict = self._over_caps_locked(uid)
            sel.register(sock, selectors.EVENT_READ, "pending")
            for old in evict:
                self._authenticate(old)  # its ticket, if it sent one; else it is closed

    def _over_caps_locked(self, uid: int) -> List[socket.socket]:
        """The oldest pending connections past PENDING_PER_UID (of `uid`) or
        PENDING_TOTAL: settled now rather than refusing the newest, so that
        a flood of silent connections cannot lock a client out."""
        out = []
        mine = [s for s, (_, _, u) in self._pending.items() if u == uid]
        out += mine[: max(0, len(mine) - PENDING_PER_UID)]
        rest = [s for s in self._pending if s not in out]
        out += rest[: max(0, len(rest) - PENDING_TOTAL)]
        return out

    def _pause_accepting(self) -> None:
        with self._lock:
            if self._accept_paused or self._listener is None:
                return
            self._accept_paused = time.monotonic() + ACCEPT_PAUSE
        self.side._unregister(self._listener)
        if _BUDGET_LOG.allow(("accept", id(self))) is not None:
            log.warning("side socket: this process is out of descriptors; new side connections wait")

    def _authenticate(self, sock: socket.socket) -> None:
        """The first message of an accepted connection: a ticket we issued to
        the instance it names, from a process of an allowed uid. Not there
        yet (a connection settled early): closed."""
        with self._lock:
            pending = self._pending.pop(sock, None)
        self.side._unregister(sock)
        if pending is None:
            return  # settled already
        _, pid, uid = pending
        try:
            data = sock.recv(MSG.size, socket.MSG_DONTWAIT)
        except OSError:
            data = b""
        why = None
        if len(data) != MSG.size:
            why = "no first message in time" if not data else "malformed first message"
        else:
            magic, kind, segments, nbytes, inst, ticket = MSG.unpack(data)
            with self._lock:
                issued = self._tickets.pop(ticket, None) if magic == MAGIC and kind == T_AUTH else None
            if issued is None or not secrets.compare_digest(issued[0], inst) or issued[1] < time.monotonic():
                why = "no valid ticket (it comes only with a welcome over the gRPC channel)"
        grant = LEDGER.open() if why is None else None
        if grant is None:
            log.debug("side connection refused: %s",
                      why or "this process's memfd budget of descriptors is in use (half its RLIMIT_NOFILE)")
            sock.close()
            return
        # Known before the client hears AUTH_OK: its very next call may carry a
        # hello proved with this ticket.
        conn = Conn(self.side, sock, inst, pid, uid, grant, self.side.peer_bytes)
        conn.ticket = ticket
        conn._granted(segments, nbytes)
        self.side._adopt(conn)
        try:
            with conn._send_lock:
                ok = conn.alive and conn._send(T_AUTH_OK, grant, self.side.peer_bytes)
        except OSError:
            ok = False
        if not ok:
            self.side.lost(conn)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [s for s, (deadline, _, _) in self._pending.items() if deadline < now]
            for ticket in [t for t, (_, exp) in self._tickets.items() if exp < now]:
                del self._tickets[ticket]
            resume = self._accept_paused and self._accept_paused <= now and self._listener is not None
            if resume:
                self._accept_paused = 0.0
        for s in late:
            self._authenticate(s)  # said nothing in time: closed
        listener, sel = self._listener, self.side._sel
        if resume and listener is not None and sel is not None:
            sel.register(listener, selectors.EVENT_READ, "listener")
            self.accept()

    def close(self) -> None:
        """Close the listener (and unlink its path) and every stranger."""
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
            listener, self._listener = self._listener, None
            path, self._path = self._path, None
        for sock in pending:
            self.side._unregister(sock)
            sock.close()
        if listener is not None:
            self.side._unregister(listener)
            listener.close()
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def abandon(self) -> None:
        for sock in (self._listener, *self._pending):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
