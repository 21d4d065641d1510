"""How a channel learns its route, and how a server checks a client's.

There is no handshake call. A client's calls that may carry a large message
carry a hello (metadata: who we are, what we read, our id segment, proof we
read the server's if we know it); a shmgrpc server answers a hello that does
not name it, or does not prove it, with a welcome in the trailing metadata
(who it is, what it reads, its side socket and a ticket for it). From the
two, each side makes a Route: the peer, and the transports it may send the
peer by (each transport decides from the Offer, transports/base.py).

A peer is proved co-located by its id segment (same shm directory and uid:
shm and cma) or by its side connection (memfd: any process that can reach
the side socket and holds the ticket, whatever its pid namespace).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Dict, Optional, Protocol, Tuple

from . import session, wire
from ._node import Node
from ._route import Route
from ._stats import Stats
from ._status import ChannelStatus
from .errors import HandleError, ShmGrpcError
from .transports import BY_LETTER
from .transports.base import Offer

log = logging.getLogger(__name__)

HelloState = Tuple[Tuple[str, str], Optional[Route]]


class Engine(Protocol):
    """What the handshake uses of its engine (_core.Engine)."""

    name: str
    lock: threading.Lock
    state: str
    why: str
    stats: Stats
    node: Optional[Node]

    def ready(self) -> bool: ...
    def status(self) -> ChannelStatus: ...
    def offload_limit(self) -> int: ...
    def peer(self, inst: bytes, id_segment: str) -> session.Peer: ...
    def accepts(self, peer: Optional[session.Peer], side: bool = True) -> str: ...
    def wants_side(self, accepts: str) -> bool: ...
    def issues_key(self, accepts: str) -> bool: ...
    def may_send(self, offer: Offer) -> Tuple[str, ...]: ...
    def side_lost(self, route: Route) -> bool: ...
    def not_colocated(self, err: Exception) -> None: ...


def rungs_in_words(accepts: str) -> str:
    """Hello / welcome 'accepts' letters in words: 'smc' -> 'memfd, shm, cma'."""
    return ", ".join(name for letter, name in BY_LETTER.items() if letter in accepts) or "nothing"


class ClientHandshake:
    """A channel's side: the hello its calls carry, the route it learned."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.welcomes: Dict[str, Route] = {}  # welcome text -> route
        self.route: Optional[Route] = None  # the server last heard from
        self.hello: Optional[HelloState] = None
        self.probe = "todo"  # todo (no answer yet) -> done (a welcome came) | plain
        self.announced: Optional[str] = None  # the status last logged

    def reset(self) -> None:
        """Forget every server (a forked child; a closed engine)."""
        self.welcomes.clear()
        self.route, self.hello = None, None
        self.probe = "todo"

    @property
    def plain(self) -> bool:
        """Calls go as gRPC's own, hello-less: the server has no shmgrpc (or
        cannot prove it shares this host), or offload is off."""
        return self.probe == "plain" or self.engine.state in ("disabled", "closed")

    def call_state(self) -> Optional[HelloState]:
        """(hello metadata, route) for one call, taken together, or None when
        the call goes plain (no hello at all). Responses of a call are read
        against the route its hello named, even if another call moves the
        channel to another server meanwhile."""
        engine = self.engine
        if self.probe == "plain" or not engine.ready():
            return None
        route = self.route
        if route is not None and engine.side_lost(route):
            # Our side connection to the server closed (it restarted, or the
            # connection broke): forget the route; the next call that carries
            # the hello gets a new welcome (a new ticket). Until then, inline.
            with engine.lock:
                if self.route is route:
                    self.route, self.hello = None, None
                    self.probe = "todo" if self.probe == "done" else self.probe
            engine.stats.note("memfd", "side connection to the server closed; the next call learns the route again")
        state = self.hello
        if state is None:
            node = engine.node
            if node is None or node.identity is None:
                return None
            identity = node.identity
            route = self.route
            peer = route.peer if route else None
            accepts = engine.accepts(peer)
            text = wire.encode_hello(
                wire.Hello(
                    inst=identity.inst,
                    id_segment=identity.name,
                    accepts=accepts,
                    server_inst=peer.inst if peer else None,
                    proof=session.proof(peer.secret, session.LABEL_HELLO, identity.inst) if peer else None,
                    cma_key=identity.cma_key_for(peer.inst) if peer and engine.issues_key(accepts) else None,
                    max_receive=engine.offload_limit(),
                )
            )
            state = self.hello = ((wire.HELLO_KEY, text), route)
            log.debug("%s: hello: we read %s%s", engine.name, rungs_in_words(accepts),
                      f"; naming server pid {peer.pid}" if peer is not None else "; first contact")
        return state

    def answered(self, ok: bool, trailing_metadata, first_contact: bool) -> None:
        """A call that carried the hello has ended: learn from its trailers.

        A shmgrpc server answers a hello that does not name it with a
        welcome, on every call it serves (the welcome travels with the
        status, failures too). So a first-contact call that ended OK without
        one reached a server without shmgrpc, or one that cannot prove it
        shares this host: the channel stays plain. A call that failed
        without one (refused before it reached a handler: auth, an unknown
        method, a transient error) says nothing; the next call that carries
        the hello asks again."""
        if trailing_metadata is None:
            # Not gRPC's call: an interceptor answered with an object of its
            # own (grpc.aio's UnaryUnaryCallResponse has no metadata). It
            # says nothing about the server.
            return
        welcomed = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY) is not None
        if welcomed:
            self.welcome(trailing_metadata)
        if not (ok and first_contact and self.route is None and self.probe == "todo"):
            return
        if welcomed:  # a shmgrpc server, but we can reach none of its transports
            self.go_plain(self.engine.stats.notes.get("not_colocated")
                          or "the server's welcome names nothing we can reach")
        else:
            self.go_plain("the server answered our hello without a welcome: it has no shmgrpc, "
                          "or it cannot prove it shares this host (different host, shm namespace or uid)")

    def go_plain(self, why: str) -> None:
        engine = self.engine
        with engine.lock:
            self.probe = "plain"
            engine.why = why
            self.route, self.hello = None, None
        engine.stats.note("server", why)
        self.announce()

    def lost_peer(self, why: str) -> None:
        """A framed call reached a server without shmgrpc (a channel balancing
        over a mix, or the server was replaced): plain from now on."""
        self.engine.stats.add("fallback", "peer_without_shmgrpc")
        self.go_plain(why)

    def new_welcome(self, trailing_metadata) -> bool:
        """Do these trailers carry a welcome this channel has not learned
        from yet? Learning one may wait for the server (its side socket's
        answer, CONNECT_SECONDS at most): grpc.aio learns it in a thread."""
        if trailing_metadata is None:
            return False
        text = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY)
        return text is not None and text not in self.welcomes

    def welcome(self, trailing_metadata) -> None:
        """Take the server's welcome from a call's trailing metadata, if any.

        The server sends one only when our hello did not name it or did not
        prove we read its id segment: the handshake, a reconnect to another
        server process, a server restart."""
        engine = self.engine
        text = wire.metadata_value(trailing_metadata, wire.WELCOME_KEY)
        if text is None or engine.state != "ready":
            return
        route = self.welcomes.get(text)
        if route is None:
            route = self._route_from_welcome(text)
            if route is None:
                return
            with engine.lock:
                if len(self.welcomes) > 256:
                    self.welcomes.clear()
                self.welcomes[text] = route
        if route is not self.route:
            with engine.lock:
                if self.probe == "plain":
                    return
                self.route, self.hello = route, None
                self.probe = "done"
            self.announce()

    def _route_from_welcome(self, text: str) -> Optional[Route]:
        engine = self.engine
        node = engine.node
        if node is None or node.identity is None:
            return None
        try:
            w = wire.decode_welcome(text)
        except ShmGrpcError as err:
            engine.not_colocated(err)
            return None
        peer = None
        try:
            peer = engine.peer(w.inst, w.id_segment)
        except ShmGrpcError as err:
            if w.side is None:
                engine.not_colocated(err)
                return None
        conn = None
        if w.side is not None and w.ticket is not None and engine.wants_side(w.accepts):
            side = node.get_side()
            try:
                conn = side.connect(w.side, w.ticket, w.inst) if side is not None else None
            except (OSError, ConnectionError) as err:
                engine.stats.note("memfd", f"side socket {w.side}: {err}")
                log.debug("%s: cannot use the side socket %s: %s", engine.name, w.side, err)
        if peer is None:
            if conn is None:
                engine.not_colocated(HandleError("neither the server's id segment nor its side socket is reachable"))
                return None
            # The connection's own ticket: it may be an earlier channel's,
            # reused (one side connection per pair of processes).
            peer = session.side_peer(w.inst, conn.ticket, conn.pid)
        # The server read our id segment (proof), so it reads what we put there.
        proved = peer.named and session.proved(node.identity.secret, session.LABEL_WELCOME, w.inst, w.proof)
        offer = Offer(w.accepts, id_proved=proved, side=conn is not None, cma_key=w.cma_key)
        route = Route(peer=peer, via=engine.may_send(offer), peer_key=w.cma_key, max_receive=w.max_receive,
                      peer_accepts=w.accepts)
        log.debug("%s: welcome from server pid %d: it reads %s; id segment proof %s, side connection %s; "
                  "we send via %s", engine.name, peer.pid, rungs_in_words(w.accepts), "ok" if proved else "none",
                  "up" if conn is not None else "none", ", ".join(route.via) or "nothing (inline)")
        return route

    def announce(self) -> None:
        """One INFO line when the channel settles, one WARNING when a channel
        that was offloading stops; nothing when nothing changed."""
        engine = self.engine
        st = engine.status()
        if st.transport == self.announced:
            return
        was = self.announced
        self.announced = st.transport
        if st.transport == "inline" and was not in (None, "inline"):
            log.warning("channel %s no longer offloads (was %s): %s", engine.name, was, st.reason)
        else:
            log.info("channel %s: %s (%s)", engine.name,
                     f"large messages via {st.transport}" if st.transport != "inline" else "plain gRPC",
                     st.reason)


class ServerHandshake:
    """A server's side: each client's hello checked once, its route cached."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.routes: "collections.OrderedDict[str, Optional[Route]]" = collections.OrderedDict()

    def reset(self) -> None:
        self.routes.clear()

    def route(self, text: Optional[str]) -> Optional[Route]:
        """Check the client's hello (the value of its HELLO_KEY metadata);
        None means step aside (plain gRPC).

        Routes are cached by hello text: after the first call of a client,
        this is one dict lookup."""
        engine = self.engine
        if text is None or not engine.ready():
            return None
        node = engine.node
        if node is not None:
            node.tidy()  # clients come and go: let their segments go too
        route = self.routes.get(text)
        if route is not None and (route.side_conn is None or route.side_conn == self._side_conn_id(route)):
            return route
        if route is None and text in self.routes:
            return None  # a hello we decided to step aside for
        route = self._route(text)
        if route is not None and route.peer is None and route.framed:
            return route  # refused (cannot verify it): not cached, the next call looks again
        with engine.lock:
            self.routes[text] = route
            while len(self.routes) > 1024:
                self.routes.popitem(last=False)
        return route

    def _side_conn_id(self, route: Route) -> int:
        """The id of the side connection the route's peer has now (0: none):
        a cached route is good only while it has not changed."""
        node = self.engine.node
        if route.peer is None or node is None or node.side is None:
            return 0
        return _conn_id(node.side, route.peer.inst)

    def _route(self, text: str) -> Optional[Route]:
        engine = self.engine
        node = engine.node
        if node is None or node.identity is None:
            return None
        try:
            h = wire.decode_hello(text)
        except ShmGrpcError as err:
            engine.not_colocated(err)
            return None
        # A client in this very process gets no side connection: it would be
        # one to ourselves, whose two ends share one peer id (one node per
        # process). Without the side socket in our welcome it makes none.
        itself = h.inst == node.identity.inst
        side = node.get_side() if engine.wants_side(h.accepts) and not itself else None
        peer = None
        try:
            peer = engine.peer(h.inst, h.id_segment)
        except ShmGrpcError as err:
            if side is None:
                engine.not_colocated(err)
                if h.server_inst is None:
                    return None
                # The client frames this call (its hello names a server): read
                # its frames, offload nothing, and read no handle.
                return Route(peer=None, max_receive=h.max_receive)
        identity = node.identity
        me = identity.inst
        current = h.server_inst == me
        ticket = side.ticket_of(h.inst) if side is not None else None
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
            engine.stats.add("error", "hello_proof_mismatch")
            log.debug("hello naming this server with a wrong proof (client pid %d)", peer.pid)
            return Route(peer=None, max_receive=h.max_receive)
        accepts = engine.accepts(peer, side=side is not None)
        welcome = None
        if not proved:  # the client does not know us yet: tell it who we are
            welcome = wire.encode_welcome(
                wire.Welcome(
                    inst=me,
                    id_segment=identity.name,
                    accepts=accepts,
                    proof=session.proof(peer.secret, session.LABEL_WELCOME, me) if peer.named else None,
                    cma_key=identity.cma_key_for(peer.inst) if engine.issues_key(accepts) else None,
                    max_receive=engine.offload_limit(),
                    side=side.listen() if side is not None else None,
                    ticket=side.issue_ticket(h.inst) if side is not None else None,
                )
            )
        log.debug("server: hello from client pid %d: it reads %s; %s", peer.pid, rungs_in_words(h.accepts),
                  "proved" if proved else "welcome sent" if welcome else "not proved, no welcome")
        offer = Offer(h.accepts, id_proved=proved and peer.named, side=proved and ticket is not None,
                      cma_key=h.cma_key)
        return Route(
            peer=peer,
            via=engine.may_send(offer),
            peer_key=h.cma_key,
            max_receive=h.max_receive,
            framed=h.server_inst is not None,  # else the welcome is all this call carries
            welcome=(wire.WELCOME_KEY, welcome) if welcome else None,
            side_conn=None if side is None else _conn_id(side, h.inst),
            peer_accepts=h.accepts,
        )


def _conn_id(side, inst: bytes) -> int:
    conn = side.conn_for(inst)
    return conn.id if conn is not None else 0
