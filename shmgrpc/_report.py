"""What an engine says about its routes: ChannelStatus and PeerStatus.

Built from what the large messages of each route did, each way (Recent,
_status.py), and before any, from what the handshake lets each side expect;
a message that went inline says why, in the words of _status.py.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Tuple

from . import _handshake
from ._handshake import ClientHandshake, ServerHandshake
from ._route import Route
from ._status import (
    SENT_INLINE,
    ChannelStatus,
    Direction,
    PeerStatus,
    carrier,
    fallback_words,
    inline_notes,
    peer_json,
    summarize,
)

from .config import Config
from .session import Peer
from .transports import Transport

RouteStatus = Tuple[str, Tuple[str, ...], str, Direction, Direction]


class Engine(_handshake.Engine, Protocol):
    """What the report uses of its engine (_core.Engine), besides what the
    handshake does."""

    config: Config
    role: str
    ladder: Tuple[Transport, ...]
    client: ClientHandshake
    server: ServerHandshake


class Report:
    def __init__(self, engine: Engine):
        self.engine = engine

    def status(self) -> ChannelStatus:
        """A channel's ChannelStatus (see there)."""
        engine = self.engine
        client = engine.client
        if engine.state in ("disabled", "closed"):
            return ChannelStatus("inline", (), f"offload is off: {engine.why}", True)
        if client.probe == "plain":
            return ChannelStatus("inline", (), engine.why, True)
        route = client.route
        if route is None:
            pending = client.probe != "done"
            why = engine.stats.notes.get("server") or (
                "no answer yet: the channel learns its route from the first call that may carry a large message")
            if not pending:
                why = engine.stats.notes.get("not_colocated", "the server did not prove co-location")
            return ChannelStatus("inline", (), why, not pending)
        transport, rungs, why, sent, received = self.route_status(route)
        return ChannelStatus(transport, rungs, why, True, sent, received)

    def peer_statuses(self) -> List[PeerStatus]:
        """A server's PeerStatus of each client route it has framed calls of,
        the newest first; a channel's, of its server."""
        engine = self.engine
        if engine.state != "ready":
            return []
        if engine.role == "client":
            route = engine.client.route
            routes = [route] if route is not None else []
        else:
            with engine.lock:
                known = list(engine.server.routes.values())
            routes = [r for r in reversed(known) if r is not None and r.framed and r.peer is not None]
        out = []
        for route in routes:
            transport, rungs, why, sent, received = self.route_status(route)
            out.append(PeerStatus(self.peer_words(route), self.peer_pid(route), transport, rungs, why, sent,
                                  received))
        return out

    def peer_records(self) -> List[Dict[str, Any]]:
        """stats()["peers"]: peer_statuses() as plain data."""
        return [peer_json(self.engine.name, p.peer, p.pid, p.transport, p.reason, p.sent, p.received)
                for p in self.peer_statuses()]

    def route_status(self, route: Route) -> RouteStatus:
        """(transport, rungs, reason, sent, received) of a route: what its
        large messages did each way, or before any, what it expects."""
        engine = self.engine
        rungs = tuple(t.name for t in engine.ladder if route.sends(t.name))
        notes = engine.stats.notes
        expected = self.expect_sent(route, rungs)

        def why_sent(outcome: str) -> Tuple[str, str]:
            if outcome == "peer_cannot_read":  # the route says which transport the peer does not take, and why
                return outcome, f"peer_cannot_read: {self.expect_sent(route, ())[1]}"
            return outcome, fallback_words(outcome, engine.config, notes)

        sent = summarize(route.sent, expected, why_sent)
        received = summarize(route.received, self.expect_received(route),
                             lambda outcome: self.why_received_inline(route, outcome, sent))
        peer = route.peer
        why = "co-located " + self.peer_words(route)
        if peer is not None and not peer.named:
            why += " (known by its side connection; no shared shm directory in use)"
        skipped = [t for t in engine.ladder if t.name not in rungs]
        if skipped and rungs:
            why += "; " + ", ".join(f"{t.name} unavailable" for t in skipped)
            # the kernel's verdict on reading this peer, when that is why
            why += "".join(f" ({notes[t.name]})" for t in skipped if t.probes_peers and t.name in notes)
        why += inline_notes(sent, received) if engine.role == "client" else inline_notes(received, sent)
        return carrier(sent, received), rungs, why, sent, received

    def peer_words(self, route: Route) -> str:
        who = "server" if self.engine.role == "client" else "client"
        pid = self.peer_pid(route)
        return f"{who} pid {pid}" if pid else who

    def peer_pid(self, route: Route) -> Optional[int]:
        """The peer's pid as seen here: from its id segment, else from its
        side connection (SO_PEERCRED); None in another pid namespace."""
        peer = route.peer
        if peer is None:
            return None
        if peer.pid:
            return peer.pid
        node = self.engine.node
        conn = node.side.conn_for(peer.inst) if node is not None and node.side is not None else None
        return conn.pid if conn is not None and conn.pid else None

    def expect_sent(self, route: Route, rungs: Tuple[str, ...]) -> Tuple[str, str]:
        """(the first rung a large message to the peer tries, "") or ("inline", why)."""
        if rungs:
            return rungs[0], ""
        engine = self.engine
        who = self.peer_words(route)
        whys = []
        for t in engine.ladder:
            if t.letter not in route.peer_accepts:
                whys.append(f"{t.name}: {who} does not accept it from this process"
                            + ("" if t.announced else
                               " (it may not read this process, or does not use cma: its own status says which)"))
            else:
                whys.append(f"{t.name}: {engine.stats.notes.get(t.name) or 'not usable with this peer'}")
        return "inline", "; ".join(whys) or "no transport in effect"

    def expect_received(self, route: Route) -> Tuple[str, str]:
        """(the transport the peer's large messages are expected by, "") or
        ("inline", why not one): what we read from the peer, and what its
        handshake says it uses."""
        engine = self.engine
        peer = route.peer
        who = self.peer_words(route)
        notes = engine.stats.notes
        whys = []
        for t in engine.ladder:
            why = (self.why_unreadable(t, peer, who) if not t.reads(peer)
                   else t.why_peer_does_not_send(route, who, notes))
            if why is None:
                return t.name, ""
            whys.append(f"{t.name}: {why}")
        return "inline", "; ".join(whys) or "no transport in effect"

    def why_unreadable(self, transport: Transport, peer: Optional[Peer], who: str) -> str:
        if peer is None or not peer.named:
            return f"this process cannot open the id segment of {who} (no shared shm directory)"
        reason = peer.probed.get(transport.name)
        if reason is not None:
            return f"this process may not read {who} ({reason})"
        return self.engine.stats.notes.get(transport.name) or "not available here"

    def why_received_inline(self, route: Route, outcome: str, sent: Direction) -> Tuple[str, str]:
        """(reason code, words): why a large message came inline, as far as
        this side knows: a peer that sent it inline because we cannot read
        what it has is peer_cannot_read there."""
        engine = self.engine
        if outcome == "over_limit":
            return outcome, ("over_limit: above what this side accepts offloaded (its gRPC "
                             "max_receive_message_length and SHMGRPC_MAX_MESSAGE): gRPC accepts or refuses it inline")
        if outcome != SENT_INLINE:
            return outcome, fallback_words(outcome, engine.config, engine.stats.notes)
        via, why = self.expect_received(route)
        if via == "inline":
            return "peer_cannot_read", why
        who = self.peer_words(route)
        text = (f"{who} sent them inline: below its SHMGRPC_THRESHOLD or SHMGRPC_CMA_THRESHOLD, or a fallback; "
                "its own status says which")
        if sent.inline and sent.messages:
            text += f"; this side's own large messages go inline too ({sent.fallback})"
        return outcome, text
