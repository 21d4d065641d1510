"""The seam between the engine and the transports.

A transport is one way the bytes of a large message reach a co-located
peer. The engine picks the rung (the first transport of the ladder that the
route may use), keeps the limits, stats and status; the transport does the
rest: where the bytes go, what the handle names, how the receiver gets a
view of them back, and when the sender may reuse the space.

Each transport is one object per process node (transports/__init__.py makes
them), shared by every engine of that node; its parts may be shared with
another transport (memfd and shm keep their messages in one pool of slots).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Protocol, Tuple, Type

from .._route import Route
from ..config import Config
from ..session import Identity, Peer
from ._side import Side

# How long an acknowledged use stays readable, for gRPC to resend it (a
# request of a call gRPC may still retry or hedge). The sender's, not in any
# header; a slot's or a pin's `held` takes these values.
FREE_ON_ACK = 0  # a response, or a request of a committed call
# A request of a call plain gRPC would not retry (it sent more than gRPC's
# retry buffer, grpc.per_rpc_retry_buffer_size: core commits such a call at
# once), which core may retry through shmgrpc (it buffered a handle only):
# kept until its call ends while there is room, freed once acknowledged when
# the pool (or the peer's share) is short.
KEEP_WHILE_ROOM = 1
# A request of a call plain gRPC could retry too: readable until its call
# ends (or the lease runs out), however short the pool; never taken back
# from a call that may still read it.
KEEP_UNTIL_END = 2


@dataclass(frozen=True)
class Offer:
    """What a peer's hello (or welcome) lets this side send it, as the
    handshake checked it: the transports the peer reads (`accepts`, one
    letter each), whether it proved it opened our id segment, whether a side
    connection links the two processes, and the key it issued for cma."""

    accepts: str
    id_proved: bool
    side: bool
    cma_key: Optional[bytes] = None


class Host(Protocol):
    """What a transport uses of its node (_node.Node, which makes them)."""

    config: Config
    identity: Optional[Identity]
    side: Optional[Side]  # the side channel, once made
    setup_lock: threading.Lock

    def part(self, key: str, make: Callable[["Host"], Any]) -> Any: ...
    def start_janitor(self) -> None: ...


# offload()'s answer: (the handle, a ticket for release(), "") or
# (None, None, the fallback reason: why this rung could not take it).
Sent = Tuple[Optional[bytes], Any, str]


class Transport:
    """One rung of the ladder. Subclasses set the class attributes and
    implement offload(), open() and release(); the rest has defaults."""

    name: ClassVar[str] = ""  # as SHMGRPC_TRANSPORT, stats and status say it
    letter: ClassVar[str] = ""  # in a hello's or welcome's accepts
    handle_type: ClassVar[Type] = type(None)  # the wire handle class it restores
    ticket_type: ClassVar[Type] = type(None)  # what its offload() gives for release()
    # It reaches a peer through the peer's id segment (the same shm directory,
    # proved by the handshake). False: through the side connection.
    via_id_segment: ClassVar[bool] = True
    # It must try reading each peer before it may accept from it (cma: the
    # kernel's ptrace check); probe() says why not.
    probes_peers: ClassVar[bool] = False
    # A peer's accepts say whether it sends this way. False (cma): a peer may
    # send it while it cannot read us, so its accepts lack the letter.
    announced: ClassVar[bool] = True

    def __init__(self, node: Host):
        self.node = node
        self.config = node.config

    # -- viability

    def unusable(self) -> Optional[str]:
        """Why this process cannot use the transport at all (it is left out
        of the ladder), or None."""
        return None

    def cannot_read_here(self) -> Optional[str]:
        """Why this process may send this way but never read it, or None."""
        return None

    def probe(self, peer: Peer) -> Optional[str]:
        """(probes_peers) Why this process may not read `peer`, or None."""
        return None

    def fix(self, why: str) -> str:
        """What to change so that this process may read its peers this way,
        after cannot_read_here() or probe() said `why` not."""
        return "set SHMGRPC_TRANSPORT=auto"

    def reads(self, peer: Optional[Peer]) -> bool:
        """May this process read what `peer` sends this way? (None: a first
        contact, not known yet.)"""
        if self.via_id_segment and peer is not None and not peer.named:
            return False
        if self.probes_peers:
            return peer is not None and peer.named and peer.probed.get(self.name, "not probed") is None
        return True

    def may_send(self, offer: Offer) -> bool:
        """May this side send the peer this way, after its hello / welcome?"""
        if self.letter not in offer.accepts:
            return False
        return offer.id_proved if self.via_id_segment else offer.side

    def why_peer_does_not_send(self, route: Route, who: str, notes: Dict[str, str]) -> Optional[str]:
        """Why the peer of `route` is not expected to send this way, though
        this process reads it (None: it is expected to)."""
        if self.announced and self.letter not in route.peer_accepts:
            return f"{who} does not use it"
        return None

    # -- the message path

    def offload(self, data, route: Route, held: int) -> Sent:
        """Put `data` where `route`'s peer can read it: (handle, ticket, "")
        or (None, None, why not). Never blocks on the peer."""
        raise NotImplementedError

    def open(self, handle, peer: Peer, reread: bool) -> Tuple[memoryview, Callable[[], None]]:
        """A read-only view of the bytes `handle` names, after checking it,
        and the function to call when done with the view (it acknowledges,
        and raises DataLossError if the sender took the bytes back while
        they were read). `reread`: the handle may have been read before (a
        request gRPC resent). Raises a ShmGrpcError saying what was wrong."""
        raise NotImplementedError

    def keep(self, handle, peer: Peer, reread: bool) -> memoryview:
        """The bytes `handle` names as a read-only memoryview the caller may
        keep (a buffer_deserializer's message): its memory stays valid, and
        nobody else's, for as long as it or anything made from it lives.
        Here, a copy; a transport whose sender keeps what its reader holds
        lends its memory instead."""
        view, done = self.open(handle, peer, reread)
        try:
            return memoryview(view.tobytes())
        finally:
            try:
                view.release()
            finally:
                done()

    def release(self, ticket: Any, unread_only: bool = False) -> None:
        """The call that carried `ticket` is over: nobody reads it any more.
        A ticket whose space was reused since is ignored. `unread_only`:
        only if its reader has not claimed it."""

    # -- what came over a side connection (_side.Side calls the node, the
    # node every transport): segments passed by descriptor, and their end

    def side_segment(self, conn, number: int, mm, size: int) -> bool:
        """A segment arrived on `conn`: take it (True) or leave it."""
        return False

    def side_retired(self, conn, number: int) -> None:
        """The peer of `conn` retired its segment `number`."""

    def side_lost(self, conn) -> None:
        """`conn` closed: its peer is gone, or replaced."""

    # -- upkeep

    def reclaim(self) -> None:
        """Before a message is read: take back what readers are done with,
        so its memory serves the next message warm."""

    def close(self) -> None:
        """This process is done with the transport. What it keeps is in its
        parts (Part), which the node closes; a transport with more to let go
        says so here. Safe to call twice."""


class Part:
    """What a transport keeps per node (a pool of slots, a pin table), made
    on first use by Node.part() and maybe shared by several transports
    (memfd and shm share one pool): tidied by the node's janitor, counted
    in stats()["pool"], closed with the node."""

    def housekeep(self) -> None:
        """Every few seconds: give back what is idle."""

    def tidy(self) -> None:
        """On every server call: a cheap, time-gated trim of what peers
        that come and go leave mapped."""

    def stats(self) -> Dict[str, int]:
        """Gauges for stats()["pool"]: capacity, bytes_mapped, bytes_in_use,
        segments, cma_pinned (whichever this part has)."""
        return {}

    def close(self) -> None:
        """Remove what this process created. Safe to call twice."""

    def abandon(self) -> None:
        """In a forked child: the parent owns it; drop it untouched."""
