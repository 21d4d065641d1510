"""The engine behind every interceptor: handshake, offload, restore, stats.

One Engine per interceptor. It is cheap to build (only the config is checked);
the id segment, pool and pin table are made on first use. The interceptors,
sync and aio, are thin glue around `offload` and `restore`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc

from . import cma, pins, pool, session, wire
from .config import Config
from .errors import HandleError, ShmGrpcError

log = logging.getLogger("shmgrpc")

# The order `auto` tries transports in. Measured (README, "shm or cma"):
# shm wins at every size on this kind of machine, because its slots stay
# mapped and warm while cma's receive buffer is fresh memory each time.
AUTO_ORDER = ("shm", "cma")

HANDSHAKE_RETRY_SECONDS = 5.0  # after a transient failure, at most one handshake per interval
_TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


class DeserializeError(ShmGrpcError):
    """The restored bytes did not parse as the expected message."""


# --- stats --------------------------------------------------------------------


class Stats:
    """Counters of one engine; every update also lands in the process total."""

    def __init__(self, parent: Optional["Stats"] = None):
        self._parent = parent
        self._lock = threading.Lock()
        self._counts: Dict[Tuple[str, str], int] = collections.Counter()
        self.notes: Dict[str, str] = {}

    def add(self, kind: str, key: str, count: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self._counts[(kind, key)] += count
            if nbytes:
                self._counts[(kind, key + ":bytes")] += nbytes
        if self._parent is not None:
            self._parent.add(kind, key, count, nbytes)

    def note(self, key: str, text: str) -> None:
        self.notes[key] = text
        if self._parent is not None:
            self._parent.notes[key] = text

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)

        def pair(kind: str, key: str) -> Dict[str, int]:
            return {"count": counts.get((kind, key), 0), "bytes": counts.get((kind, key + ":bytes"), 0)}

        transports = ("shm", "cma")
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
            "notes": dict(self.notes),
        }


PROCESS_STATS = Stats()
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def stats() -> Dict[str, Any]:
    """Process-wide counters, plus the pools of live engines."""
    snap = PROCESS_STATS.snapshot()
    total = {"capacity": 0, "bytes_mapped": 0, "bytes_in_use": 0, "segments": 0, "cma_pinned": 0}
    for engine in list(_ENGINES):
        for key, value in engine.pool_stats().items():
            total[key] += value
    snap["pool"] = total
    return snap


# --- routes -------------------------------------------------------------------


@dataclass
class Route:
    """What we know about the other side of a call: who it is, and how we may
    send it large messages."""

    peer: session.Peer
    send_shm: bool
    send_cma: bool
    peer_key: Optional[bytes]  # the key the peer issued for our cma entries
    welcome: Optional[Tuple[str, str]] = None  # server: trailing metadata, if the client needs it


def _protobuf_parser(deserializer: Callable) -> bool:
    """True if `deserializer` is a protobuf Message.FromString: those parse from
    a memoryview, so the payload is parsed straight out of shared memory."""
    owner = getattr(deserializer, "__self__", None)
    return isinstance(owner, type) and hasattr(owner, "DESCRIPTOR") and deserializer.__name__ == "FromString"


class _Parts:
    """What an engine creates, kept apart from the engine so that a finalizer
    can close it when the engine is garbage-collected (or at exit) without
    keeping the engine alive."""

    def __init__(self):
        self.identity: Optional[session.Identity] = None
        self.attacher: Optional[pool.Attacher] = None
        self.pool: Optional[pool.Pool] = None
        self.pins: Optional[pins.Pins] = None

    def close(self) -> None:
        parts = (self.pool, self.pins, self.identity, self.attacher)
        self.pool = self.pins = self.identity = self.attacher = None
        for part in parts:
            if part is not None:
                part.close()

    def abandon(self) -> None:
        """In a forked child: the parent owns these; drop them untouched."""
        if self.pool is not None:
            self.pool.abandon()
        if self.identity is not None:
            self.identity.abandon()
        self.pool = self.pins = self.identity = self.attacher = None


class Engine:
    def __init__(self, config: Optional[Config], role: str):
        self.config = Config.from_env() if config is None else config
        self.role = role
        self.stats = Stats(PROCESS_STATS)
        self._lock = threading.Lock()  # protects setup, _routes, _peers, _route
        self._state = "new"  # new -> ready | disabled; closed
        self._why_disabled = ""
        self._parts = _Parts()
        self._finalizer = weakref.finalize(self, self._parts.close)
        self._buffers = pins.Buffers(self.config.cma_max_pinned)
        self._peers: "collections.OrderedDict[bytes, session.Peer]" = collections.OrderedDict()
        self._welcomes: Dict[str, Route] = {}  # client: welcome text -> route
        self._server_routes: "collections.OrderedDict[str, Route]" = collections.OrderedDict()
        self._route: Optional[Route] = None  # client: the server last heard from
        self._hello: Optional[Tuple[Tuple[str, str], Optional[Route]]] = None
        self._probe = "todo"  # client: todo -> done | plain (the server has no shmgrpc)
        self._probe_after = 0.0  # client: no handshake before this (after a transient failure)
        self._order = self._transport_order()
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
        return self._order if self._state in ("new", "ready") else ()

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
            self._disable("SHMGRPC_TRANSPORT=off")
            return
        shm_dir = self.config.shm_dir
        if not os.path.isdir(shm_dir):
            self._disable(f"no shared-memory directory {shm_dir}")
            return
        pool.reap(shm_dir)
        try:
            self._parts.identity = session.Identity(shm_dir)
        except pool.NoSpace as err:
            self._disable(str(err))
            return
        self._parts.attacher = pool.Attacher(shm_dir, self.config.max_message)
        if "cma" in self._order and not cma.available():
            self._cma_unavailable("process_vm_readv is not available on this platform", everywhere=True)
        self._state = "ready"

    def _disable(self, why: str) -> None:
        self._state = "disabled"
        self._why_disabled = why
        self.stats.note("disabled", why)
        log.info("shmgrpc: offload disabled (%s); plain gRPC only", why)

    def _cma_unavailable(self, why: str, everywhere: bool = False) -> None:
        """Record (once: stats note, one log line) why cma cannot be used.

        A failed probe of one peer only means we cannot read *that* peer: our
        accepts for it drop "c", so it sends us shm or inline. Only a missing
        syscall takes cma out of our own ladder."""
        if "cma" not in self._order:
            return
        if everywhere:
            self._order = tuple(t for t in self._order if t != "cma")
        if "cma" not in self.stats.notes:
            self.stats.note("cma", f"not permitted: {why}")
            fallback = "shm" if "shm" in self._order else "inline"
            log.warning("shmgrpc: cma transport not permitted (%s); using %s", why, fallback)

    def _get_pool(self) -> pool.Pool:
        parts = self._parts
        if parts.pool is None:
            with self._lock:
                if parts.pool is None:
                    assert parts.identity is not None
                    parts.pool = pool.Pool(
                        self.config.shm_dir,
                        self.config.pool_size,
                        self.config.segment_size,
                        self.config.lease_seconds,
                        parts.identity.inst,
                    )
        return parts.pool

    def _get_pins(self) -> pins.Pins:
        parts = self._parts
        if parts.pins is None:
            with self._lock:
                if parts.pins is None:
                    parts.pins = pins.Pins(self.config.cma_max_pinned, self.config.lease_seconds)
        return parts.pins

    def pool_stats(self) -> Dict[str, int]:
        out = {"capacity": 0, "bytes_mapped": 0, "bytes_in_use": 0, "segments": 0, "cma_pinned": 0}
        parts = self._parts
        if parts.pool is not None:
            s = parts.pool.stats()
            out.update(capacity=s.capacity, bytes_mapped=s.bytes_mapped,
                       bytes_in_use=s.bytes_in_use, segments=s.segments)
        if parts.pins is not None:
            out["cma_pinned"] = parts.pins.pinned_bytes
        return out

    # The parts, by name.
    identity = property(lambda self: self._parts.identity)
    attacher = property(lambda self: self._parts.attacher)

    def close(self) -> None:
        """Unlink everything this engine created. Safe to call twice; calls
        after it go plain."""
        with self._lock:
            self._state = "closed"
            self._route, self._hello = None, None
        self._finalizer()

    def _after_fork_in_child(self) -> None:
        # The parent still owns the segments: forget them, never unlink them.
        self._lock = threading.Lock()
        self._finalizer.detach()
        self._parts.abandon()
        self._parts = _Parts()
        self._finalizer = weakref.finalize(self, self._parts.close)
        self._peers.clear()
        self._welcomes.clear()
        self._server_routes.clear()
        self._route, self._hello = None, None
        self._probe = "todo"
        self._order = self._transport_order()
        if self._state == "ready":
            self._state = "new"

    # -- peers

    def _peer(self, inst: bytes, id_segment: str) -> session.Peer:
        with self._lock:
            peer = self._peers.get(inst)
            if peer is not None and peer.id_segment == id_segment:
                self._peers.move_to_end(inst)
                return peer
        peer = session.read_peer(self.config.shm_dir, id_segment, inst)
        if "cma" in self._order:
            peer.cma_reason = cma.probe(peer.pid, peer.probe_addr, peer.inst)
            if peer.cma_reason is not None:
                self._cma_unavailable(f"cannot read pid {peer.pid}: {peer.cma_reason}")
        else:
            peer.cma_reason = "cma not enabled here"
        with self._lock:
            self._peers[inst] = peer
            while len(self._peers) > 1024:  # a server sees many clients over its life
                self._peers.popitem(last=False)
        return peer

    def _accepts(self, peer: Optional[session.Peer]) -> str:
        shm = "s" if "shm" in self._order else ""
        cma_ok = "c" if peer is not None and "cma" in self._order and peer.cma_reason is None else ""
        return shm + cma_ok

    # -- client handshake

    def client_metadata(self) -> Optional[Tuple[str, str]]:
        """The hello to send with a call, or None when offload is off."""
        state = self.client_call_state()
        return state[0] if state else None

    def client_call_state(self) -> Optional[Tuple[Tuple[str, str], Optional[Route]]]:
        """(hello metadata, route) for one call, taken together: responses of
        that call are restored against the route its hello named, even if
        another call moves the channel to another server meanwhile."""
        if self._probe == "plain" or not self.ready():
            return None
        state = self._hello
        if state is None:
            assert self.identity is not None
            route = self._route
            peer = route.peer if route else None
            accepts = self._accepts(peer)
            text = wire.encode_hello(
                wire.Hello(
                    inst=self.identity.inst,
                    id_segment=self.identity.name,
                    accepts=accepts,
                    server_inst=peer.inst if peer else None,
                    proof=session.proof(peer.secret, session.LABEL_HELLO, self.identity.inst) if peer else None,
                    cma_key=self.identity.cma_key_for(peer.inst) if peer and "c" in accepts else None,
                )
            )
            state = self._hello = ((wire.HELLO_KEY, text), route)
        return state

    def client_needs_handshake(self) -> bool:
        return (
            self._probe == "todo"
            and self._route is None
            and self._state == "ready"
            and time.monotonic() >= self._probe_after
        )

    def client_handshake_done(self, call) -> None:
        """Take the result of the handshake call (a finished grpc.Call)."""
        try:
            code = call.code()
            metadata = call.trailing_metadata()
        except Exception:  # the call could not even start: try again later
            code, metadata = grpc.StatusCode.UNAVAILABLE, ()
        if code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL):  # INTERNAL: a non-protobuf stub
            self.client_welcome(metadata)
            if self._route is None:  # a shmgrpc server that cannot open our segments
                self._probe = "plain"
                self.stats.note("server", "the server could not prove co-location: plain gRPC")
            else:
                self._probe = "done"
        elif code in _TRANSIENT:
            # The server may be starting or busy: the real call will say. Try
            # the handshake again, but never more than once per interval.
            self._probe_after = time.monotonic() + HANDSHAKE_RETRY_SECONDS
        else:
            # UNIMPLEMENTED: a plain server. Anything else (an auth interceptor
            # refusing an unknown method, ...) is as final for this channel.
            self._probe = "plain"
            self.stats.note("server", f"handshake answered {code.name}: plain gRPC on this channel")

    def client_route(self) -> Optional[Route]:
        return self._route if self._state == "ready" else None

    def client_welcome(self, trailing_metadata) -> None:
        """Take the server's welcome from a call's trailing metadata, if any.

        The server sends one only when our hello did not name it or did not
        prove we read its id segment: the handshake, a reconnect to another
        server process, a server restart."""
        text = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY)
        if text is None:
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
                self._route, self._hello = route, None

    def _route_from_welcome(self, text: str) -> Optional[Route]:
        assert self.identity is not None
        try:
            w = wire.decode_welcome(text)
            peer = self._peer(w.inst, w.id_segment)
        except ShmGrpcError as err:
            self._not_colocated(err)
            return None
        proved = session.proved(self.identity.secret, session.LABEL_WELCOME, w.inst, w.proof)
        return Route(
            peer=peer,
            send_shm=proved and "s" in w.accepts and "shm" in self._order,
            send_cma="c" in w.accepts and w.cma_key is not None and "cma" in self._order,
            peer_key=w.cma_key,
        )

    def _not_colocated(self, err: Exception) -> None:
        self.stats.add("fallback", "peer_not_colocated")
        if "not_colocated" not in self.stats.notes:
            self.stats.note("not_colocated", str(err))
            log.info("shmgrpc: peer is not co-located (%s); plain gRPC", err)

    # -- server handshake

    def server_route(self, invocation_metadata) -> Optional[Route]:
        """Check the client's hello; None means step aside (plain gRPC).

        Routes are cached by hello text: after the first call of a client,
        this is one dict lookup."""
        text = wire.metadata_value(invocation_metadata, wire.HELLO_KEY)
        if text is None or not self.ready():
            return None
        route = self._server_routes.get(text)
        if route is None:
            route = self._server_route(text)
            if route is None:
                return None
            with self._lock:
                self._server_routes[text] = route
                while len(self._server_routes) > 1024:
                    self._server_routes.popitem(last=False)
        return route

    def _server_route(self, text: str) -> Optional[Route]:
        assert self.identity is not None
        try:
            h = wire.decode_hello(text)
            peer = self._peer(h.inst, h.id_segment)
        except ShmGrpcError as err:
            self._not_colocated(err)
            return None
        me = self.identity.inst
        current = h.server_inst == me
        proved = current and session.proved(self.identity.secret, session.LABEL_HELLO, h.inst, h.proof)
        accepts = self._accepts(peer)
        welcome = None
        if not proved:  # the client does not know us yet: tell it who we are
            welcome = wire.encode_welcome(
                wire.Welcome(
                    inst=me,
                    id_segment=self.identity.name,
                    accepts=accepts,
                    proof=session.proof(peer.secret, session.LABEL_WELCOME, me),
                    cma_key=self.identity.cma_key_for(peer.inst) if "c" in accepts else None,
                )
            )
        return Route(
            peer=peer,
            send_shm=proved and "s" in h.accepts and "shm" in self._order,
            send_cma=current and "c" in h.accepts and h.cma_key is not None and "cma" in self._order,
            peer_key=h.cma_key,
            welcome=(wire.WELCOME_KEY, welcome) if welcome else None,
        )

    # -- the two operations

    def offload(
        self, data: bytes, route: Optional[Route], keep: Optional[Callable[[Any], None]] = None
    ) -> "Tuple[Optional[bytes], Optional[pool.Ticket | pins.Ticket]]":
        """Put serialized `data` where `route`'s peer can read it.

        Returns (handle bytes, ticket), or (None, None): send inline. The
        ticket (a pool.Ticket or a pins.Ticket) is for release() when the call
        ends without its reader; `keep`, if given, is called with it too."""
        n = len(data)
        if route is None or n < self.config.threshold or self._state != "ready":
            self.stats.add("inline", "all", 1, n)
            return None, None
        reason = "peer_cannot_read"
        if n > self.config.max_message:
            reason = "too_large"
        else:
            for transport in self._order:
                if transport == "shm" and route.send_shm:
                    handle, ticket, reason = self._offload_shm(data, route)
                    if handle is not None:
                        if keep is not None:
                            keep(ticket)
                        return handle, ticket
                elif transport == "cma" and route.send_cma and route.peer_key:
                    peer = route.peer
                    handle, ticket, reason = self._get_pins().pin(
                        data, route.peer_key, peer.inst, (peer.pid, peer.start), os.getpid()
                    )
                    if handle is not None:
                        self.stats.add("offloaded", "cma", 1, n)
                        if keep is not None:
                            keep(ticket)
                        return handle, ticket
        self.stats.add("fallback", reason)
        self.stats.add("inline", "all", 1, n)
        return None, None

    def _offload_shm(self, data: bytes, route: Route):
        pool_ = self._get_pool()
        peer = route.peer
        slot, reason = pool_.alloc(len(data), (peer.pid, peer.start))
        if slot is None:
            return None, None, reason
        off = slot.offset
        slot.segment.mm[off : off + len(data)] = data
        pool_.publish(slot)
        self.stats.add("offloaded", "shm", 1, len(data))
        return wire.encode_shm(slot.handle()), pool.Ticket(slot, slot.generation), ""

    def release(self, ticket: "Optional[pool.Ticket | pins.Ticket]") -> None:
        """The call that carried `ticket` is over: nobody will read it any
        more. A ticket whose slot or pin was reused since is ignored."""
        if isinstance(ticket, pins.Ticket):
            if self._parts.pins is not None:
                self._parts.pins.release(ticket)
        elif ticket is not None and self._parts.pool is not None:
            self._parts.pool.release(ticket)

    def restore(self, raw, peer: session.Peer, deserializer: Callable) -> Any:
        """Rebuild the message a handle stands for. Raises a ShmGrpcError whose
        status_code says what went wrong."""
        if self._state != "ready":
            raise HandleError("received a shmgrpc handle, but offload is not enabled here")
        try:
            h = wire.decode(raw)
            if isinstance(h, wire.ShmHandle):
                message = self._restore_shm(h, peer, deserializer)
            else:
                message = self._restore_cma(h, peer, deserializer)
        except ShmGrpcError as err:
            self.stats.add("error", type(err).__name__)
            raise
        return message

    def _restore_shm(self, h: wire.ShmHandle, peer: session.Peer, deserializer: Callable) -> Any:
        if "shm" not in self._order:
            raise HandleError("received an shm handle, but SHMGRPC_TRANSPORT does not allow shm")
        assert self.attacher is not None
        view, seg = self.attacher.open(h, peer.inst)
        failure = None
        try:
            message = deserializer(view if _protobuf_parser(deserializer) else bytes(view))
        except Exception as err:  # the parser's own error; reported after the check below
            failure = err
        finally:
            view.release()
            # Raises DataLossError if the slot changed while we parsed: that
            # explains a parse failure better than the parser could.
            self.attacher.finish(h, seg)
        if failure is not None:
            raise DeserializeError(f"offloaded message does not parse: {failure}") from failure
        self.stats.add("restored", "shm", 1, h.length)
        return message

    def _restore_cma(self, h: wire.CmaHandle, peer: session.Peer, deserializer: Callable) -> Any:
        if "cma" not in self._order:
            raise HandleError("received a cma handle, but cma is not enabled or not permitted here")
        assert self.identity is not None
        buffers = self._buffers
        held: List[bytearray] = []

        def dest(n: int) -> memoryview:
            held.append(buffers.take(n))
            return memoryview(held[0])[:n]

        try:
            payload = pins.read(
                h, peer.pid, self.identity.inst, self.identity.cma_key_for(peer.inst),
                self.config.max_message, dest,
            )
            try:
                message = deserializer(payload if _protobuf_parser(deserializer) else bytes(payload))
            except Exception as err:
                raise DeserializeError(f"offloaded message does not parse: {err}") from err
            finally:
                payload.release()
        finally:
            if held:
                buffers.give(held[0])
        self.stats.add("restored", "cma", 1, h.length)
        return message


class EngineOwner:
    """What every interceptor, sync or aio, says about its engine."""

    _engine: Engine

    @property
    def transport(self) -> str:
        """The configured SHMGRPC_TRANSPORT."""
        return self._engine.transport

    @property
    def transports(self) -> Tuple[str, ...]:
        """The rungs in effect now, in order: cma drops out if its probe failed."""
        return self._engine.transports

    def stats(self) -> Dict[str, Any]:
        """This interceptor's counters and pool (shmgrpc.stats() sums them all)."""
        snap = self._engine.stats.snapshot()
        snap["pool"] = self._engine.pool_stats()
        return snap

    def close(self) -> None:
        """Unlink what this interceptor created; later calls go plain."""
        self._engine.close()


def _after_fork_in_child() -> None:
    for engine in list(_ENGINES):
        engine._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
