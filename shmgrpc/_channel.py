"""The sync client: a grpc.Channel that wraps another, one engine per channel.

    channel = shmgrpc.intercept_channel(grpc.insecure_channel(target, options), options=options)
    stub = my_pb2_grpc.MyServiceStub(channel)            # unchanged

Like grpc.intercept_channel (grpc/_interceptor.py, _Channel), the wrapper
hands out multicallables of the channel it wraps, and acts at the codec: a
call that may carry a handle gets the caller's own (de)serializers wrapped
for its route (see _codec.py). So interceptors inside and outside the
wrapper see the application's messages, any codec works, and the per-peer
state lives in the one object that talks to that peer.

Which calls carry shmgrpc's hello (its metadata), and so may carry a handle:
- a unary request whose serialized size reaches the threshold (the wrapper
  serializes it once, before the call, and gRPC sends those very bytes);
- every call of a method that has answered this channel with a message at
  or above the threshold (it may do so again);
- every request-streaming call (its messages are not known in advance).
Every other call is gRPC's own, on a multicallable made once per method:
no metadata of ours, no extra interceptor, nothing for the server to check.

There is no handshake call: the first calls that carry the hello go
inline, and the server's answer (its welcome) rides in their trailing
metadata (ClientHandshake.answered). A channel whose server has no shmgrpc
learns that from the first such call that ends OK, and from then on is the
wrapped channel's own multicallables, untouched.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import grpc

from . import wire
from ._codec import CallCodec, ThreadCodec, Tickets, current, details_of
from ._buffer import KEEPS, keeps_view, views_of
from ._core import PARSES_VIEWS, ChannelStatus, Engine, EngineOwner, parses_views
from .config import Config, check_config
from .errors import ShmGrpcError

_DESERIALIZE_REQUEST_FAILED = "Exception deserializing request!"  # grpc/_server.py's words


def remaining(deadline: Optional[float]) -> Optional[float]:
    """The caller's timeout, less what has passed (never below a
    microsecond: gRPC then fails the call with DEADLINE_EXCEEDED itself)."""
    return None if deadline is None else max(1e-6, deadline - time.monotonic())


# [request, its serialized bytes]: set by a call that serialized its request
# to learn its size, read by the call's serializer (_presized_serializer) so
# the request is serialized once. gRPC serializes a request in the calling
# thread (sync) or in the task it creates for the call (grpc.aio), which
# copies this context; anywhere else the serializer simply serializes.
_presized: "contextvars.ContextVar[Optional[List[Any]]]" = contextvars.ContextVar(
    "shmgrpc_presized", default=None)


def _identity(value: Any) -> Any:
    return value


def presized_serializer(original: Optional[Callable[[Any], bytes]]) -> Callable[[Any], Any]:
    """`original`, or the bytes this very request was already serialized to.
    A buffer_serializer is not presized (its size is its view's): as it is."""
    serialize = original or _identity
    if views_of(serialize) is not None:
        return serialize

    def serializer(message: Any) -> Any:
        done = _presized.get()
        if done is not None and done[0] is message:
            # Taken, not shared: the bytes live no longer than gRPC (or the
            # offload) needs them, as if serialized here. A large request
            # kept alive through its call changes how glibc's malloc reuses
            # memory for every large buffer after it (3x the page faults).
            data, done[0], done[1] = done[1], None, None
            return data
        return serialize(message)

    return serializer


class MethodPath:
    """What the multicallables of one method share on the way to deciding
    whether a call carries the hello: whether the method has carried a
    message at or above the threshold (either way), and else the caller's
    serializer, run once per request to learn its size."""

    __slots__ = ("method", "serializer", "threshold", "large")

    def __init__(self, channel_engine: Engine, method: str, serializer: Optional[Callable], large: set):
        self.method = method
        self.serializer = serializer or _identity
        self.threshold = channel_engine.config.threshold
        self.large = large  # the channel's: methods that sent or answered at or above the threshold

    def presize(self, request: Any) -> Any:
        """The request's bytes, or None when the serializer fails or makes
        no bytes: then the call goes as it would without shmgrpc, and gRPC
        runs the serializer again and reports the failure in its own way."""
        try:
            data = self.serializer(request)
        except Exception:
            return None
        return data if isinstance(data, (bytes, bytearray, memoryview)) else None

    def sized(self, request: Any) -> Tuple[int, Any]:
        """(the request's serialized size, its bytes or None when the
        serializer failed). Serialized once, here; the bytes are handed to
        gRPC's serializer (presized_serializer). protobuf's ByteSize() would
        not spare it: upb computes it by serializing into a buffer of its
        own (measured: 0.6 ms per 1 MiB message, beside the real one)."""
        views = views_of(self.serializer)
        if views is not None:  # a buffer: its size without a copy, and nothing to hand on
            try:
                return views(request).nbytes, None
            except Exception:
                return 0, None
        data = self.presize(request)
        return (0 if data is None else len(data)), data

    def route_state(self, engine: Engine, request: Any, always_hello: bool) -> Tuple[Any, Any]:
        """(the call's hello state, ClientHandshake.call_state(), or None: it
        goes without hello; the token of the presized bytes to reset when
        the call has started, or None)."""
        if always_hello or self.method in self.large:
            # No size check: the call's own serializer offloads or not. In
            # grpc.aio that runs in the call's task, after the loop has let go
            # of the previous call's response; serialized here, before that,
            # the request's buffers land above the old response and glibc
            # hands all of it back to the kernel when they are freed: the
            # next call faults every page in again (aio 1 MiB: 2.6 -> 0.6 ms
            # of client CPU per call).
            return engine.client.call_state(), None
        size, data = self.sized(request)
        token = _presized.set([request, data]) if data is not None else None
        if size < self.threshold:
            return None, token  # no hello: small, and the method never carried a large message
        self.large.add(self.method)
        return engine.client.call_state(), token

    def noting(self, original: Optional[Callable[[bytes], Any]]) -> Callable[[bytes], Any]:
        """`original`, noting a large answer on a call without hello: the
        method's next calls carry it, so their large answers can be offloaded."""
        deserialize = original or _identity
        threshold, large, method = self.threshold, self.large, self.method

        def deserializer(raw: bytes) -> Any:
            if len(raw) >= threshold:
                large.add(method)
            return deserialize(raw)

        setattr(deserializer, PARSES_VIEWS, parses_views(deserialize))  # raw goes on untouched
        setattr(deserializer, KEEPS, keeps_view(deserialize))
        return deserializer


def with_hello(metadata, hello: Tuple[str, str]):
    return (*(metadata or ()), hello)


def without_welcome(metadata):
    """Metadata as the application sees it: no shmgrpc-welcome (a server sends
    one in a call's trailers while the channel has not settled its route)."""
    if metadata is None or not any(m[0] == wire.WELCOME_KEY for m in metadata):
        return metadata
    return tuple(m for m in metadata if m[0] != wire.WELCOME_KEY)




def resend_reason(error: grpc.RpcError, codec: Optional[CallCodec]) -> Optional[str]:
    """Why a failed framed call should be sent again, plain, or None.

    - "stale": a shmgrpc server refused a cma handle keyed for another
      server process (the channel reconnected) and asks for it inline;
    - "plain": the request reached a server without shmgrpc, whose
      deserializer refused the frame (a channel balancing over a mix of
      servers, or a server replaced by one without shmgrpc)."""
    if codec is None or not codec.framed:
        return None
    try:
        code, details, trailing = error.code(), error.details(), error.trailing_metadata()
    except Exception:  # not a finished grpc.Call
        return None
    if wire.metadata_value(trailing, wire.RETRY_KEY) is not None:
        return "stale"
    if code == grpc.StatusCode.INTERNAL and details == _DESERIALIZE_REQUEST_FAILED and codec.sent_frame:
        return "plain"
    return None


class RestoreError(grpc.RpcError, grpc.Call, grpc.Future):
    """A call whose response handle could not be restored. gRPC itself
    failed the call with INTERNAL ("Exception deserializing response!"); this
    says what really happened: DATA_LOSS, INVALID_ARGUMENT or
    RESOURCE_EXHAUSTED, with details naming it. Metadata and
    debug_error_string() are the failed call's."""

    def __init__(self, err: ShmGrpcError, call=None):
        super().__init__(details_of(err))
        self.error = err
        self._call = call

    def code(self):
        return self.error.status_code

    def details(self):
        return details_of(self.error)

    def debug_error_string(self):
        inner = getattr(self._call, "debug_error_string", None)
        text = inner() if inner is not None else ""
        return details_of(self.error) + (f" (gRPC: {text})" if text else "")

    def initial_metadata(self):
        return self._call.initial_metadata() if self._call is not None else None

    def trailing_metadata(self):
        return without_welcome(self._call.trailing_metadata()) if self._call is not None else None

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def cancelled(self):
        return False

    def running(self):
        return False

    def done(self):
        return True

    def result(self, timeout=None):
        raise self

    def exception(self, timeout=None):
        return self

    def traceback(self, timeout=None):
        return None

    def add_callback(self, callback):
        return False

    def add_done_callback(self, fn):
        fn(self)

    def __str__(self):
        return f"<shmgrpc RestoreError of RPC that terminated with:\n\tstatus = {self.code()}\n\tdetails = \"{self.details()}\"\n>"

    __repr__ = __str__


def _converted(err: grpc.RpcError, codec: Optional[CallCodec]) -> grpc.RpcError:
    """The error the application sees for `err`: itself, unless it is gRPC's
    INTERNAL for a response handle we could not restore."""
    if codec is not None and codec.failure is not None:
        return RestoreError(codec.failure, err)
    return err


class _CallProxy(grpc.RpcError, grpc.Call, grpc.Future):
    """A call (future, response iterator) of the wrapped channel, whose
    errors are converted (see _converted). Like gRPC's own, it is itself a
    grpc.RpcError, and raises itself when the call fails."""

    def __init__(self, inner, codec: Optional[CallCodec]):
        super().__init__()
        self._inner = inner
        self._codec = codec

    def _raised(self, err: grpc.RpcError) -> grpc.RpcError:
        """What the application gets raised: the restore's own error, or this
        proxy (metadata without shmgrpc's keys) for the call's error."""
        converted = _converted(err, self._codec)
        if converted is not err:
            return converted
        return self if err is self._inner else _CallProxy(err, self._codec)

    def __repr__(self):
        return repr(self._inner)

    __str__ = __repr__

    def _error(self) -> Optional[RestoreError]:
        codec = self._codec
        if codec is not None and codec.failure is not None and not self._inner.running():
            return RestoreError(codec.failure, self._inner)
        return None

    # grpc.Call / grpc.RpcContext
    def initial_metadata(self):
        return self._inner.initial_metadata()

    def trailing_metadata(self):
        return without_welcome(self._inner.trailing_metadata())

    def code(self):
        error = self._error()
        return error.code() if error is not None else self._inner.code()

    def details(self):
        error = self._error()
        return error.details() if error is not None else self._inner.details()

    def debug_error_string(self):
        error = self._error()
        return error.debug_error_string() if error is not None else self._inner.debug_error_string()

    def is_active(self):
        return self._inner.is_active()

    def time_remaining(self):
        return self._inner.time_remaining()

    def cancel(self):
        if self._codec is not None:
            self._codec.cancelled = True  # before gRPC's: a response read meanwhile ends CANCELLED
        return self._inner.cancel()

    def add_callback(self, callback):
        return self._inner.add_callback(callback)

    # grpc.Future
    def cancelled(self):
        return self._inner.cancelled()

    def running(self):
        return self._inner.running()

    def done(self):
        return self._inner.done()

    def result(self, timeout=None):
        try:
            return self._inner.result(timeout)
        except grpc.RpcError as err:
            raise self._raised(err) from None

    def exception(self, timeout=None):
        err = self._inner.exception(timeout)
        return self._raised(err) if isinstance(err, grpc.RpcError) else err

    def traceback(self, timeout=None):
        return self._inner.traceback(timeout)

    def add_done_callback(self, fn):
        self._inner.add_done_callback(lambda _: fn(self))

    # response streams
    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._inner)
        except grpc.RpcError as err:
            raise self._raised(err) from None

    next = __next__


class _Call:
    """One call that carries the hello: its multicallable, metadata, codec,
    the tickets of its offloaded requests, and whether it is the channel's
    first contact with its server (no route yet)."""

    __slots__ = ("multicallable", "metadata", "timeout", "codec", "tickets", "first_contact")

    def __init__(self, multicallable, metadata, timeout, codec: CallCodec, first_contact: bool):
        self.multicallable = multicallable
        self.metadata = metadata
        self.timeout = timeout
        self.codec = codec
        self.tickets: Optional[Tickets] = None  # made on the first offload only: most calls make none
        self.first_contact = first_contact

    def keep(self, ticket) -> None:
        """The codec's keep: an offloaded request, freed when the call ends."""
        if self.tickets is None:
            self.tickets = Tickets(self.codec.engine)
        self.tickets.add(ticket)

    def release(self) -> None:
        if self.tickets is not None:
            self.tickets.release()

    def settle(self, engine: Engine, finished) -> bool:
        """`finished` (the call, or its RpcError) is over: free its offloaded
        requests and learn from its trailers (ClientHandshake.answered). True
        if they carry a welcome (the application's view then needs it
        stripped)."""
        self.release()
        try:
            trailing = finished.trailing_metadata()
            ok = finished.code() == grpc.StatusCode.OK
        except Exception:  # not a finished grpc.Call: nothing to learn
            return False
        engine.client.answered(ok, trailing, self.first_contact)
        return wire.metadata_value(trailing, wire.WELCOME_KEY) is not None


def _settling(responses: Iterator, call: _Call, engine: Engine) -> Iterator:
    """A response stream that is not a grpc.Call (an interceptor inside the
    wrapper may return a generator: grpc's API allows it): the call's
    offloaded requests are freed when it ends, a response handle that could
    not be restored fails it with its own status. Without the call object
    there are no trailers to learn from: a later call does that."""
    try:
        yield from responses
    except grpc.RpcError as err:
        converted = _converted(err, call.codec)
        if converted is err:
            raise
        raise converted from None
    finally:
        call.release()


class _MultiCallable:
    """What the four shapes share: the start of a call."""

    _kind = ""  # the inner channel's factory: "unary_unary", ...
    _always_hello = False  # a request stream: it may carry a handle, whatever its first message

    def __init__(self, channel: "Channel", method: str, serializer, deserializer, registered: bool):
        self._channel = channel
        self._method = method
        self._registered = registered
        self._path = MethodPath(channel._engine, method, serializer, channel._large)
        self._serializer = presized_serializer(serializer)
        self._deserializer = self._path.noting(deserializer)  # framed calls note large answers too
        # The inner multicallables, made now as a stub makes its own:
        # registering a method on a channel that was closed since is what
        # gRPC must never be asked to do. `_plain`: the caller's codec, for a
        # channel that is plain; `_quiet`: for a call without hello, with the
        # serializer that reuses the bytes the size check made, and the
        # deserializer that notes a large answer.
        factory = getattr(channel._inner, self._kind)
        kwargs = {"_registered_method": True} if registered else {}
        self._plain = factory(method, serializer, deserializer, **kwargs)
        self._quiet = factory(method, self._serializer, self._deserializer, **kwargs)
        # (route, its multicallable with a ThreadCodec): see _framed_multicallable
        self._framed: Optional[Tuple[Any, Any]] = None

    def _framed_multicallable(self, route):
        """The multicallable for blocking calls on `route`, made once per
        route and registered like the caller's (see ThreadCodec)."""
        framed = self._framed
        if framed is None or framed[0] is not route:
            codec = ThreadCodec(self._channel._engine, route, self._serializer, self._deserializer)
            kwargs = {"_registered_method": True} if self._registered else {}
            factory = getattr(self._channel._inner, self._kind)
            framed = self._framed = (route, factory(self._method, codec.serialize, codec.deserialize, **kwargs))
        return framed[1]

    def _hello_call(self, state, timeout, metadata, blocking: bool) -> _Call:
        """A call that carries the hello of `state` (hello, route)."""
        hello, route = state
        engine = self._channel._engine
        # No codec yet (None): it needs call.keep, and is set on the next line.
        call = _Call(None, (*metadata, hello) if metadata else (hello,), timeout,
                     None, route is None)  # type: ignore[arg-type]
        codec = call.codec = CallCodec(engine, route, keep=call.keep,
                                       deadline=None if timeout is None else time.monotonic() + timeout)
        if not codec.framed:
            # First contact: its messages go inline; the welcome comes back
            # in its trailers.
            call.multicallable = self._quiet
        elif blocking:
            call.multicallable = self._framed_multicallable(route)
        else:
            # A multicallable of this call's own: its serializers are this
            # call's (gRPC may run them in another thread). Not registered:
            # gRPC's registration is not meant for many threads at once.
            factory = getattr(self._channel._inner, self._kind)
            call.multicallable = factory(self._method, codec.serializer(self._serializer),
                                         codec.deserializer(self._deserializer))
        return call

    def _launch(self, how: str, request, timeout, metadata, credentials, wait_for_ready, compression):
        """Start a call that returns at once (`future`, or a response
        stream's `__call__`)."""
        engine = self._channel._engine
        if engine.plain:
            return getattr(self._plain, how)(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                              wait_for_ready=wait_for_ready, compression=compression)
        state, token = self._path.route_state(engine, request, self._always_hello)
        try:
            if state is None:
                return getattr(self._quiet, how)(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                                  wait_for_ready=wait_for_ready, compression=compression)
            call = self._hello_call(state, timeout, metadata, blocking=False)
            inner = getattr(call.multicallable, how)(
                request, timeout=timeout, metadata=call.metadata, credentials=credentials,
                wait_for_ready=wait_for_ready, compression=compression,
            )
        finally:
            if token is not None:
                _presized.reset(token)
        add_done_callback = getattr(inner, "add_done_callback", None)
        if add_done_callback is None:
            return _settling(inner, call, engine)
        add_done_callback(lambda finished: call.settle(engine, finished))
        return _CallProxy(inner, call.codec)

    def _resend(self, reason: str, error: grpc.RpcError) -> None:
        engine = self._channel._engine
        if reason == "plain":
            engine.client.lost_peer(
                "a request frame reached a server without shmgrpc (it could not deserialize it); "
                "the request was resent inline and this channel stays plain"
            )
        else:
            engine.stats.add("fallback", "resent_inline")
            engine.client.welcome(error.trailing_metadata())


class _UnaryRequest(_MultiCallable):
    """unary-unary and stream-unary: __call__, with_call, future."""

    def _invoke(self, state, request, timeout, metadata, credentials, wait_for_ready, compression, resend: bool):
        """(response, call) of a blocking call that carries the hello of `state`."""
        engine = self._channel._engine
        call = self._hello_call(state, timeout, metadata, blocking=not self._always_hello)
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = getattr(current, "codec", None)
        current.codec = call.codec  # the codec of this thread's call (see ThreadCodec)
        try:
            response, outcome = call.multicallable.with_call(
                request, timeout=timeout, metadata=call.metadata, credentials=credentials,
                wait_for_ready=wait_for_ready, compression=compression,
            )
        except grpc.RpcError as err:
            welcomed = call.settle(engine, err)
            reason = resend_reason(err, call.codec) if resend and not self._always_hello else None
            if reason is None:
                converted = _converted(err, call.codec)
                if converted is err and not welcomed:
                    raise  # gRPC's own error, as gRPC raised it
                raise (converted if converted is not err else _CallProxy(err, call.codec)) from None
            self._resend(reason, err)
            # Sent again plain: no hello, no frame, whatever server it reaches.
            return self._quiet.with_call(request, timeout=remaining(deadline), metadata=metadata,
                                         credentials=credentials, wait_for_ready=wait_for_ready,
                                         compression=compression)
        finally:
            current.codec = previous
        if call.settle(engine, outcome):
            return response, _CallProxy(outcome, call.codec)  # its trailers without our welcome
        return response, outcome

    def _blocking(self, with_call: bool, request, timeout, metadata, credentials, wait_for_ready, compression):
        engine = self._channel._engine
        state, token = (None, None) if engine.plain else self._path.route_state(engine, request, self._always_hello)
        try:
            if state is not None:
                answer = self._invoke(state, request, timeout, metadata, credentials, wait_for_ready, compression,
                                      True)
                return answer if with_call else answer[0]
            mc = self._plain if engine.plain else self._quiet
            call = mc.with_call if with_call else mc
            return call(request, timeout=timeout, metadata=metadata, credentials=credentials,
                        wait_for_ready=wait_for_ready, compression=compression)
        finally:
            if token is not None:
                _presized.reset(token)

    def with_call(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._blocking(True, request, timeout, metadata, credentials, wait_for_ready, compression)

    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._blocking(False, request, timeout, metadata, credentials, wait_for_ready, compression)

    def future(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._launch("future", request, timeout, metadata, credentials, wait_for_ready, compression)


class UnaryUnaryMultiCallable(_UnaryRequest, grpc.UnaryUnaryMultiCallable):
    _kind = "unary_unary"


class StreamUnaryMultiCallable(_UnaryRequest, grpc.StreamUnaryMultiCallable):
    _kind = "stream_unary"
    _always_hello = True  # its request iterator cannot be resent

    # grpc's parameter names: a caller may pass `request_iterator=` by keyword.
    def with_call(self, request_iterator, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                  compression=None):
        return self._blocking(True, request_iterator, timeout, metadata, credentials, wait_for_ready, compression)

    def __call__(self, request_iterator, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        return self._blocking(False, request_iterator, timeout, metadata, credentials, wait_for_ready, compression)

    def future(self, request_iterator, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
               compression=None):
        return self._launch("future", request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamResponse(_MultiCallable):
    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._launch("__call__", request, timeout, metadata, credentials, wait_for_ready, compression)


class UnaryStreamMultiCallable(_StreamResponse, grpc.UnaryStreamMultiCallable):
    _kind = "unary_stream"


class StreamStreamMultiCallable(_StreamResponse, grpc.StreamStreamMultiCallable):
    _kind = "stream_stream"
    _always_hello = True

    def __call__(self, request_iterator, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):  # grpc's parameter names (see StreamUnaryMultiCallable)
        return self._launch("__call__", request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class Channel(EngineOwner, grpc.Channel):
    """A grpc.Channel that offloads large messages to a co-located server.

    Build it with shmgrpc.intercept_channel() or shmgrpc.insecure_channel().
    One wrapper per channel: it knows the one server its channel talks to."""

    def __init__(self, channel: grpc.Channel, config: Optional[Config] = None,
                 options: Optional[Sequence[Tuple[str, Any]]] = None, name: str = "") -> None:
        if not isinstance(channel, grpc.Channel):
            hint = " (a grpc.aio channel: use shmgrpc.aio.intercept_channel)" if isinstance(
                channel, grpc.aio.Channel) else ""
            raise TypeError(f"shmgrpc.intercept_channel needs a grpc.Channel, not {type(channel).__name__}{hint}")
        check_config(config, "shmgrpc.intercept_channel")
        self._inner = channel
        self._engine = Engine(config, "client", options, name or type(channel).__name__)
        self._large: set = set()  # methods that sent or answered at or above the threshold (see MethodPath)

    # grpc.Channel

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self._inner.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._inner.unsubscribe(callback)

    def unary_unary(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                    response_deserializer: Optional[Callable[[bytes], Any]] = None,
                    _registered_method: bool = False) -> grpc.UnaryUnaryMultiCallable:
        return UnaryUnaryMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                     response_deserializer: Optional[Callable[[bytes], Any]] = None,
                     _registered_method: bool = False) -> grpc.UnaryStreamMultiCallable:
        return UnaryStreamMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                     response_deserializer: Optional[Callable[[bytes], Any]] = None,
                     _registered_method: bool = False) -> grpc.StreamUnaryMultiCallable:
        return StreamUnaryMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                      response_deserializer: Optional[Callable[[bytes], Any]] = None,
                      _registered_method: bool = False) -> grpc.StreamStreamMultiCallable:
        return StreamStreamMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def close(self) -> None:
        """Close the wrapped channel and let go of shared memory."""
        try:
            self._inner.close()
        finally:
            self._engine.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()  # None: never swallows the exception (a checker knows code after `with` may not run)

    def status(self) -> ChannelStatus:
        """Which transport carries this channel's large messages now, and why."""
        return self._engine.status()


def intercept_channel(channel: grpc.Channel, config: Optional[Config] = None, *,
                      options: Optional[Sequence[Tuple[str, Any]]] = None) -> Channel:
    """Wrap `channel` so that large messages to a co-located shmgrpc server
    travel through shared memory.

    `options`: the options `channel` was built with. shmgrpc reads the
    message-size limits from them (grpc.max_send_message_length,
    grpc.max_receive_message_length) and offloads nothing gRPC would refuse;
    without them it assumes gRPC's defaults (receive 4 MiB, send unlimited),
    so larger responses travel inline, where the channel's real limits apply."""
    return Channel(channel, config, options, name=_target_of(channel))


def insecure_channel(target: str, options: Optional[Sequence[Tuple[str, Any]]] = None,
                     compression: Optional[grpc.Compression] = None, *,
                     config: Optional[Config] = None) -> Channel:
    """grpc.insecure_channel(target, options, compression), wrapped."""
    return Channel(grpc.insecure_channel(target, options=options, compression=compression), config, options,
                   name=target)


def secure_channel(target: str, credentials: grpc.ChannelCredentials,
                   options: Optional[Sequence[Tuple[str, Any]]] = None,
                   compression: Optional[grpc.Compression] = None, *,
                   config: Optional[Config] = None) -> Channel:
    """grpc.secure_channel(target, credentials, options, compression), wrapped."""
    return Channel(grpc.secure_channel(target, credentials, options=options, compression=compression), config,
                   options, name=target)


def _target_of(channel) -> str:
    target = getattr(channel, "_target", None)
    return target if isinstance(target, str) else type(channel).__name__


def channel_status(channel: object) -> ChannelStatus:
    """The ChannelStatus of a channel made by shmgrpc (sync or aio)."""
    status = getattr(channel, "status", None)
    if status is None or not isinstance(channel, EngineOwner):
        raise TypeError(f"{type(channel).__name__} is not a shmgrpc channel; wrap it with shmgrpc.intercept_channel()")
    return status()
