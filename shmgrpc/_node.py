"""What one process shares between its engines: the Node.

One Node per process and pool settings: its identity (id segment), its side
channel (side connections to peers' nodes), the peers it has checked, and
one object per transport (transports/), with the parts they keep (a pool of
slots, a pin table). SHMGRPC_POOL_SIZE is thus a cap per process, not per
channel. Made by the first engine that needs it (reaping what exited
processes left behind), closed (everything it created unlinked) when its
last engine is closed or collected, and at exit.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

from . import session, shmdir
from .config import Config
from .errors import HandleError
from .transports import LADDER, Transport, _side
from .transports.base import Part

log = logging.getLogger(__name__)

POOL_GAUGES = ("capacity", "bytes_mapped", "bytes_in_use", "segments", "cma_pinned")


class Node:
    _lock = threading.Lock()  # protects _nodes and every node's _users
    _nodes: "Dict[Tuple, Node]" = {}

    JANITOR_SECONDS = 5.0  # how often idle segments, retired mappings, late acks are looked at

    def __init__(self, config: Config, key: Tuple, named: bool = True):
        self.key = key
        self.config = config
        self._users = 0
        self.setup_lock = threading.Lock()  # protects the lazy creation of parts and the side channel
        self.identity: Optional[session.Identity] = None
        self.side: Optional[_side.Side] = None
        self._parts: Dict[str, Part] = {}
        self._stop: Optional[threading.Event] = None  # set: the janitor stops
        self._janitor_lock = threading.Lock()  # protects _stop
        self.peers: "collections.OrderedDict[bytes, session.Peer]" = collections.OrderedDict()
        self.peers_lock = threading.Lock()  # protects peers
        self.shm_problem = ""  # why the transports that need an id segment are out, if they are
        shm_dir = config.shm_dir
        if not named:
            self.shm_problem = "SHMGRPC_TRANSPORT=memfd: no id segment"
        elif not os.path.isdir(shm_dir):
            self.shm_problem = f"no shared-memory directory {shm_dir}"
        else:
            shmdir.reap(shm_dir)
            try:
                self.identity = session.Identity(shm_dir)
            except shmdir.NoSpace as err:
                self.shm_problem = str(err)
        if self.identity is None:
            # memfd needs no shm directory: the process proves itself over
            # its side connection instead.
            self.identity = session.Identity(shm_dir, named=False)
        self.transports: Dict[str, Transport] = {t.name: t(self) for t in LADDER}

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

    # -- the transports' parts

    def part(self, key: str, make: Callable[["Node"], Any]) -> Any:
        """The part `key` (made by `make(node)` on first use), shared by the
        transports that ask for the same key."""
        part = self._parts.get(key)
        if part is None:
            with self.setup_lock:
                part = self._parts.get(key)
                if part is None:
                    part = self._parts[key] = make(self)
        return part

    def tidy(self) -> None:
        """Cheap, on every server call: clients come and go, let their
        segments go too (each part's time-gated trim)."""
        for part in self._parts.values():
            part.tidy()

    def start_janitor(self) -> None:
        """Once this process sends from shared memory (a part made its pool
        or pin table): a daemon thread that, every JANITOR_SECONDS, lets each
        part give back what is idle (pool segments, mappings of peers'
        retired or orphaned segments, pins their readers are done with), so
        an idle process shrinks too. It holds no reference to the node, and
        stops when the node is closed."""
        with self._janitor_lock:
            if self._stop is not None:
                return
            stop = self._stop = threading.Event()
        node_ref = weakref.ref(self)

        def run():
            while not stop.wait(self.JANITOR_SECONDS):
                node = node_ref()
                if node is None:
                    return
                try:
                    for part in list(node._parts.values()):
                        part.housekeep()
                except Exception:  # never let housekeeping kill anything
                    log.debug("janitor pass failed", exc_info=True)
                del node

        threading.Thread(target=run, name="shmgrpc-janitor", daemon=True).start()

    def pool_stats(self) -> Dict[str, int]:
        out = dict.fromkeys(POOL_GAUGES, 0)
        for part in list(self._parts.values()):
            out.update(part.stats())
        return out

    # -- the side channel and peers

    def get_side(self) -> Optional[_side.Side]:
        """The side channel, made on first use; None where it cannot work
        (no memfd_create, SCM_RIGHTS or SO_PEERCRED)."""
        if self.side is None and _side.available() and self.identity is not None:
            with self.setup_lock:
                if self.side is None:
                    c = self.config
                    self.side = _side.Side(self.identity.inst, c.side_dir, c.side_uids, self._segment_arrived,
                                           self._segment_retired, self._link_lost, peer_bytes=c.pool_size)
        return self.side

    def _segment_arrived(self, conn, number: int, mm, size: int) -> bool:
        for transport in self.transports.values():
            if transport.side_segment(conn, number, mm, size):
                return True
        mm.close()
        log.debug("segment %d from the side connection is not a shmgrpc segment", number)
        return False

    def _segment_retired(self, conn, number: int) -> None:
        for transport in self.transports.values():
            transport.side_retired(conn, number)

    def _link_lost(self, conn) -> None:
        """A side connection closed: the peer is gone (or replaced)."""
        for transport in self.transports.values():
            transport.side_lost(conn)

    def peer(self, inst: bytes, id_segment: str, probes: Tuple[Transport, ...] = ()) -> session.Peer:
        """The peer `inst`, its id segment opened and checked (cached), and
        tested by each transport of `probes` (those that probe peers)."""
        if id_segment == session.NO_SEGMENT:
            raise HandleError("the peer has no id segment (no shared shm directory)")
        if self.identity is None or not self.identity.named:
            raise HandleError(f"no id segment here ({self.shm_problem})")
        with self.peers_lock:
            peer = self.peers.get(inst)
            if peer is not None and peer.id_segment == id_segment:
                self.peers.move_to_end(inst)
                if all(t.name in peer.probed for t in probes):
                    return peer
        if peer is None or peer.id_segment != id_segment:
            peer = session.read_peer(self.config.shm_dir, id_segment, inst)
        for transport in probes:
            if transport.name not in peer.probed:
                peer.probed[transport.name] = transport.probe(peer)
        with self.peers_lock:
            self.peers[inst] = peer
            while len(self.peers) > 1024:  # a server sees many clients over its life
                self.peers.popitem(last=False)
        return peer

    # -- the end

    def close(self) -> None:
        """Unlink and unmap everything this node created. Safe to call twice."""
        if self._stop is not None:
            self._stop.set()
        side, identity, parts = self.side, self.identity, list(self._parts.values())
        self.side = self.identity = None
        self._parts = {}
        for transport in self.transports.values():
            transport.close()
        for part in (side, *parts, identity):
            if part is not None:
                part.close()

    def abandon(self) -> None:
        """In a forked child: the parent owns these; drop them untouched."""
        if self.side is not None:
            self.side.abandon()
            self.side = None
        for part in self._parts.values():
            part.abandon()
        if self.identity is not None:
            self.identity.abandon()
        self.identity = None
        self._parts = {}

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
