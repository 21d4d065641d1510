"""The engine behind every channel and server: the ladder, offload, restore.

One Engine per channel wrapper (it knows exactly one peer: the server that
channel talks to) and one per server interceptor. It keeps what is common to
every transport: the session with the peer (_handshake.py: how a channel
learns its route, how a server checks a client's), the choice of rung, the
limits, stats and status (_report.py). The transports (transports/) do the
rest behind one interface; the engine names none of them.

What a process needs only once, its identity, side channel, transports and
their pools, lives in a Node (_node.py) shared by every engine of that
process with the same settings. Engines are cheap to build (only the config
is checked); the node is made on first use and closed when its last engine
is closed or collected.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _malloc, session, wire
from ._buffer import keeps_view
from ._handshake import ClientHandshake, ServerHandshake
from ._log import RateLimit, once, repeats
from ._node import POOL_GAUGES, Node
from ._report import Report
from ._route import PARSES_VIEWS, Route, limits_from_options, parses_views, retry_buffer_from_options, within
from ._stats import Stats
from ._status import SENT_INLINE, ChannelStatus, Direction, PeerStatus, cannot_honour
from ._types import StatsSnapshot
from .config import Config
from .errors import HandleError, HandleTooLarge, ShmGrpcError, SlotReclaimed
from .transports import LADDER, NAMES, Transport
from .transports.base import KEEP_WHILE_ROOM, FREE_ON_ACK, Offer

__all__ = [
    "AUTO_ORDER", "ChannelStatus", "Direction", "Engine", "EngineOwner", "PARSES_VIEWS", "PeerStatus", "Route",
    "parses_views", "stats",
]

log = logging.getLogger(__name__)

AUTO_ORDER = NAMES  # the order `auto` tries transports in (transports/__init__.py says why)

# DEBUG lines about fallbacks: at most one per engine, cause and minute.
_FALLBACK_LOG = RateLimit(60.0)

# Fallbacks of an explicitly configured transport that a configuration change
# fixes: each draws one WARNING per process (_status.cannot_honour). The
# others pass (pool pressure, a side connection being replaced) or have a
# line of their own (over_limit).
_CANNOT_HONOUR = frozenset(("shm_no_space", "memfd_no_space", "pool_too_small", "peer_cannot_read"))

_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def stats() -> StatsSnapshot:
    """Process-wide counters, plus the peers and pools of live engines."""
    snap = Stats.process_snapshot()
    snap["peers"] = [record for engine in list(_ENGINES) for record in engine.report.peer_records()]
    total = dict.fromkeys(POOL_GAUGES, 0)
    with Node._lock:
        nodes = list(Node._nodes.values())
    for node in nodes:
        for key, value in node.pool_stats().items():
            total[key] += value
    snap["pool"] = total
    return snap  # type: ignore[return-value]  # the StatsSnapshot shape (see _types.py)


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
        self.lock = threading.Lock()  # protects setup, routes, hello, probe state
        self.state = "new"  # new -> ready | disabled; closed
        self.why = ""  # why offload is off (disabled, plain peer), for status and logs
        self.node: Optional[Node] = None
        self._released = _Released()
        self._finalizer = weakref.finalize(self, self._released)
        self.order = self._configured_order()  # transport names; after setup, those of the ladder
        self.ladder: Tuple[Transport, ...] = ()  # the node's transports in effect, in order (after setup)
        self._by_handle: Dict[type, Transport] = {}
        self._by_ticket: Dict[type, Transport] = {}
        # The configuration names one transport: not being able to use it is
        # worth a WARNING (under auto the next rung serves, quietly).
        self._explicit = self.config.transport not in ("auto", "off")
        self._limit_noted = False
        self.client = ClientHandshake(self)
        self.server = ServerHandshake(self)
        self.report = Report(self)
        _ENGINES.add(self)

    # -- set-up and tear-down

    def _configured_order(self) -> Tuple[str, ...]:
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
        if self.state not in ("new", "ready"):
            return ()
        if not self.ladder:
            return self.order
        return tuple(t.name for t in self.ladder if t.cannot_read_here() is None)

    def offload_limit(self) -> int:
        """The largest message this side accepts as a handle, told to the
        peer in the handshake: its gRPC receive limit and SHMGRPC_MAX_MESSAGE.
        A peer sends anything larger inline (where only gRPC's limit applies)."""
        limit = self.config.max_message
        return limit if self.max_receive < 0 else min(limit, self.max_receive)

    def ready(self) -> bool:
        if self.state == "ready":
            return True
        if self.state != "new":
            return False
        with self.lock:
            if self.state == "new":
                self._setup_locked()
        return self.state == "ready"

    def _setup_locked(self) -> None:
        if not self.order:
            self._disable("SHMGRPC_TRANSPORT=off", level=logging.DEBUG)
            return
        wanted = [t for t in LADDER if t.name in self.order]
        wanted.sort(key=lambda t: self.order.index(t.name))
        # Only transports that reach peers through it need an id segment: a
        # process without one writes nothing to any shm directory.
        node = Node.acquire(self.config, named=any(t.via_id_segment for t in wanted))
        self._released.node = node
        assert node.identity is not None  # a node has one until it is closed
        ladder = []
        for cls in wanted:
            t = node.transports[cls.name]
            why = t.unusable()
            if why is None and t.via_id_segment and not node.identity.named:
                why = f"not available: {node.shm_problem}"
            if why is not None:
                self.stats.note(t.name, why)
                continue
            ladder.append(t)
        if not ladder:
            self._disable(node.shm_problem or "no transport available")
            return
        self.ladder = tuple(ladder)
        self.order = tuple(t.name for t in ladder)
        self._by_handle = {t.handle_type: t for t in ladder}
        self._by_ticket = {t.ticket_type: t for t in ladder}
        self.node = node
        for t in ladder:
            why = t.cannot_read_here()
            if why is not None:
                self._unreadable(t, why)
        self.state = "ready"

    def _disable(self, why: str, level: int = logging.INFO) -> None:
        self.state = "disabled"
        self.why = why
        self.stats.note("disabled", why)
        log.log(level, "offload disabled (%s); plain gRPC only", why)

    def _unreadable(self, t: Transport, why: str, peer: Optional[session.Peer] = None) -> None:
        """Record (once: stats note, one log line) why this process cannot
        read `t`: from `peer`, or (None) from anyone.

        A failed probe of one peer only means we cannot read *that* peer: our
        accepts for it drop the letter, so it sends us the next rung or
        inline. A WARNING (one per process) only when `t` was asked for
        explicitly, saying which way goes inline and what to change; under
        `auto` the next rung serves."""
        name = t.name
        if name in self.stats.notes:
            return
        text = f"cannot read pid {peer.pid}: {why}" if peer is not None else why
        self.stats.note(name, f"not permitted: {text}")
        if self.order == (name,):
            if not once((name + "_unavailable", self.role, peer is None)):
                return
            if peer is None:
                others = " or ".join(n for n in NAMES if n != name)
                log.warning("SHMGRPC_TRANSPORT=%s cannot be honoured: %s, so large messages go inline. Set "
                            "SHMGRPC_TRANSPORT=%s", name, why, others)
                return
            theirs, who = ("responses", "server") if self.role == "client" else ("requests", "client")
            ours = "requests" if theirs == "responses" else "responses"
            log.warning("SHMGRPC_TRANSPORT=%s cannot be honoured for %s: this process may not read %s pid %d "
                        "(%s), so the %s sends its large %s inline (%s still go via %s where it may read this "
                        "process). To change it: %s", name, theirs, who, peer.pid, why, who, theirs, ours, name,
                        t.fix(why))
        else:
            others = " or ".join(t.name for t in self.ladder if t.name != name)
            log.info("%s not permitted (%s); %s carries large messages where it can", name, text, others)

    def pool_stats(self) -> Dict[str, int]:
        node = self.node
        return node.pool_stats() if node is not None else dict.fromkeys(POOL_GAUGES, 0)

    def close(self) -> None:
        """Let go of the node (the last engine closes it: everything it
        created is unlinked). Safe to call twice; calls after it go plain."""
        with self.lock:
            self.state = "closed"
            self.why = "closed"
            self.client.route, self.client.hello, self.node = None, None, None
        self._finalizer()

    def _after_fork_in_child(self) -> None:
        # The parent still owns the node's segments (Node.after_fork_in_child
        # drops them untouched); this engine makes a new node on first use.
        self.lock = threading.Lock()
        self._released.node = None
        self.node = None
        self.client.reset()
        self.server.reset()
        self.order = self._configured_order()
        self.ladder = ()
        if self.state == "ready":
            self.state = "new"

    # -- what the handshake asks (_handshake.py)

    def peer(self, inst: bytes, id_segment: str) -> session.Peer:
        """The peer `inst` by its id segment, tested by the transports that
        test peers; one this process may not read is noted (_unreadable)."""
        assert self.node is not None
        probes = tuple(t for t in self.ladder if t.probes_peers)
        peer = self.node.peer(inst, id_segment, probes)
        for t in probes:
            why = peer.probed.get(t.name)
            if why is not None:
                self._unreadable(t, why, peer)
        return peer

    def accepts(self, peer: Optional[session.Peer], side: bool = True) -> str:
        """The letters of what we can read from `peer` (None: a first contact,
        not known yet); `side`: a side connection may link us (else the
        transports that need one are left out)."""
        return "".join(t.letter for t in self.ladder if t.reads(peer) and (side or t.via_id_segment))

    def wants_side(self, accepts: str) -> bool:
        """Would a side connection serve a peer that reads `accepts`?"""
        return any(not t.via_id_segment and t.letter in accepts for t in self.ladder)

    def issues_key(self, accepts: str) -> bool:
        """Do we read, from a peer, a transport whose handles it must key
        with a key we issue (cma)? Then our hello / welcome carries one."""
        return any(t.probes_peers and t.letter in accepts for t in self.ladder)

    def may_send(self, offer: Offer) -> Tuple[str, ...]:
        """The transports we may send a peer by, after its hello / welcome."""
        return tuple(t.name for t in self.ladder if t.may_send(offer))

    def side_lost(self, route: Route) -> bool:
        """Does `route` send by a side connection that has closed since?"""
        if all(t.via_id_segment for t in self.ladder if route.sends(t.name)):
            return False
        node = self.node
        side = node.side if node is not None else None
        return side is None or route.peer is None or side.conn_for(route.peer.inst) is None

    def not_colocated(self, err: Exception) -> None:
        self.stats.add("fallback", "peer_not_colocated")
        if "not_colocated" not in self.stats.notes:
            self.stats.note("not_colocated", str(err))
            log.debug("%s: peer is not co-located (%s)", self.name, err)

    # -- what the call layer asks

    @property
    def plain(self) -> bool:
        return self.client.plain

    def status(self) -> ChannelStatus:
        """This channel's ChannelStatus (see there)."""
        return self.report.status()

    # -- the two operations

    def offload(
        self, data, route: Optional[Route], keep: Optional[Callable[[Any], None]] = None,
        held: int = KEEP_WHILE_ROOM,
    ) -> Optional[bytes]:
        """Put serialized `data` where `route`'s peer can read it and return
        the handle, or None: send it inline. `keep`, if given, is called with
        a ticket for release() when the call ends without its reader.
        `held` (clients only): how long the peer may read it again, for
        gRPC to resend the request (transports/base.py; see CallCodec.send)."""
        held = held if self.role == "client" else FREE_ON_ACK
        n = len(data)
        if route is None or n < self.config.threshold or self.state != "ready":
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
            for t in self.ladder if route.peer is not None else ():
                if not route.sends(t.name):
                    continue
                handle, ticket, reason = t.offload(data, route, held)
                if handle is not None:
                    self.stats.add("offloaded", t.name, 1, n)
                    if keep is not None:
                        keep(ticket)
                    route.sent.add(t.name)
                    if missed is not None:
                        self._log_offload(n, t.name, missed)
                    return handle
                if log.isEnabledFor(logging.DEBUG):
                    missed = [*(missed or ()), f"{t.name}: {reason}"]
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
        text = cannot_honour(reason, self.config, self.role, self.report.peer_words(route), n, self.stats.notes)
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

    def release(self, ticket: Any, unread_only: bool = False) -> None:
        """The call that carried `ticket` is over: nobody will read it any
        more. A ticket whose space was reused since is ignored.
        `unread_only`: only if its reader has not claimed it."""
        if self.node is None or ticket is None:
            return
        t = self._by_ticket.get(type(ticket))
        if t is not None:
            t.release(ticket, unread_only)

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
        for t in self.ladder:
            t.reclaim()
        try:
            if self.state != "ready":
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
            reader = self._by_handle.get(type(h))
            if reader is None:
                name = next(c.name for c in LADDER if c.handle_type is type(h))
                raise HandleError(f"received a {name} handle, but SHMGRPC_TRANSPORT does not allow {name}")
            if keeps_view(deserializer):
                # buffer_deserializer: the message is the bytes, as a view kept
                # beyond this call (no copy where the transport lends them).
                message: Any = reader.keep(h, route.peer, reread)
                self.stats.add("restored", reader.name, 1, h.length)
                route.received.add(reader.name)
                return message
            view, done = reader.open(h, route.peer, reread)
            try:
                # Raised by done() if the sender took the bytes back while we
                # parsed: that explains a parse failure better than the parser.
                message = deserializer(view if parses_views(deserializer) else bytes(view))
            finally:
                try:
                    view.release()
                finally:
                    done()
            self.stats.add("restored", reader.name, 1, h.length)
            route.received.add(reader.name)
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
        snap["peers"] = self._engine.report.peer_records()
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
