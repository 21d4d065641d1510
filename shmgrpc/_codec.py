"""Offload at the codec: one call's wrapped serializer and deserializer.

Both sides wrap the caller's *own* (de)serializers, never the messages: the
bytes the application's codec produced are what is offloaded, and the
application's codec parses the restored bytes. So any codec works (protobuf,
JSON, raw bytes), a message is serialized once, and every interceptor on
either side, inside or outside shmgrpc, sees the real messages.

Only a *framed* call (its hello named a shmgrpc peer, see _core.Route) reads
frames: there a message that merely begins like one was escaped by its
sender, so raw bytes are never mistaken for a handle. Any other call passes
bytes through untouched both ways.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional

from . import wire
from ._buffer import views_of
from ._core import Engine, Route
from .transports.base import FREE_ON_ACK, KEEP_UNTIL_END, KEEP_WHILE_ROOM
from .errors import CallEnded, ShmGrpcError

_BYTES = (bytes, bytearray, memoryview)
_PREFIX = wire.PREFIX
_PREFIX_LEN = len(wire.PREFIX)


def _identity(value):
    return value


def details_of(error: ShmGrpcError) -> str:
    """The status details a failed restore gives its call: the error's words
    under shmgrpc's name, or gRPC's own for a call that had ended."""
    return str(error) if isinstance(error, CallEnded) else f"shmgrpc: {error}"


class Failed:
    """What a server's deserializer returns for a handle it could not restore.

    gRPC turns any exception of a request deserializer into INTERNAL
    ("Exception deserializing request!"); returning this instead lets the
    wrapped behavior end the call with the failure's own status (DATA_LOSS,
    INVALID_ARGUMENT, RESOURCE_EXHAUSTED), with details saying what was wrong."""

    __slots__ = ("error",)

    def __init__(self, error: ShmGrpcError):
        self.error = error


class CallCodec:
    """One call's codec: `serializer(original)` and `deserializer(original)`
    wrap the application's functions for this call's route.

    `keep`: called with the ticket of each message offloaded (the caller
    frees them when the call ends). `reread`: handles this side reads may be
    read again (requests: gRPC retries resend them). `failure`: the first
    handle this call could not restore. `committed` (client): a response
    has arrived, so gRPC will resend no request of this call (gRFC A6: a
    call is committed once response headers arrive); the requests it sends
    from then on need not stay readable until the call ends. `sent`: bytes
    of the messages this call serialized (how plain gRPC's retry buffer
    would have filled). `deadline` (time.monotonic) and `cancelled` (set
    when the application cancels): a response whose sender took it back
    once the call had ended fails the call as gRPC ends it (CallEnded)."""

    __slots__ = ("engine", "route", "keep", "reread", "failure", "failed_value", "sent_frame", "committed", "sent",
                 "deadline", "cancelled")

    def __init__(
        self,
        engine: Engine,
        route: Optional[Route],
        keep: Optional[Callable[[Any], None]] = None,
        reread: bool = False,
        failed_value: bool = False,
        deadline: Optional[float] = None,
    ):
        self.engine = engine
        self.route = route if route is not None and route.framed else None
        self.keep = keep
        self.reread = reread
        self.failure: Optional[ShmGrpcError] = None
        # Server: a failed restore returns Failed (see there); client: raises.
        self.failed_value = failed_value
        self.sent_frame = False  # a handle or an escaped message went out
        self.committed = False
        self.sent = 0
        self.deadline = deadline
        self.cancelled = False

    @property
    def framed(self) -> bool:
        return self.route is not None

    def serializer(self, original: Optional[Callable],
                   keep_of: Optional[Callable[[Any], Optional[Callable[[Any], None]]]] = None) -> Callable:
        """`original`, offloading on a framed call. `keep_of(message)`, if
        given, names the keep of the call `message` belongs to (a serializer
        shared by many calls); otherwise this codec's own keep serves."""
        original = original or _identity
        if self.route is None:
            return original
        if keep_of is None:
            return lambda message: self.serialize(original, message)
        views = views_of(original)
        if views is not None:
            return lambda message: self.send_view(views(message), keep_of(message))
        return lambda message: self.send(original(message), keep_of(message))

    def _ended(self) -> Optional[ShmGrpcError]:
        """Why this call is over, in gRPC's words, or None. A server's
        deadline is never before its client's (it counts from when the call
        reached it), so a response the server let go of at its deadline is
        read here after ours: plain gRPC would end such a call
        DEADLINE_EXCEEDED, not with a shmgrpc error."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return CallEnded.deadline()
        if self.cancelled:
            return CallEnded.cancelled()
        return None

    def _held(self) -> int:
        """How long a request this call offloads now stays readable for a
        resend (transports/base.py): until the call ends while plain gRPC could
        still retry the call (it has sent no more than gRPC's retry buffer);
        while there is room once plain gRPC would have committed it (core
        buffered only our handles, so it may still retry it through us);
        not at all once a response came."""
        if self.committed:
            return FREE_ON_ACK
        return KEEP_UNTIL_END if self.sent <= self.engine.retry_buffer else KEEP_WHILE_ROOM

    def deserializer(self, original: Optional[Callable]) -> Callable:
        original = original or _identity
        route = self.route
        if route is None:
            return original
        deserialize = self.deserialize
        engine = self.engine
        threshold = engine.config.threshold

        def deserializer(raw):
            if raw[:_PREFIX_LEN] != _PREFIX:
                self.committed = True
                if len(raw) >= threshold:  # a large message that came inline: the status says so
                    engine.received_inline(route, len(raw))
                return original(raw)  # not a frame: the message itself
            return deserialize(original, raw)

        return deserializer

    def serialize(self, original: Callable, message: Any):
        """`original(message)`, offloaded or escaped (a framed call)."""
        views = views_of(original)
        if views is not None:
            return self.send_view(views(message), self.keep)
        return self.send(original(message), self.keep)

    def send_view(self, view: memoryview, keep: Optional[Callable[[Any], None]]):
        """send() of a buffer_serializer's message, as a flat view of the
        caller's buffer: offloaded, it is copied once, into shared memory;
        inline, it becomes the bytes gRPC sends."""
        out = self.send(view, keep)
        return view.tobytes() if out is view else out

    def send(self, data: Any, keep: Optional[Callable[[Any], None]]):
        """What goes out for serialized `data` on a framed call: a handle
        (its ticket handed to `keep`), `data` escaped, or `data` itself."""
        if type(data) is bytes and len(data) < self.engine.config.threshold and data[:_PREFIX_LEN] != _PREFIX:
            self.sent += len(data)
            self.engine.stats.add_inline(len(data))  # the common case, in short
            return data
        if not isinstance(data, _BYTES):
            return data  # not ours to judge: gRPC reports it as it would
        self.sent += len(data)
        out = self.engine.offload(data, self.route, keep, self._held())
        if out is None:
            out = wire.escape(data)
            if out is data:
                return data
        self.sent_frame = True
        return out

    def deserialize(self, original: Callable, raw: bytes) -> Any:
        """`original` of the bytes `raw` stands for (a framed call)."""
        self.committed = True
        framed = raw[:_PREFIX_LEN] == _PREFIX
        if not framed or wire.escaped(raw):  # the message itself, or escaped: it came inline
            if self.route is not None and len(raw) >= self.engine.config.threshold:
                self.engine.received_inline(self.route, len(raw))
            return original(raw[len(wire.ESCAPE):] if framed else raw)
        assert self.route is not None  # deserializer() hands out deserialize on framed calls only
        try:
            return self.engine.restore(raw, self.route, original, self.reread, self._ended)
        except ShmGrpcError as err:
            if self.failure is None:
                self.failure = err
            if self.failed_value:
                return Failed(err)
            raise


# `current.codec`: the codec of the call this thread is making through a
# ThreadCodec's multicallable (see there), or None.
current = threading.local()


class ThreadCodec:
    """Serializer and deserializer for a multicallable made once per route
    and reused by every blocking unary-unary call on it (a per-call
    multicallable costs gRPC ~10 us and gives up method registration). They
    act for the CallCodec of the call the current thread is making: gRPC
    serializes such a call's request and deserializes its response in the
    calling thread. If an interceptor moves the call to another thread, a
    fresh codec of the same route serves it: framing stays right; only an
    offloaded request's slot is then freed by the ack or lease instead of at
    the call's end."""

    __slots__ = ("engine", "route", "original_serializer", "original_deserializer")

    def __init__(self, engine: Engine, route: Route, serializer: Optional[Callable],
                 deserializer: Optional[Callable]):
        self.engine = engine
        self.route = route
        self.original_serializer = serializer or _identity
        self.original_deserializer = deserializer or _identity

    def _codec(self) -> CallCodec:
        codec = getattr(current, "codec", None)
        if codec is None or codec.route is not self.route:
            codec = CallCodec(self.engine, self.route)
        return codec

    def serialize(self, message: Any):
        return self._codec().serialize(self.original_serializer, message)

    def deserialize(self, raw: bytes) -> Any:
        if raw[:_PREFIX_LEN] != _PREFIX:
            if len(raw) >= self.engine.config.threshold:  # a large message that came inline
                self.engine.received_inline(self.route, len(raw))
            return self.original_deserializer(raw)  # not a frame: the message itself
        return self._codec().deserialize(self.original_deserializer, raw)


class Tickets:
    """The tickets of one call's offloaded messages (shm/memfd slots, cma
    pins: Engine.offload's `keep`), to free when the call ends without their
    reader:

    - a client frees its requests when its call ends (release()): the server
      has read them by then, or never will (a resent request is read within
      the call);
    - a server frees its responses only when the call was cancelled (client
      cancel, deadline, server stop): their reader never will read them. A
      call that ended normally leaves them to the client's ack (its responses
      may still be in flight): end(release=False).

    `add` after the end frees at once. Tickets carry their generation: one
    whose slot or pin was reused for another message since is ignored by
    Engine.release."""

    __slots__ = ("_engine", "_lock", "_tickets", "_open")

    def __init__(self, engine: Engine):
        self._engine = engine
        self._lock = threading.Lock()  # protects _tickets and _open
        self._tickets: List[Any] = []
        self._open = True

    def add(self, ticket) -> None:
        with self._lock:
            if self._open:
                self._tickets.append(ticket)
                return
        self._engine.release(ticket)

    def end(self, release: bool = True, unread_only: bool = False) -> None:
        with self._lock:
            self._open = False
            tickets, self._tickets = self._tickets, []
        if release:
            for ticket in tickets:
                self._engine.release(ticket, unread_only)

    def release(self, _call=None) -> None:
        self.end(True)
