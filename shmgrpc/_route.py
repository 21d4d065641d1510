"""What a call knows of its peer (Route), and what it takes from gRPC's
options: the message limits and the retry buffer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from . import session, wire
from ._status import Recent


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
    via: Tuple[str, ...] = ()  # the transports we may send the peer by, in ladder order
    peer_key: Optional[bytes] = None  # the key the peer issued for our cma entries
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
        return bool(self.via)

    def sends(self, transport: str) -> bool:
        return transport in self.via


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
