"""The engine behind every channel and server: routes, offload, restore.

One Engine per channel wrapper (it knows exactly one peer: the server that
channel talks to) and one per server interceptor. What a process needs only
once, its identity (id segment), pool, pin table, mappings of peers'
segments and the peers it has checked, lives in a Node shared by every
engine of that process with the same pool settings: SHMGRPC_POOL_SIZE is a
cap per process, not per channel. Engines are cheap to build (only the
config is checked); the node is made on first use and closed when its last
engine is closed or collected.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from . import _malloc, cma, pins, pool, session, side, wire
from .config import Config
from ._log import RateLimit, once, repeats
from ._status import (
    SENT_INLINE,
    ChannelStatus,
    Direction,
    PeerStatus,
    Recent,
    cannot_honour,
    carrier,
    cma_fix,
    fallback_words,
    inline_notes,
    peer_json,
    summarize,
)
from ._types import StatsSnapshot
from .errors import DataLossError, HandleError, HandleTooLarge, ShmGrpcError, SlotReclaimed

log = logging.getLogger(__name__)

# The order `auto` tries transports in. memfd and shm are the same slots in
# the same kind of warm mapping (measured alike, README "Transports"); memfd
# comes first because it needs less (no shared /dev/shm, no shared pid
# namespace) and leaves nothing behind. cma is last: its receive buffer is
# fresh memory each time.
AUTO_ORDER = ("memfd", "shm", "cma")
TRANSPORTS = ("memfd", "shm", "cma")

# DEBUG lines about fallbacks: at most one per engine, cause and minute.
_FALLBACK_LOG = RateLimit(60.0)

# Fallbacks of an explicitly configured transport that a configuration change
# fixes: each draws one WARNING per process (_status.cannot_honour). The
# others pass (pool pressure, a side connection being replaced) or have a
# line of their own (over_limit).
_CANNOT_HONOUR = frozenset(("shm_no_space", "memfd_no_space", "pool_too_small", "peer_cannot_read"))


# --- stats --------------------------------------------------------------------


class Stats:
    """Counters of one engine. The process's totals (stats()) are summed
    over every engine's counters when asked for, so that counting costs one
    lock per message, not two."""

    _lock_all = threading.Lock()  # protects _live and _retired
    _live: "weakref.WeakSet[Stats]" = weakref.WeakSet()
    _retired: Dict[Tuple[str, str], int] = collections.Counter()  # counts of Stats gone since
    _notes: Dict[str, str] = {}  # the latest note of every key, process-wide

    def __init__(self, track: bool = True):
        self._lock = threading.Lock()
        # (kind, key) -> count, and (kind, key + ":bytes") -> bytes
        self._counts: Dict[Tuple[str, str], int] = collections.Counter()
        self.notes: Dict[str, str] = {}
        if track:
            with Stats._lock_all:
                Stats._live.add(self)
            weakref.finalize(self, Stats._retire, self._counts, self._lock)

    @staticmethod
    def _retire(counts, lock) -> None:
        with lock:
            final = dict(counts)
        with Stats._lock_all:
            Stats._retired.update(final)

    def add(self, kind: str, key: str, count: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self._counts[(kind, key)] += count
            if nbytes:
                self._counts[(kind, key + ":bytes")] += nbytes

    def add_inline(self, nbytes: int) -> None:
        """add("inline", "all", 1, nbytes): every small message, so kept short."""
        with self._lock:
            counts = self._counts
            counts[_INLINE] += 1
            counts[_INLINE_BYTES] += nbytes

    def note(self, key: str, text: str) -> None:
        self.notes[key] = text
        Stats._notes[key] = text

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        return _snapshot(counts, dict(self.notes))

    @classmethod
    def process_snapshot(cls) -> Dict[str, Any]:
        """Every engine's counters summed, those of engines gone included."""
        with cls._lock_all:
            total = collections.Counter(cls._retired)
            live = list(cls._live)
            notes = dict(cls._notes)
        for one in live:
            with one._lock:
                total.update(one._counts)
        return _snapshot(total, notes)


_INLINE = ("inline", "all")
_INLINE_BYTES = ("inline", "all:bytes")


def _snapshot(counts: Dict[Tuple[str, str], int], notes: Dict[str, str]) -> Dict[str, Any]:
    def pair(kind: str, key: str) -> Dict[str, int]:
        return {"count": counts.get((kind, key), 0), "bytes": counts.get((kind, key + ":bytes"), 0)}

    transports = TRANSPORTS
    return {
        "offloaded": {
            "count": sum(counts.get(("offloaded", t), 0) for t in transports),
            "bytes": sum(counts.get(("offloaded", t + ":bytes"), 0) for t in transports),
        },
        "restored": {
            "count": sum(counts.get(("restored", t), 0) for t in transports),
            "bytes": sum(counts.get(("restored", t + ":bytes"), 0) for t in transports),
        },
        "by_transport": {
            t: {"offloaded": pair("offloaded", t), "restored": pair("restored", t)}
            for t in transports
        },
        "inline": pair("inline", "all"),
        "fallbacks": {k: v for (kind, k), v in counts.items() if kind == "fallback"},
        "errors": {k: v for (kind, k), v in counts.items() if kind == "error"},
        "notes": notes,
    }


_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def stats() -> StatsSnapshot:
    """Process-wide counters, plus the peers and pools of live engines."""
    snap = Stats.process_snapshot()
    snap["peers"] = [record for engine in list(_ENGINES) for record in engine.peer_records()]
    total = {"capacity": 0, "bytes_mapped": 0, "bytes_in_use": 0, "segments": 0, "cma_pinned": 0}
    with Node._lock:
        nodes = list(Node._nodes.values())
    for node in nodes:
        for key, value in node.pool_stats().items():
            total[key] += value
    snap["pool"] = total
    return snap  # type: ignore[return-value]  # the StatsSnapshot shape (see _types.py)


# --- routes -------------------------------------------------------------------


_LETTER = {"memfd": "m", "shm": "s", "cma": "c"}  # a transport's letter in a hello's or welcome's accepts


def _rungs(accepts: str) -> str:
    """Hello / welcome 'accepts' letters in words: 'smc' -> 'shm, memfd, cma'."""
    names = {"m": "memfd", "s": "shm", "c": "cma"}
    return ", ".join(names[c] for c in "msc" if c in accepts) or "nothing"


@dataclass
class Route:
    """What we know about the other side of a call: who it is, and how we may
    send it large messages.

    Every call that carries a route is *framed*: each message in both
    directions is a frame (a handle, or the message escaped if it merely
    begins like one; see wire.py). The client frames a call whose hello names
    a server; the server frames a call whose hello names one (any one: after
    a reconnect the hello may name another process of the same host)."""

    peer: Optional[session.Peer]  # None: framed, but the peer's id segment cannot be read
    send_shm: bool
    send_cma: bool
    peer_key: Optional[bytes]  # the key the peer issued for our cma entries
    send_memfd: bool = False  # over the side connection to the peer's node
    max_receive: int = wire.UNLIMITED  # the peer's receive limit: nothing longer is offloaded
    framed: bool = True  # server: the hello named a server, so the client frames this call
    side_conn: Optional[int] = None  # server: the peer's side connection (id, 0 none) when made; None: no memfd
    welcome: Optional[Tuple[str, str]] = None  # server: trailing metadata, if the client needs it
    peer_accepts: str = ""  # what the peer reads (its hello's or welcome's accepts): its own transports
    # What the large messages of this route did, each way (see _status.py).
    sent: Recent = field(default_factory=Recent, repr=False, compare=False)
    received: Recent = field(default_factory=Recent, repr=False, compare=False)

    @property
    def offloads(self) -> bool:
        return self.send_shm or self.send_cma or self.send_memfd

    def sends(self, transport: str) -> bool:
        return getattr(self, "send_" + transport)


def parses_views(deserializer: Callable) -> bool:
    """True if `deserializer` takes a memoryview as it takes bytes, so the
    payload is parsed straight out of shared memory (one copy fewer, and
    1 MiB less fresh memory per MiB received): a protobuf Message.FromString,
    or one of shmgrpc's own pass-through wrappers of one (PARSES_VIEWS set)."""
    marked = getattr(deserializer, PARSES_VIEWS, None)
    if marked is not None:
        return marked
    owner = getattr(deserializer, "__self__", None)
    return isinstance(owner, type) and hasattr(owner, "DESCRIPTOR") and deserializer.__name__ == "FromString"


# The attribute by which a wrapper that hands its argument on untouched says
# whether what it wraps parses views (parses_views).
PARSES_VIEWS = "_shmgrpc_parses_views"


# gRPC's defaults (grpc/_cython/_cygrpc/... GRPC_DEFAULT_MAX_RECV_MESSAGE_LENGTH):
# a channel or server that was given no options receives at most 4 MiB and
# sends without limit.
GRPC_DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024


def limits_from_options(options) -> Tuple[int, int]:
    """(max send, max receive) in bytes, -1 unlimited, as gRPC reads them from
    channel or server options."""
    send, receive = wire.UNLIMITED, GRPC_DEFAULT_MAX_RECEIVE
    for key, value in options or ():
        if key == "grpc.max_send_message_length":
            send = _limit(value)
        elif key == "grpc.max_receive_message_length":
            receive = _limit(value)
    return send, receive


# grpc/src/core/.../retry_filter: a call is committed (never retried) once
# the messages it sent would overflow this buffer; channel argument
# grpc.per_rpc_retry_buffer_size, default 256 KiB.
GRPC_DEFAULT_RETRY_BUFFER = 256 * 1024


def retry_buffer_from_options(options) -> int:
    """How many bytes of requests a call may send and still be retried by
    plain gRPC (0: retries are off, grpc.enable_retries=0)."""
    size, enabled = GRPC_DEFAULT_RETRY_BUFFER, True
    for key, value in options or ():
        if key == "grpc.per_rpc_retry_buffer_size":
            size = max(0, int(value))
        elif key == "grpc.enable_retries":
            enabled = bool(int(value))
    return size if enabled else 0


def _limit(value) -> int:
    value = int(value)
    return wire.UNLIMITED if value < 0 else value


def within(n: int, limit: int) -> bool:
    return limit < 0 or n <= limit


class Node:
    """What one process shares between its engines of the same pool settings:
    identity (the id segment), pool, pin table, mappings of peers' segments,
    receive buffers and the peers it has checked.

    Made by the first engine that needs it (reaping what exited processes
    left behind), closed (everything it created unlinked) when its last
    engine is closed or collected, and at exit."""

    _lock = threading.Lock()  # protects _nodes and every node's _users
    _nodes: "Dict[Tuple, Node]" = {}

    def __init__(self, config: Config, key: Tuple, named: bool = True):
        self.key = key
        self.config = config
        self._users = 0
        self._setup_lock = threading.Lock()  # protects lazy pool / pins creation
        self.identity: Optional[session.Identity] = None
        self.attacher: Optional[pool.Attacher] = None
        self.pool: Optional[pool.Pool] = None
        self.pins: Optional[pins.Pins] = None
        self.buffers = pins.Buffers(config.cma_max_pinned)
        self.cma_syscall = cma.available()
        self.memfd_ok = side.available()
        self.side: Optional[side.Side] = None
        self.peers: "collections.OrderedDict[bytes, session.Peer]" = collections.OrderedDict()
        self.peers_lock = threading.Lock()  # protects peers
        self.shm_problem = ""  # why shm and cma are out (no id segment), if they are
        shm_dir = config.shm_dir
        if not named:
            self.shm_problem = "SHMGRPC_TRANSPORT=memfd: no id segment"
        elif not os.path.isdir(shm_dir):
            self.shm_problem = f"no shared-memory directory {shm_dir}"
        else:
            pool.reap(shm_dir)
            try:
                self.identity = session.Identity(shm_dir)
            except pool.NoSpace as err:
                self.shm_problem = str(err)
        if self.identity is None:
            # memfd needs no shm directory: the process proves itself over
            # its side connection instead.
            self.identity = session.Identity(shm_dir, named=False)
        # The receive limit is the engine's (it knows its gRPC options); the
        # attacher only refuses what no engine here could accept.
        self.attacher = pool.Attacher(shm_dir, config.max_message)

    @classmethod
    def acquire(cls, config: Config, named: bool = True) -> "Node":
        """The node for these settings; `named`: with an id segment (shm and
        cma need one; a memfd-only process writes nothing to any shm dir)."""
        key = (config.shm_dir, config.pool_size, config.segment_size, config.max_message,
               config.lease_seconds, config.cma_max_pinned, config.peer_share, config.side_dir, config.side_uids,
               named)
        with cls._lock:
            node = cls._nodes.get(key)
            if node is None:
                node = cls._nodes[key] = Node(config, key, named)
            node._users += 1
            return node

    def release(self) -> None:
        """One engine is done with this node; the last one closes it."""
        with Node._lock:
            self._users -= 1
            if self._users > 0:
                return
            if Node._nodes.get(self.key) is self:
                del Node._nodes[self.key]
        self.close()

    def get_pool(self) -> pool.Pool:
        if self.pool is None:
            with self._setup_lock:
                if self.pool is None:
                    assert self.identity is not None
                    c = self.config
                    self.pool = pool.Pool(c.shm_dir, c.pool_size, c.segment_size, c.lease_seconds,
                                          self.identity.inst, peer_share=c.peer_share)
                    self._start_janitor()
        return self.pool

    JANITOR_SECONDS = 5.0  # how often idle segments, retired mappings, late acks are looked at

    def _start_janitor(self) -> None:
        """A daemon thread that, every JANITOR_SECONDS, gives back idle pool
        segments (pool.IDLE_SECONDS), unpins cma payloads their readers are
        done with, and drops mappings of peers' retired or orphaned segments,
        so an idle process shrinks too. It holds no reference to the node,
        and stops when the node is closed."""
        stop = self._stop = threading.Event()
        node_ref = weakref.ref(self)

        def run():
            while not stop.wait(self.JANITOR_SECONDS):
                node = node_ref()
                if node is None:
                    return
                try:
                    if node.pool is not None:
                        node.pool.trim_idle()
                    if node.attacher is not None:
                        node.attacher.maybe_trim()
                    if node.pins is not None:
                        node.pins.reclaim()
                except Exception:  # never let housekeeping kill anything
                    log.debug("janitor pass failed", exc_info=True)
                del node

        threading.Thread(target=run, name="shmgrpc-janitor", daemon=True).start()

    def get_pins(self) -> pins.Pins:
        if self.pins is None:
            with self._setup_lock:
                if self.pins is None:
                    c = self.config
                    self.pins = pins.Pins(c.cma_max_pinned, c.lease_seconds, peer_share=c.peer_share)
        return self.pins

    def get_side(self) -> Optional[side.Side]:
        """The side channel (memfd), made on first use; None where memfd
        cannot work."""
        if self.side is None and self.memfd_ok and self.identity is not None:
            with self._setup_lock:
                if self.side is None:
                    c = self.config
                    self.side = side.Side(self.identity.inst, c.side_dir, c.side_uids, self._segment_arrived,
                                          self._segment_retired, self._conn_lost, peer_bytes=c.pool_size)
        return self.side

    def _segment_arrived(self, conn, number: int, mm, size: int) -> bool:
        attacher = self.attacher
        if attacher is None:
            mm.close()
            return False
        if not attacher.add_memfd((conn.id, number), mm, size):
            log.debug("memfd segment %d from the side connection is not a shmgrpc segment", number)
            return False
        return True

    def _segment_retired(self, conn, number: int) -> None:
        if self.attacher is not None:
            self.attacher.drop_memfd(conn.id, number)

    def _conn_lost(self, conn) -> None:
        """A side connection closed: the peer is gone (or replaced). Unmap
        what it sent us and free what it was reading, now."""
        if self.attacher is not None:
            self.attacher.drop_memfd(conn.id)
        if self.pool is not None:
            self.pool.reclaim()

    def pool_stats(self) -> Dict[str, int]:
        out = {"capacity": 0, "bytes_mapped": 0, "bytes_in_use": 0, "segments": 0, "cma_pinned": 0}
        if self.pool is not None:
            s = self.pool.stats()
            out.update(capacity=s.capacity, bytes_mapped=s.bytes_mapped,
                       bytes_in_use=s.bytes_in_use, segments=s.segments)
        if self.pins is not None:
            out["cma_pinned"] = self.pins.pinned_bytes
        return out

    def peer(self, inst: bytes, id_segment: str, probe_cma: bool) -> session.Peer:
        """The peer `inst`, its id segment opened and checked (cached)."""
        if id_segment == session.NO_SEGMENT:
            raise HandleError("the peer has no id segment (no shared shm directory)")
        if self.identity is None or not self.identity.named:
            raise HandleError(f"no id segment here ({self.shm_problem})")
        with self.peers_lock:
            peer = self.peers.get(inst)
            if peer is not None and peer.id_segment == id_segment:
                self.peers.move_to_end(inst)
                if peer.cma_probed or not probe_cma:
                    return peer
        if peer is None or peer.id_segment != id_segment:
            peer = session.read_peer(self.config.shm_dir, id_segment, inst)
        if probe_cma and not peer.cma_probed:
            if self.cma_syscall:
                peer.cma_reason = cma.probe(peer.pid, peer.probe_addr, peer.inst)
            else:
                peer.cma_reason = "process_vm_readv is not available on this platform"
            peer.cma_probed = True
        with self.peers_lock:
            self.peers[inst] = peer
            while len(self.peers) > 1024:  # a server sees many clients over its life
                self.peers.popitem(last=False)
        return peer

    def close(self) -> None:
        """Unlink and unmap everything this node created. Safe to call twice."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        parts = (self.side, self.pool, self.pins, self.identity, self.attacher)
        self.side = self.pool = self.pins = self.identity = self.attacher = None
        for part in parts:
            if part is not None:
                part.close()

    def abandon(self) -> None:
        """In a forked child: the parent owns these; drop them untouched."""
        if self.side is not None:
            self.side.abandon()
            self.side = None
        if self.pool is not None:
            self.pool.abandon()
        if self.identity is not None:
            self.identity.abandon()
        self.pool = self.pins = self.identity = self.attacher = None

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            nodes, cls._nodes = list(cls._nodes.values()), {}
        for node in nodes:
            node.close()

    @classmethod
    def after_fork_in_child(cls) -> None:
        cls._lock = threading.Lock()
        nodes, cls._nodes = list(cls._nodes.values()), {}
        for node in nodes:
            node.abandon()


atexit.register(Node.close_all)


class _Released:
    """The finalizer's view of an engine: releases its node once."""

    __slots__ = ("node",)

    def __init__(self):
        self.node: Optional[Node] = None

    def __call__(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            node.release()


class Engine:
    def __init__(self, config: Optional[Config], role: str, options=None, name: str = ""):
        self.config = Config.from_env() if config is None else config
        if self.config.malloc == "keep":
            _malloc.tune_malloc()
        self.role = role
        self.name = name  # for log lines: the channel's target, or "server"
        self.max_send, self.max_receive = limits_from_options(options)
        self.retry_buffer = retry_buffer_from_options(options)
        self.stats = Stats()
        self._lock = threading.Lock()  # protects setup, routes, hello, probe state
        self._state = "new"  # new -> ready | disabled; closed
        self._why = ""  # why offload is off (disabled, plain peer), for status and logs
        self._node: Optional[Node] = None
        self._released = _Released()
        self._finalizer = weakref.finalize(self, self._released)
        self._welcomes: Dict[str, Route] = {}  # client: welcome text -> route
        self._server_routes: "collections.OrderedDict[str, Optional[Route]]" = collections.OrderedDict()
        self._route: Optional[Route] = None  # client: the server last heard from
        self._hello: Optional[Tuple[Tuple[str, str], Optional[Route]]] = None
        self._probe = "todo"  # client: todo (no answer yet) -> done (a welcome came) | plain
        self._order = self._transport_order()
        # The configuration names one transport: not being able to use it is
        # worth a WARNING (under auto the next rung serves, quietly).
        self._explicit = self.config.transport not in ("auto", "off")
        self._announced: Optional[str] = None  # client: the status last logged
        self._limit_noted = False
        _ENGINES.add(self)

    # -- set-up and tear-down

    def _transport_order(self) -> Tuple[str, ...]:
        t = self.config.transport
        return () if t == "off" else AUTO_ORDER if t == "auto" else (t,)

    @property
    def transport(self) -> str:
        return self.config.transport

    @property
    def transports(self) -> Tuple[str, ...]:
        """The rungs in effect. A client: towards its server now (empty before
        the handshake, or when plain). A server: what it may use at all."""
        if self.role == "client":
            return self.status().transports
        if self._state not in ("new", "ready"):
            return ()
        node = self._node
        if node is not None and not node.cma_syscall:
            return tuple(t for t in self._order if t != "cma")
        return self._order

    def offload_limit(self) -> int:
        """The largest message this side accepts as a handle, told to the
        peer in the handshake: its gRPC receive limit and SHMGRPC_MAX_MESSAGE.
        A peer sends anything larger inline (where only gRPC's limit applies)."""
        limit = self.config.max_message
        return limit if self.max_receive < 0 else min(limit, self.max_receive)

    def ready(self) -> bool:
        if self._state == "ready":
            return True
        if self._state != "new":
            return False
        with self._lock:
            if self._state == "new":
                self._setup_locked()
        return self._state == "ready"

    def _setup_locked(self) -> None:
        if not self._order:
            self._disable("SHMGRPC_TRANSPORT=off", level=logging.DEBUG)
            return
        node = Node.acquire(self.config, named=self._order != ("memfd",))
        self._released.node = node
        order = self._order
        if "memfd" in order and not node.memfd_ok:
            order = tuple(t for t in order if t != "memfd")
            self.stats.note("memfd", "not available here (memfd_create, SCM_RIGHTS or SO_PEERCRED missing)")
        assert node.identity is not None  # a node has one until it is closed
        if not node.identity.named and ("shm" in order or "cma" in order):
            # shm and cma both start from the peer opening our id segment
            order = tuple(t for t in order if t == "memfd")
            self.stats.note("shm", f"not available: {node.shm_problem}")
        if not order:
            self._disable(node.shm_problem or "no transport available")
            return
        self._order = order
        self._node = node
        if "cma" in self._order and not node.cma_syscall:
            self._cma_unavailable("process_vm_readv is not available on this platform")
        self._state = "ready"

    def _disable(self, why: str, level: int = logging.INFO) -> None:
        self._state = "disabled"
        self._why = why
        self.stats.note("disabled", why)
        log.log(level, "offload disabled (%s); plain gRPC only", why)

    def _cma_unavailable(self, why: str, peer: Optional[session.Peer] = None) -> None:
        """Record (once: stats note, one log line) why cma cannot be used:
        `why` this process may not read `peer` (None: cma is unavailable here).

        A failed probe of one peer only means we cannot read *that* peer: our
        accepts for it drop "c", so it sends us shm or inline. A WARNING (one
        per process) only when cma was asked for explicitly, saying which way
        goes inline and what to change; under `auto` the next rung serves."""
        if "cma" not in self._order or "cma" in self.stats.notes:
            return
        text = f"cannot read pid {peer.pid}: {why}" if peer is not None else why
        self.stats.note("cma", f"not permitted: {text}")
        if self._order == ("cma",):
            if not once(("cma_unavailable", self.role, peer is None)):
                return
            if peer is None:
                log.warning("SHMGRPC_TRANSPORT=cma cannot be honoured: %s, so large messages go inline. Set "
                            "SHMGRPC_TRANSPORT=memfd or shm", why)
                return
            theirs, who = ("responses", "server") if self.role == "client" else ("requests", "client")
            ours = "requests" if theirs == "responses" else "responses"
            log.warning("SHMGRPC_TRANSPORT=cma cannot be honoured for %s: this process may not read %s pid %d "
                        "(%s), so the %s sends its large %s inline (%s still go via cma where it may read this "
                        "process). To change it: %s", theirs, who, peer.pid, why, who, theirs, ours, cma_fix(why))
        else:
            others = " or ".join(t for t in self._order if t != "cma")
            log.info("cma not permitted (%s); %s carries large messages where it can", text, others)

    @property
    def node(self) -> Optional[Node]:
        return self._node

    def pool_stats(self) -> Dict[str, int]:
        node = self._node
        if node is None:
            return {"capacity": 0, "bytes_mapped": 0, "bytes_in_use": 0, "segments": 0, "cma_pinned": 0}
        return node.pool_stats()

    def close(self) -> None:
        """Let go of the node (the last engine closes it: everything it
        created is unlinked). Safe to call twice; calls after it go plain."""
        with self._lock:
            self._state = "closed"
            self._why = "closed"
            self._route, self._hello, self._node = None, None, None
        self._finalizer()

    def _after_fork_in_child(self) -> None:
        # The parent still owns the node's segments (Node.after_fork_in_child
        # drops them untouched); this engine makes a new node on first use.
        self._lock = threading.Lock()
        self._released.node = None
        self._node = None
        self._welcomes.clear()
        self._server_routes.clear()
        self._route, self._hello = None, None
        self._probe = "todo"
        self._order = self._transport_order()
        if self._state == "ready":
            self._state = "new"

    # -- peers

    def _peer(self, inst: bytes, id_segment: str) -> session.Peer:
        assert self._node is not None
        peer = self._node.peer(inst, id_segment, probe_cma="cma" in self._order)
        if "cma" in self._order and peer.cma_reason is not None:
            self._cma_unavailable(peer.cma_reason, peer)
        return peer

    def _accepts(self, peer: Optional[session.Peer]) -> str:
        """What we can read from `peer` (None: a first contact, not known yet).
        shm and cma need its id segment opened; memfd needs nothing more."""
        order = self._order
        shm = "s" if "shm" in order and (peer is None or peer.named) else ""
        cma_ok = "c" if peer is not None and peer.named and "cma" in order and peer.cma_reason is None else ""
        memfd = "m" if "memfd" in order else ""
        return shm + cma_ok + memfd

    # -- client: route and status

    @property
    def plain(self) -> bool:
        """A client whose calls go as gRPC's own, hello-less: the server has
        no shmgrpc (or cannot prove it shares this host), or offload is off."""
        return self._probe == "plain" or self._state in ("disabled", "closed")

    def client_call_state(self) -> Optional[Tuple[Tuple[str, str], Optional[Route]]]:
        """(hello metadata, route) for one call, taken together, or None when
        the call goes plain (no hello at all). Responses of a call are read
        against the route its hello named, even if another call moves the
        channel to another server meanwhile."""
        if self._probe == "plain" or not self.ready():
            return None
        route = self._route
        if route is not None and route.send_memfd and self._side_lost(route):
            # Our side connection to the server closed (it restarted, or the
            # connection broke): forget the route; the next call that carries
            # the hello gets a new welcome (a new ticket). Until then, inline.
            with self._lock:
                if self._route is route:
                    self._route, self._hello = None, None
                    self._probe = "todo" if self._probe == "done" else self._probe
            self.stats.note("memfd", "side connection to the server closed; the next call learns the route again")
        state = self._hello
        if state is None:
            node = self._node
            if node is None or node.identity is None:
                return None
            identity = node.identity
            route = self._route
            peer = route.peer if route else None
            accepts = self._accepts(peer)
            text = wire.encode_hello(
                wire.Hello(
                    inst=identity.inst,
                    id_segment=identity.name,
                    accepts=accepts,
                    server_inst=peer.inst if peer else None,
                    proof=session.proof(peer.secret, session.LABEL_HELLO, identity.inst) if peer else None,
                    cma_key=identity.cma_key_for(peer.inst) if peer and "c" in accepts else None,
                    max_receive=self.offload_limit(),
                )
            )
            state = self._hello = ((wire.HELLO_KEY, text), route)
            log.debug("%s: hello: we read %s%s", self.name, _rungs(accepts),
                      f"; naming server pid {peer.pid}" if peer is not None else "; first contact")
        return state

    def _side_lost(self, route: Route) -> bool:
        node = self._node
        side_ = node.side if node is not None else None
        return side_ is None or route.peer is None or side_.conn_for(route.peer.inst) is None

    def client_answered(self, ok: bool, trailing_metadata, first_contact: bool) -> None:
        """A call that carried the hello has ended: learn from its trailers.

        There is no handshake call: a channel learns its route from the
        trailing metadata of the first calls that carry the hello. A shmgrpc
        server answers a hello that does not name it with a welcome, on every
        call it serves (the welcome travels with the status, failures too).
        So a first-contact call that ended OK without one reached a server
        without shmgrpc, or one that cannot prove it shares this host: the
        channel stays plain. A call that failed without one (refused before
        it reached a handler: auth, an unknown method, a transient error)
        says nothing; the next call that carries the hello asks again."""
        if trailing_metadata is None:
            # Not gRPC's call: an interceptor answered with an object of its
            # own (grpc.aio's UnaryUnaryCallResponse has no metadata). It
            # says nothing about the server.
            return
        welcomed = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY) is not None
        if welcomed:
            self.client_welcome(trailing_metadata)
        if not (ok and first_contact and self._route is None and self._probe == "todo"):
            return
        if welcomed:  # a shmgrpc server, but we can reach none of its transports
            self._go_plain(self.stats.notes.get("not_colocated") or "the server's welcome names nothing we can reach")
        else:
            self._go_plain("the server answered our hello without a welcome: it has no shmgrpc, "
                           "or it cannot prove it shares this host (different host, shm namespace or uid)")

    def _go_plain(self, why: str) -> None:
        with self._lock:
            self._probe = "plain"
            self._why = why
            self._route, self._hello = None, None
        self.stats.note("server", why)
        self._announce()

    def client_lost_peer(self, why: str) -> None:
        """A framed call reached a server without shmgrpc (a channel balancing
        over a mix, or the server was replaced): plain from now on."""
        self.stats.add("fallback", "peer_without_shmgrpc")
        self._go_plain(why)

    def new_welcome(self, trailing_metadata) -> bool:
        """Do these trailers carry a welcome this channel has not learned
        from yet? Learning one may wait for the server (its side socket's
        answer, CONNECT_SECONDS at most): grpc.aio learns it in a thread."""
        if trailing_metadata is None:
            return False
        text = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY)
        return text is not None and text not in self._welcomes

    def client_welcome(self, trailing_metadata) -> None:
        """Take the server's welcome from a call's trailing metadata, if any.

        The server sends one only when our hello did not name it or did not
        prove we read its id segment: the handshake, a reconnect to another
        server process, a server restart."""
        text = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY)
        if text is None or self._state != "ready":
            return
        route = self._welcomes.get(text)
        if route is None:
            route = self._route_from_welcome(text)
            if route is None:
                return
            with self._lock:
                if len(self._welcomes) > 256:
                    self._welcomes.clear()
                self._welcomes[text] = route
        if route is not self._route:
            with self._lock:
                if self._probe == "plain":
                    return
                self._route, self._hello = route, None
                self._probe = "done"
            self._announce()

    def _route_from_welcome(self, text: str) -> Optional[Route]:
        node = self._node
        if node is None or node.identity is None:
            return None
        try:
            w = wire.decode_welcome(text)
        except ShmGrpcError as err:
            self._not_colocated(err)
            return None
        peer = None
        try:
            peer = self._peer(w.inst, w.id_segment)
        except ShmGrpcError as err:
            if w.side is None:
                self._not_colocated(err)
                return None
        conn = None
        if w.side is not None and w.ticket is not None and "memfd" in self._order and "m" in w.accepts:
            side_ = node.get_side()
            try:
                conn = side_.connect(w.side, w.ticket, w.inst) if side_ is not None else None
            except (OSError, ConnectionError) as err:
                self.stats.note("memfd", f"side socket {w.side}: {err}")
                log.debug("%s: cannot use the side socket %s: %s", self.name, w.side, err)
        if peer is None:
            if conn is None:
                self._not_colocated(HandleError("neither the server's id segment nor its side socket is reachable"))
                return None
            # The connection's own ticket: it may be an earlier channel's,
            # reused (one side connection per pair of processes).
            peer = session.side_peer(w.inst, conn.ticket, conn.pid)
        # The server read our id segment (proof), so it reads our shm slots.
        proved = peer.named and session.proved(node.identity.secret, session.LABEL_WELCOME, w.inst, w.proof)
        route = Route(
            peer=peer,
            send_shm=proved and "s" in w.accepts and "shm" in self._order,
            send_cma=proved and "c" in w.accepts and w.cma_key is not None and "cma" in self._order,
            send_memfd=conn is not None,
            peer_key=w.cma_key,
            max_receive=w.max_receive,
            peer_accepts=w.accepts,
        )
        log.debug("%s: welcome from server pid %d: it reads %s; id segment proof %s, side connection %s; "
                  "we send via %s", self.name, peer.pid, _rungs(w.accepts), "ok" if proved else "none",
                  "up" if conn is not None else "none",
                  ", ".join(t for t in self._order if route.sends(t)) or "nothing (inline)")
        return route

    def _not_colocated(self, err: Exception) -> None:
        self.stats.add("fallback", "peer_not_colocated")
        if "not_colocated" not in self.stats.notes:
            self.stats.note("not_colocated", str(err))
            log.debug("%s: peer is not co-located (%s)", self.name, err)

    def status(self) -> ChannelStatus:
        """This channel's ChannelStatus (see there)."""
        if self._state == "disabled" or self._state == "closed":
            return ChannelStatus("inline", (), f"offload is off: {self._why}", True)
        if self._probe == "plain":
            return ChannelStatus("inline", (), self._why, True)
        route = self._route
        if route is None:
            pending = self._probe != "done"
            why = self.stats.notes.get("server") or (
                "no answer yet: the channel learns its route from the first call that may carry a large message")
            if not pending:
                why = self.stats.notes.get("not_colocated", "the server did not prove co-location")
            return ChannelStatus("inline", (), why, not pending)
        transport, rungs, why, sent, received = self._route_status(route)
        return ChannelStatus(transport, rungs, why, True, sent, received)

    # -- what large messages did, per route and direction (see _status.py)

    def _route_status(self, route: Route) -> Tuple[str, Tuple[str, ...], str, Direction, Direction]:
        """(transport, rungs, reason, sent, received) of a route: what its
        large messages did each way, or before any, what it expects."""
        rungs = tuple(t for t in self._order if route.sends(t))
        notes = self.stats.notes
        expected = self._expect_sent(route, rungs)

        def why_sent(outcome: str) -> Tuple[str, str]:
            if outcome == "peer_cannot_read":  # the route says which transport the peer does not take, and why
                return outcome, f"peer_cannot_read: {self._expect_sent(route, ())[1]}"
            return outcome, fallback_words(outcome, self.config, notes)

        sent = summarize(route.sent, expected, why_sent)
        received = summarize(route.received, self._expect_received(route),
                             lambda outcome: self._why_received_inline(route, outcome, sent))
        peer = route.peer
        why = "co-located " + self._peer_words(route)
        if peer is not None and not peer.named:
            why += " (known by its side connection; no shared shm directory in use)"
        skipped = [t for t in self._order if t not in rungs]
        if skipped and rungs:
            why += "; " + ", ".join(f"{t} unavailable" for t in skipped)
            if "cma" in skipped and "cma" in notes:
                why += f" ({notes['cma']})"
        why += inline_notes(sent, received) if self.role == "client" else inline_notes(received, sent)
        return carrier(sent, received), rungs, why, sent, received

    def _peer_words(self, route: Route) -> str:
        who = "server" if self.role == "client" else "client"
        pid = self._peer_pid(route)
        return f"{who} pid {pid}" if pid else who

    def _peer_pid(self, route: Route) -> Optional[int]:
        """The peer's pid as seen here: from its id segment, else from its
        side connection (SO_PEERCRED); None in another pid namespace."""
        peer = route.peer
        if peer is None:
            return None
        if peer.pid:
            return peer.pid
        node = self._node
        conn = node.side.conn_for(peer.inst) if node is not None and node.side is not None else None
        return conn.pid if conn is not None and conn.pid else None

    def _expect_sent(self, route: Route, rungs: Tuple[str, ...]) -> Tuple[str, str]:
        """(the first rung a large message to the peer tries, "") or ("inline", why)."""
        if rungs:
            return rungs[0], ""
        who = self._peer_words(route)
        whys = []
        for t in self._order:
            if _LETTER[t] not in route.peer_accepts:
                whys.append(f"{t}: {who} does not accept it from this process"
                            + (" (it may not read this process, or does not use cma: its own status says which)"
                               if t == "cma" else ""))
            else:
                whys.append(f"{t}: {self.stats.notes.get(t) or 'not usable with this peer'}")
        return "inline", "; ".join(whys) or "no transport in effect"

    def _expect_received(self, route: Route) -> Tuple[str, str]:
        """(the transport the peer's large messages are expected by, "") or
        ("inline", why not one): what we read from the peer, and what its
        handshake says it uses. (A peer whose accepts lack "c" may still
        send cma: it may use cma but be unable to read us.)"""
        peer = route.peer
        ours = self._accepts(peer)
        who = self._peer_words(route)
        whys = []
        for t in self._order:
            if _LETTER[t] not in ours:
                whys.append(f"{t}: {self._why_unreadable(t, peer, who)}")
            elif t == "memfd" and not route.send_memfd:
                whys.append(f"memfd: no side connection with {who}"
                            + (f" ({self.stats.notes['memfd']})" if "memfd" in self.stats.notes else ""))
            elif t != "cma" and _LETTER[t] not in route.peer_accepts:
                whys.append(f"{t}: {who} does not use it")
            else:
                return t, ""
        return "inline", "; ".join(whys) or "no transport in effect"

    def _why_unreadable(self, transport: str, peer: Optional[session.Peer], who: str) -> str:
        if peer is None or not peer.named:
            return f"this process cannot open the id segment of {who} (no shared shm directory)"
        if transport == "cma" and peer.cma_reason is not None:
            return f"this process may not read {who} ({peer.cma_reason})"
        return self.stats.notes.get(transport) or "not available here"

    def _why_received_inline(self, route: Route, outcome: str, sent: Direction) -> Tuple[str, str]:
        """(reason code, words): why a large message came inline, as far as
        this side knows: a peer that sent it inline because we cannot read
        what it has is peer_cannot_read there."""
        if outcome == "over_limit":
            return outcome, ("over_limit: above what this side accepts offloaded (its gRPC "
                             "max_receive_message_length and SHMGRPC_MAX_MESSAGE): gRPC accepts or refuses it inline")
        if outcome != SENT_INLINE:
            return outcome, fallback_words(outcome, self.config, self.stats.notes)
        via, why = self._expect_received(route)
        if via == "inline":
            return "peer_cannot_read", why
        who = self._peer_words(route)
        text = (f"{who} sent them inline: below its SHMGRPC_THRESHOLD or SHMGRPC_CMA_THRESHOLD, or a fallback; "
                "its own status says which")
        if sent.inline and sent.messages:
            text += f"; this side's own large messages go inline too ({sent.fallback})"
        return outcome, text

    def peer_statuses(self) -> List[PeerStatus]:
        """A server's PeerStatus of each client route it has framed calls of,
        the newest first; a channel's, of its server."""
        if self._state != "ready":
            return []
        if self.role == "client":
            route = self._route
            routes = [route] if route is not None else []
        else:
            with self._lock:
                known = list(self._server_routes.values())
            routes = [r for r in reversed(known) if r is not None and r.framed and r.peer is not None]
        out = []
        for route in routes:
            transport, rungs, why, sent, received = self._route_status(route)
            out.append(PeerStatus(self._peer_words(route), self._peer_pid(route), transport, rungs, why, sent,
                                  received))
        return out

    def peer_records(self) -> List[Dict[str, Any]]:
        """stats()["peers"]: peer_statuses() as plain data."""
        return [peer_json(self.name, p.peer, p.pid, p.transport, p.reason, p.sent, p.received)
                for p in self.peer_statuses()]

    def _announce(self) -> None:
        """One INFO line when the channel settles, one WARNING when a channel
        that was offloading stops; nothing when nothing changed."""
        st = self.status()
        if st.transport == self._announced:
            return
        was = self._announced
        self._announced = st.transport
        if st.transport == "inline" and was not in (None, "inline"):
            log.warning("channel %s no longer offloads (was %s): %s", self.name, was, st.reason)
        else:
            log.info("channel %s: %s (%s)", self.name,
                     f"large messages via {st.transport}" if st.transport != "inline" else "plain gRPC",
                     st.reason)

    # -- server handshake

    def server_route(self, text: Optional[str]) -> Optional[Route]:
        """Check the client's hello (the value of its HELLO_KEY metadata);
        None means step aside (plain gRPC).

        Routes are cached by hello text: after the first call of a client,
        this is one dict lookup."""
        if text is None or not self.ready():
            return None
        attacher = self._node.attacher if self._node is not None else None
        if attacher is not None:
            attacher.maybe_trim()  # clients come and go: let their segments go too
        route = self._server_routes.get(text)
        if route is not None and (route.side_conn is None or route.side_conn == self._side_conn_id(route)):
            return route
        if route is None and text in self._server_routes:
            return None  # a hello we decided to step aside for
        route = self._server_route(text)
        if route is not None and route.peer is None and route.framed:
            return route  # refused (cannot verify it): not cached, the next call looks again
        with self._lock:
            self._server_routes[text] = route
            while len(self._server_routes) > 1024:
                self._server_routes.popitem(last=False)
        return route

    def _side_conn_id(self, route: Route) -> int:
        """The id of the side connection the route's peer has now (0: none):
        a cached route is good only while it has not changed."""
        node = self._node
        if route.peer is None or node is None or node.side is None:
            return 0
        return self._side_conn_id_of(node.side, route.peer.inst)

    @staticmethod
    def _side_conn_id_of(side_, inst: bytes) -> int:
        conn = side_.conn_for(inst)
        return conn.id if conn is not None else 0

    def _server_route(self, text: str) -> Optional[Route]:
        node = self._node
        if node is None or node.identity is None:
            return None
        try:
            h = wire.decode_hello(text)
        except ShmGrpcError as err:
            self._not_colocated(err)
            return None
        # A client in this very process gets no memfd: a side connection would
        # be one to ourselves, whose two ends share one peer id (one node per
        # process). Without the side socket in our welcome it makes none.
        itself = h.inst == node.identity.inst
        side_ = node.get_side() if "m" in h.accepts and "memfd" in self._order and not itself else None
        peer = None
        try:
            peer = self._peer(h.inst, h.id_segment)
        except ShmGrpcError as err:
            if side_ is None:
                self._not_colocated(err)
                if h.server_inst is None:
                    return None
                # The client frames this call (its hello names a server): read
                # its frames, offload nothing, and read no handle.
                return Route(peer=None, send_shm=False, send_cma=False, peer_key=None, max_receive=h.max_receive)
        identity = node.identity
        me = identity.inst
        current = h.server_inst == me
        ticket = side_.ticket_of(h.inst) if side_ is not None else None
        if peer is None:
            peer = session.side_peer(h.inst, ticket or b"")
        # The client proves it read our id segment, or that it holds the
        # ticket of its side connection to us.
        proved = current and (
            session.proved(identity.secret, session.LABEL_HELLO, h.inst, h.proof)
            or (ticket is not None and session.proved(ticket, session.LABEL_HELLO, h.inst, h.proof))
        )
        if current and not proved:
            # It names us but cannot prove it: not a client we welcomed. No
            # welcome, nothing offloaded, no handle read.
            self.stats.add("error", "hello_proof_mismatch")
            log.debug("hello naming this server with a wrong proof (client pid %d)", peer.pid)
            return Route(peer=None, send_shm=False, send_cma=False, peer_key=None, max_receive=h.max_receive)
        accepts = self._accepts(peer)
        welcome = None
        if not proved:  # the client does not know us yet: tell it who we are
            welcome = wire.encode_welcome(
                wire.Welcome(
                    inst=me,
                    id_segment=identity.name,
                    accepts=accepts if side_ is not None else accepts.replace("m", ""),
                    proof=session.proof(peer.secret, session.LABEL_WELCOME, me) if peer.named else None,
                    cma_key=identity.cma_key_for(peer.inst) if "c" in accepts else None,
                    max_receive=self.offload_limit(),
                    side=side_.listen() if side_ is not None else None,
                    ticket=side_.issue_ticket(h.inst) if side_ is not None else None,
                )
            )
        log.debug("server: hello from client pid %d: it reads %s; %s", peer.pid, _rungs(h.accepts),
                  "proved" if proved else "welcome sent" if welcome else "not proved, no welcome")
        return Route(
            peer=peer,
            send_shm=proved and peer.named and "s" in h.accepts and "shm" in self._order,
            send_cma=proved and peer.named and "c" in h.accepts and h.cma_key is not None and "cma" in self._order,
            send_memfd=proved and ticket is not None and "m" in h.accepts,
            peer_key=h.cma_key,
            max_receive=h.max_receive,
            framed=h.server_inst is not None,  # else the welcome is all this call carries
            welcome=(wire.WELCOME_KEY, welcome) if welcome else None,
            side_conn=None if side_ is None else self._side_conn_id_of(side_, h.inst),
            peer_accepts=h.accepts,
        )

    # -- the two operations

    def offload(
        self, data, route: Optional[Route], keep: Optional[Callable[[Any], None]] = None,
        held: int = pool.KEEP_WHILE_ROOM,
    ) -> Optional[bytes]:
        """Put serialized `data` where `route`'s peer can read it and return
        the handle, or None: send it inline. `keep`, if given, is called with
        a ticket for release() when the call ends without its reader.
        `held` (clients only): how long the peer may read it again, for
        gRPC to resend the request (pool.KEEP_WHILE_ROOM, KEEP_UNTIL_END;
        see CallCodec.send)."""
        held = held if self.role == "client" else pool.FREE_ON_ACK
        n = len(data)
        if route is None or n < self.config.threshold or self._state != "ready":
            self.stats.add_inline(n)
            return None
        reason = "peer_cannot_read"
        missed: Optional[List[str]] = None  # rungs that failed, for the DEBUG line
        if n > self.config.max_message:
            reason = "too_large"
        elif not within(n, self.max_send) or not within(n, route.max_receive):
            # Over this side's gRPC send limit, or over what the peer accepts
            # offloaded: inline, where gRPC accepts it or refuses it with its
            # own status and words, as it would without shmgrpc.
            reason = "over_limit"
            self._note_limit(n, route)
        else:
            node = self._node
            assert node is not None
            for transport in self._order if route.peer is not None else ():
                if transport == "memfd" and route.send_memfd:
                    handle, ticket, reason = self._offload_memfd(node, data, route, held)
                elif transport == "shm" and route.send_shm:
                    handle, ticket, reason = self._offload_shm(node, data, route, held)
                elif transport == "cma" and route.send_cma and route.peer_key:
                    if n < self.config.cma_threshold:
                        handle, ticket, reason = None, None, "below_cma_threshold"
                    else:
                        peer = route.peer
                        assert peer is not None  # the loop runs only with a peer
                        handle, ticket, reason = node.get_pins().pin(
                            data, route.peer_key, peer.inst, (peer.pid, peer.start), os.getpid(), held=held,
                        )
                        if handle is not None:
                            self.stats.add("offloaded", "cma", 1, n)
                else:
                    continue
                if handle is not None:
                    if keep is not None:
                        keep(ticket)
                    route.sent.add(transport)
                    if missed is not None:
                        self._log_offload(n, transport, missed)
                    return handle
                if log.isEnabledFor(logging.DEBUG):
                    missed = [*(missed or ()), f"{transport}: {reason}"]
        self.stats.add("fallback", reason)
        self.stats.add_inline(n)
        route.sent.add(reason)
        if self._explicit and reason in _CANNOT_HONOUR:
            self._cannot_honour(reason, n, route)
        if log.isEnabledFor(logging.DEBUG):
            self._log_offload(n, "inline", missed, reason)
        return None

    def _cannot_honour(self, reason: str, n: int, route: Route) -> None:
        """One WARNING per cause and process: the configured transport could
        not carry a large message, and a configuration change would fix it."""
        key = ("cannot_honour", reason, self.config.transport, self.role)
        if not once(key):
            return
        text = cannot_honour(reason, self.config, self.role, self._peer_words(route), n, self.stats.notes)
        if text is not None:
            log.warning("%s", text)

    def _log_offload(self, n: int, via: str, missed: Optional[List[str]], reason: str = "") -> None:
        """DEBUG, rate-limited: a message that did not take the first rung."""
        tried = "; ".join(missed or ())
        suppressed = _FALLBACK_LOG.allow((id(self), via, reason, tried))
        if suppressed is None:
            return
        if via == "inline":
            log.debug("%s: a %d-byte message went inline (fallback %s%s)%s", self.name, n, reason,
                      f"; tried {tried}" if tried else "", repeats(suppressed))
        else:
            log.debug("%s: a %d-byte message went via %s (%s)%s", self.name, n, via, tried,
                      repeats(suppressed))

    def _note_limit(self, n: int, route: Route) -> None:
        if self._limit_noted:
            return
        self._limit_noted = True
        log.info(
            "%s: a %d-byte message went inline: this side sends at most %s (gRPC "
            "max_send_message_length) and the peer accepts at most %s offloaded (its gRPC "
            "max_receive_message_length and SHMGRPC_MAX_MESSAGE; -1: no limit). If you raised "
            "gRPC's limits, pass the same options to shmgrpc.",
            self.name, n, self.max_send, route.max_receive,
        )

    def _offload_memfd(self, node: Node, data, route: Route, held: int):
        side_ = node.side
        peer = route.peer
        assert peer is not None  # offload() tries no rung without one
        conn = side_.conn_for(peer.inst) if side_ is not None else None
        if conn is None:
            return None, None, "side_closed"
        pool_ = node.get_pool()
        slot, reason = pool_.alloc(len(data), conn, "memfd", held=held, peer=peer.inst)
        if slot is None:
            return None, None, reason
        segment = cast(pool.MemfdSegment, slot.segment)  # a "memfd" alloc
        segment.conns.add(conn)
        # "" once the peer holds the segment; else side_closed, side_budget
        # (the peer's grant is used up) or side_busy (its queue is full)
        reason = conn.send_segment(segment.number, segment.size, segment.fd)
        if reason:
            pool_.release(pool.Ticket(slot, slot.generation))
            return None, None, reason
        off = slot.offset
        segment.mm[off : off + len(data)] = data
        pool_.publish(slot)
        self.stats.add("offloaded", "memfd", 1, len(data))
        return wire.encode_memfd(cast(wire.MemfdHandle, slot.handle())), pool.Ticket(slot, slot.generation), ""

    def _offload_shm(self, node: Node, data, route: Route, held: int):
        pool_ = node.get_pool()
        peer = route.peer
        assert peer is not None  # offload() tries no rung without one
        slot, reason = pool_.alloc(len(data), (peer.pid, peer.start), held=held, peer=peer.inst)
        if slot is None:
            return None, None, reason
        off = slot.offset
        slot.segment.mm[off : off + len(data)] = data
        pool_.publish(slot)
        self.stats.add("offloaded", "shm", 1, len(data))
        return wire.encode_shm(cast(wire.ShmHandle, slot.handle())), pool.Ticket(slot, slot.generation), ""

    def release(self, ticket: "Optional[pool.Ticket | pins.Ticket]", unread_only: bool = False) -> None:
        """The call that carried `ticket` is over: nobody will read it any
        more. A ticket whose slot or pin was reused since is ignored.
        `unread_only`: see pool.Pool.release."""
        node = self._node
        if node is None or ticket is None:
            return
        if isinstance(ticket, pins.Ticket):
            if node.pins is not None:
                node.pins.release(ticket)
        elif node.pool is not None:
            node.pool.release(ticket, unread_only)

    def restore(self, raw, route: Route, deserializer: Callable, reread: bool = False,
                ended: Optional[Callable[[], Optional[ShmGrpcError]]] = None) -> Any:
        """Rebuild the message a handle stands for, with `deserializer`.

        `reread`: the handle may have been read before (a request the client
        resent: gRPC retries and hedging); responses are read once. Raises a
        ShmGrpcError whose status_code says what went wrong; an exception of
        the deserializer itself propagates unchanged, as it would inline.
        `ended()`: the error to raise instead when the sender took the
        message back and the reader's call has ended meanwhile (CallEnded:
        not counted, the call ends as gRPC ends it), or None."""
        node = self._node
        if node is not None and node.pins is not None:
            # Before this call serializes anything: payloads our readers are
            # done with are let go, so that their memory serves the next one
            # warm (a payload pinned until pressure costs fresh page faults).
            node.pins.reclaim()
        try:
            if self._state != "ready":
                raise HandleError("received a shmgrpc handle, but offload is not enabled here")
            h = wire.decode(raw)
            if route.peer is None:
                raise HandleError(
                    "received a shmgrpc handle on a call whose hello this side cannot verify "
                    "(no id segment it can open, no side connection of that peer)"
                )
            if not within(h.length, self.max_receive):
                raise HandleTooLarge(
                    f"Received message larger than max ({h.length} vs. {self.max_receive})"
                )
            if isinstance(h, wire.ShmHandle):
                message = self._restore_shm(h, route.peer, deserializer, reread)
                route.received.add("shm")
            elif isinstance(h, wire.MemfdHandle):
                message = self._restore_shm(h, route.peer, deserializer, reread)
                route.received.add("memfd")
            else:
                message = self._restore_cma(h, route.peer, deserializer, reread)
                route.received.add("cma")
            return message
        except ShmGrpcError as err:
            over = ended() if ended is not None and isinstance(err, SlotReclaimed) else None
            if over is not None:
                raise over from err
            self.stats.add("error", getattr(err, "counted_as", None) or type(err).__name__)
            raise

    def received_inline(self, route: Route, n: int) -> None:
        """A message of `n` bytes, at or above the threshold, came inline on
        a framed call of `route`. Above what we accept offloaded, we know
        why; otherwise only its sender does (see _status.py)."""
        route.received.add(SENT_INLINE if within(n, self.offload_limit()) else "over_limit")

    def _restore_shm(self, h, peer: session.Peer, deserializer: Callable, reread: bool) -> Any:
        """Restore an shm or a memfd handle: both are slots of a mapped segment."""
        memfd = isinstance(h, wire.MemfdHandle)
        transport = "memfd" if memfd else "shm"
        if transport not in self._order:
            raise HandleError(f"received a {transport} handle, but SHMGRPC_TRANSPORT does not allow {transport}")
        node = self._node
        attacher = node.attacher if node else None
        if node is None or attacher is None:
            raise HandleError(f"received a {transport} handle, but this engine is closed")
        if memfd:
            conn = node.side.conn_for(peer.inst) if node.side is not None else None
            if conn is None:
                raise DataLossError("received a memfd handle, but the side connection to its sender is closed")
            side_ = node.side
            assert side_ is not None  # conn came from it
            view, seg = attacher.open_memfd((conn.id, h.segment), h, peer.inst, reread,
                                            arrive=lambda: side_.arrive(conn, h.segment))
        elif not peer.named:
            raise HandleError("received an shm handle from a peer whose id segment we cannot open")
        else:
            view, seg = attacher.open(h, peer.inst, reread)
        failure = None
        message = None
        try:
            message = deserializer(view if parses_views(deserializer) else bytes(view))
        except Exception as err:  # the parser's own error; re-raised after the check below
            failure = err
        finally:
            view.release()
            # Raises DataLossError if the slot changed while we parsed: that
            # explains a parse failure better than the parser could.
            attacher.finish(h, seg)
        if failure is not None:
            raise failure
        self.stats.add("restored", transport, 1, h.length)
        return message

    def _restore_cma(self, h: wire.CmaHandle, peer: session.Peer, deserializer: Callable, reread: bool) -> Any:
        node = self._node
        if "cma" not in self._order or node is None or node.identity is None:
            raise HandleError("received a cma handle, but cma is not enabled or not permitted here")
        buffers = node.buffers
        held: List[bytearray] = []

        def dest(n: int) -> memoryview:
            held.append(buffers.take(n))
            return memoryview(held[0])[:n]

        try:
            payload = pins.read(
                h, peer.pid, node.identity.inst, node.identity.cma_key_for(peer.inst),
                self.config.max_message, dest, reread,
            )
            try:
                message = deserializer(payload if parses_views(deserializer) else bytes(payload))
            finally:
                payload.release()
        finally:
            if held:
                buffers.give(held[0])
        self.stats.add("restored", "cma", 1, h.length)
        return message


class EngineOwner:
    """What every shmgrpc object with an engine (channel wrappers, server
    interceptors) says about it."""

    _engine: Engine

    @property
    def transport(self) -> str:
        """The configured SHMGRPC_TRANSPORT."""
        return self._engine.transport

    @property
    def transports(self) -> Tuple[str, ...]:
        """The rungs in effect now, in order (see Engine.transports)."""
        return self._engine.transports

    def stats(self) -> StatsSnapshot:
        """This object's counters, what its peers' large messages did lately
        (peers: a channel's server, a server's client routes) and its
        process's pool (shmgrpc.stats() sums every engine's counters)."""
        snap = self._engine.stats.snapshot()
        snap["peers"] = self._engine.peer_records()
        snap["pool"] = self._engine.pool_stats()
        return snap  # type: ignore[return-value]  # the StatsSnapshot shape (see _types.py)

    def close(self) -> None:
        """Let go of shared memory; later calls go plain. The last user of
        the process's pool unlinks it."""
        self._engine.close()


def _after_fork_in_child() -> None:
    Node.after_fork_in_child()
    for engine in list(_ENGINES):
        engine._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
