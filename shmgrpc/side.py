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
SHMGRPC_SIDE_UIDS (SO_PEERCRED, read at connect time), and (2) its first
message carries a ticket this side issued, over the gRPC channel, in the
welcome to that very client instance, unexpired and unused. The client
checks SO_PEERCRED of the server the same way. This works across pid
namespaces: no /proc, no pids, no file names.

Then: each side sends each of its memfd segments once on the connection
before the first handle into it, so the descriptor is in the peer's receive
queue before the handle can reach it. A background thread per node reads
every connection: segments are verified (sealed against shrinking, the size
announced, a shmgrpc header) and mapped; EOF means the peer is gone: its
mappings are dropped at once, and slots it was reading are freed.

Message (SOCK_SEQPACKET, one per datagram, 96 bytes, little-endian):

    offset size field
    0      4    magic     b"SGS1"
    4      1    type      1 auth, 2 auth ok, 3 segment (+1 fd), 4 retire
    5      3    reserved
    8      8    segment   the sender's segment number (3, 4)
    16     8    size      bytes of the segment (3)
    24     16   inst      the sender's instance id (1, 2)
    40     16   ticket    the one-time ticket from the welcome (1)
    56     40   reserved
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import re
import secrets
import selectors
import socket
import stat
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple, cast

log = logging.getLogger(__name__)

MSG = struct.Struct("<4sB3xQQ16s16s40x")
MAGIC = b"SGS1"
T_AUTH, T_AUTH_OK, T_SEGMENT, T_RETIRE = 1, 2, 3, 4
TICKET_SECONDS = 30.0  # a welcome's ticket must be used within this
CONNECT_SECONDS = 2.0  # connect + authenticate, at most
ARRIVAL_SECONDS = 1.0  # a handle's segment is in the socket before the handle: only the reader thread's lag
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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


_ids = itertools.count(1)


_SIDE_NAME = re.compile(r"^shmgrpc-\d{1,10}-[0-9a-f]{16}\.sock$")


def reap_side_dir(side_dir: str) -> list:
    """Remove side socket files of ours that nobody listens on any more (a
    server killed before it could close). A live one answers connect()."""
    removed: List[str] = []
    try:
        names = os.listdir(side_dir)
    except OSError:
        return removed
    uid = os.geteuid()
    for name in names:
        if not _SIDE_NAME.match(name):
            continue
        path = os.path.join(side_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not stat.S_ISSOCK(st.st_mode):
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
    """One authenticated side connection to a peer node."""

    def __init__(self, side: "Side", sock: socket.socket, peer_inst: bytes, pid: int, uid: int):
        self.id = next(_ids)  # keys what came over it (pool.Attacher)
        self.side = side
        self.sock = sock
        self.peer_inst = peer_inst
        self.pid = pid  # as seen from here; 0 in another pid namespace
        self.uid = uid
        self.alive = True
        self.ticket = b""  # the ticket this connection was opened with (proves the hello)
        self._send_lock = threading.Lock()  # protects sends and _sent
        self._sent: set = set()  # our segment numbers the peer holds

    def send_segment(self, number: int, size: int, fd: int) -> bool:
        """Pass our segment's descriptor to the peer, once. False if the
        connection is gone (the caller sends inline)."""
        if number in self._sent:
            return True
        with self._send_lock:
            if number in self._sent:
                return True
            if not self.alive:
                return False
            try:
                socket.send_fds(self.sock, [MSG.pack(MAGIC, T_SEGMENT, number, size, self.side.inst, b"")], [fd])
            except OSError:
                self.side.lost(self)
                return False
            self._sent.add(number)
            return True

    def retire(self, number: int) -> None:
        """Tell the peer to unmap a segment we destroyed (best effort)."""
        with self._send_lock:
            if number not in self._sent or not self.alive:
                return
            self._sent.discard(number)
            try:
                self.sock.send(MSG.pack(MAGIC, T_RETIRE, number, 0, self.side.inst, b""), socket.MSG_DONTWAIT)
            except OSError:
                pass


class Side:
    """One node's side channel: its listener (servers), its connections, and
    the thread that reads them.

    `on_segment(conn, number, mm, size)` / `on_retire(conn, number)` /
    `on_lost(conn)` are the node's: they keep the mappings (pool.Attacher)."""

    def __init__(self, inst: bytes, side_dir: str = "", uids=(), on_segment: Optional[Callable] = None,
                 on_retire: Optional[Callable] = None, on_lost: Optional[Callable] = None):
        self.inst = inst
        self.side_dir = side_dir
        self.uids = {os.geteuid(), *uids}
        self._on_segment, self._on_retire, self._on_lost = on_segment, on_retire, on_lost
        self._lock = threading.Lock()  # protects everything below
        self.address: Optional[str] = None
        self._listener: Optional[socket.socket] = None
        self._path: Optional[str] = None
        self._tickets: Dict[bytes, Tuple[bytes, float]] = {}  # ticket -> (client inst, expiry)
        self._conns: Dict[bytes, Conn] = {}  # peer inst -> its live connection
        self._pending: Dict[socket.socket, float] = {}  # accepted, not authenticated: deadline
        self._sel: Optional[selectors.BaseSelector] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False

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
            for key, _ in sel.select(timeout=1.0):
                if key.fileobj is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                elif key.fileobj is self._listener:
                    self._accept()
                elif isinstance(key.data, Conn):
                    self._read(key.data)
                else:
                    self._authenticate(cast(socket.socket, key.fileobj))  # only sockets are registered
            self._expire()

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

    # -- server: listen, tickets, accept

    def listen(self) -> str:
        """Start listening (once); the address a welcome names."""
        with self._lock:
            if self.address is not None:
                return self.address
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            name = f"shmgrpc-{os.getpid()}-{secrets.token_hex(8)}"
            if self.side_dir:
                reap_side_dir(self.side_dir)
                path = os.path.join(self.side_dir, name + ".sock")
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
        self._register(sock, "listener")
        return address

    def issue_ticket(self, client_inst: bytes) -> bytes:
        ticket = secrets.token_bytes(16)
        with self._lock:
            self._tickets[ticket] = (client_inst, time.monotonic() + TICKET_SECONDS)
        return ticket

    def _accept(self) -> None:
        listener, sel = self._listener, self._sel
        if listener is None or sel is None:  # closed since the event
            return
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            with self._lock:
                self._pending[sock] = time.monotonic() + CONNECT_SECONDS
            sel.register(sock, selectors.EVENT_READ, "pending")

    def _authenticate(self, sock: socket.socket) -> None:
        """The first message of an accepted connection: a ticket we issued to
        the instance it names, from a process of an allowed uid."""
        with self._lock:
            self._pending.pop(sock, None)
        self._unregister(sock)
        try:
            data = sock.recv(MSG.size)
            pid, uid, _ = peer_cred(sock)
        except OSError:
            sock.close()
            return
        why = None
        if len(data) != MSG.size:
            why = "malformed first message"
        else:
            magic, kind, _, _, inst, ticket = MSG.unpack(data)
            with self._lock:
                issued = self._tickets.pop(ticket, None) if magic == MAGIC and kind == T_AUTH else None
            if uid not in self.uids:
                why = f"uid {uid} is not allowed (SO_PEERCRED; allowed: {sorted(self.uids)})"
            elif issued is None or not secrets.compare_digest(issued[0], inst) or issued[1] < time.monotonic():
                why = "no valid ticket (it comes only with a welcome over the gRPC channel)"
        if why is not None:
            log.debug("side connection refused: %s", why)
            sock.close()
            return
        # Known before the client hears AUTH_OK: its very next call may carry a
        # hello proved with this ticket.
        conn = Conn(self, sock, inst, pid, uid)
        conn.ticket = ticket
        self._adopt(conn)
        try:
            sock.send(MSG.pack(MAGIC, T_AUTH_OK, 0, 0, self.inst, b""))
        except OSError:
            self.lost(conn)

    def _adopt(self, conn: Conn) -> None:
        with self._lock:
            old = self._conns.get(conn.peer_inst)
            self._conns[conn.peer_inst] = conn
        if old is not None:
            self.lost(old)
        self._register(conn.sock, conn)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [s for s, deadline in self._pending.items() if deadline < now]
            for s in late:
                del self._pending[s]
            for ticket in [t for t, (_, exp) in self._tickets.items() if exp < now]:
                del self._tickets[ticket]
        for s in late:
            self._unregister(s)
            s.close()

    # -- client: connect

    def connect(self, address: str, ticket: bytes, server_inst: bytes) -> Conn:
        """Connect to a server's side socket with the ticket of its welcome.
        Raises OSError (or ConnectionError) when it cannot be used."""
        with self._lock:
            old = self._conns.get(server_inst)
        if old is not None and old.alive:
            return old
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_SECONDS)
            sock.connect("\0" + address[1:] if address.startswith("@") else address)
            pid, uid, _ = peer_cred(sock)
            if uid not in self.uids:
                raise ConnectionError(f"side socket {address} is served by uid {uid}, not an allowed uid")
            sock.send(MSG.pack(MAGIC, T_AUTH, 0, 0, self.inst, ticket))
            data = sock.recv(MSG.size)
            if len(data) != MSG.size:
                raise ConnectionError(f"side socket {address} refused the ticket")
            magic, kind, _, _, inst, _ = MSG.unpack(data)
            if magic != MAGIC or kind != T_AUTH_OK or not secrets.compare_digest(inst, server_inst):
                raise ConnectionError(f"side socket {address} is not the server that welcomed us")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        conn = Conn(self, sock, server_inst, pid, uid)
        conn.ticket = ticket
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
        while conn.alive:
            try:
                data, fds, _, _ = socket.recv_fds(conn.sock, MSG.size, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:  # EOF: the peer is gone
                for fd in fds:
                    os.close(fd)
                self.lost(conn)
                return
            try:
                self._message(conn, data, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def _message(self, conn: Conn, data: bytes, fds) -> None:
        if len(data) != MSG.size:
            log.debug("side message of %d bytes ignored", len(data))
            return
        magic, kind, number, size, inst, _ = MSG.unpack(data)
        if magic != MAGIC or not secrets.compare_digest(inst, conn.peer_inst):
            return
        if kind == T_SEGMENT and len(fds) == 1:
            why = check_sealed(fds[0], size)
            if why is None:
                try:
                    mm = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError) as err:
                    why = f"cannot map it: {err}"
            if why is not None:
                log.debug("segment %d from the side connection refused: %s", number, why)
                return
            if self._on_segment is not None:  # (a Side built without it drops the mapping)
                self._on_segment(conn, number, mm, size)
        elif kind == T_RETIRE and self._on_retire is not None:
            self._on_retire(conn, number)

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
            pending = list(self._pending)
            self._pending.clear()
            listener, self._listener = self._listener, None
            path, self._path = self._path, None
        for conn in conns:
            self.lost(conn)
        for sock in pending:
            sock.close()
        if listener is not None:
            self._unregister(listener)
            listener.close()
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
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
        for sock in (self._listener, self._wake_r, self._wake_w, *self._pending):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._conns.clear()
