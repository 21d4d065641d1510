"""The sync client: a grpc.Channel that wraps another, one engine per channel.

    channel = shmgrpc.intercept_channel(grpc.insecure_channel(target, options), options=options)
    stub = my_pb2_grpc.MyServiceStub(channel)            # unchanged

Like grpc.intercept_channel (grpc/_interceptor.py, _Channel), the wrapper
hands out multicallables of the channel it wraps. The difference is where it
acts: each call gets its own multicallable of the inner channel, built with
the caller's (de)serializers wrapped for that call's route (see _codec.py).
So interceptors inside and outside the wrapper see the application's
messages, any codec works, and the per-peer state lives in the one object
that talks to that peer.

Per call:
- no route and no handshake yet: the once-per-channel handshake first, with
  the caller's metadata, credentials and wait_for_ready, within a share of
  the caller's deadline (never adding to it);
- every call carries the hello; a shmgrpc server answers a hello that does
  not name it with a welcome in the trailing metadata, so a channel whose
  handshake call was refused still learns its route from its first call;
- a channel whose server has no shmgrpc sends neither: the wrapped channel's
  own multicallable, untouched.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Tuple

import grpc

from . import wire
from ._codec import CallCodec, ThreadCodec, Tickets, current
from ._core import ChannelStatus, Engine, EngineOwner
from .config import Config
from .errors import ShmGrpcError

# The handshake gets this share of the caller's remaining time, at most
# HANDSHAKE_MAX_SECONDS (and that much when the call has no deadline). A
# healthy handshake takes a millisecond or two.
HANDSHAKE_SHARE = 0.2
HANDSHAKE_MAX_SECONDS = 5.0
_DESERIALIZE_REQUEST_FAILED = "Exception deserializing request!"  # grpc/_server.py's words


def handshake_timeout(timeout: Optional[float]) -> float:
    return HANDSHAKE_MAX_SECONDS if timeout is None else min(HANDSHAKE_MAX_SECONDS, timeout * HANDSHAKE_SHARE)


def remaining(deadline: Optional[float]) -> Optional[float]:
    """The caller's timeout, less what the handshake took (never below a
    microsecond: gRPC then fails the call with DEADLINE_EXCEEDED itself)."""
    return None if deadline is None else max(1e-6, deadline - time.monotonic())


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
        super().__init__(f"shmgrpc: {err}")
        self.error = err
        self._call = call

    def code(self):
        return self.error.status_code

    def details(self):
        return f"shmgrpc: {self.error}"

    def debug_error_string(self):
        inner = getattr(self._call, "debug_error_string", None)
        text = inner() if inner is not None else ""
        return f"shmgrpc: {self.error}" + (f" (gRPC: {text})" if text else "")

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
    """One call's start: inner multicallable, metadata, timeout, codec."""

    __slots__ = ("multicallable", "metadata", "timeout", "codec", "tickets")

    def __init__(self, multicallable, metadata, timeout):
        self.multicallable = multicallable
        self.metadata = metadata
        self.timeout = timeout
        self.codec: Optional[CallCodec] = None  # None: a plain call
        self.tickets: Optional[Tickets] = None  # made on the first offload only: most calls make none

    def keep(self, ticket) -> None:
        """The codec's keep: an offloaded request, freed when the call ends."""
        if self.tickets is None:
            self.tickets = Tickets(self.codec.engine)
        self.tickets.add(ticket)

    def watch(self, engine: Engine, call) -> None:
        """When `call` ends: free its offloaded requests, learn from its welcome."""
        if self.codec is not None:
            call.add_done_callback(lambda finished: self.settle(engine, finished))

    def settle(self, engine: Engine, finished) -> bool:
        """`finished` (the call, or its RpcError) is over: free its offloaded
        requests, learn from its welcome. True if it carried one (its
        trailing metadata then needs the welcome stripped)."""
        if self.tickets is not None:
            self.tickets.release()
        try:
            trailing = finished.trailing_metadata()
        except Exception:  # a call that never started has none
            return False
        if wire.metadata_value(trailing, wire.WELCOME_KEY) is None:
            return False
        engine.client_welcome(trailing)
        return True


class _MultiCallable:
    """What the four shapes share: the start of a call."""

    _kind = ""  # the inner channel's factory: "unary_unary", ...

    def __init__(self, channel: "Channel", method: str, serializer, deserializer, registered: bool):
        self._channel = channel
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        self._registered = registered
        # The inner multicallable with the caller's own codec, made now, as a
        # stub makes its multicallables: registering a method on a channel
        # that was closed since is what gRPC must never be asked to do.
        factory = getattr(channel._inner, self._kind)
        kwargs = {"_registered_method": True} if registered else {}
        self._plain = factory(method, serializer, deserializer, **kwargs)
        self._framed = None  # (route, its multicallable with a ThreadCodec): see _start

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

    def _start(self, request, timeout, metadata, credentials, wait_for_ready, compression, plain=False,
               blocking=False) -> _Call:
        channel = self._channel
        engine = channel._engine
        state = None if plain else engine.client_call_state()
        if state is not None and state[1] is None and engine.client_needs_handshake():
            deadline = None if timeout is None else time.monotonic() + timeout
            channel._handshake(timeout, metadata, credentials, wait_for_ready, compression)
            timeout = remaining(deadline)  # the handshake's time is the caller's, never extra
            state = engine.client_call_state()
        if state is None:
            return _Call(self._plain, metadata, timeout)
        hello, route = state
        call = _Call(None, (*metadata, hello) if metadata else (hello,), timeout)
        codec = call.codec = CallCodec(engine, route, keep=call.keep)
        if blocking and route is not None:
            call.multicallable = self._framed_multicallable(route)
        else:
            # A multicallable of this call's own: its serializers are this
            # call's (gRPC may run them in another thread). Not registered:
            # gRPC's registration is not meant for many threads at once.
            factory = getattr(channel._inner, self._kind)
            call.multicallable = factory(self._method, codec.serializer(self._serializer),
                                         codec.deserializer(self._deserializer))
        return call

    def _launch(self, how: str, request, timeout, metadata, credentials, wait_for_ready, compression):
        """Start a call that returns at once (`future`, or a response
        stream's `__call__`): the inner call, behind a _CallProxy when framed."""
        call = self._start(request, timeout, metadata, credentials, wait_for_ready, compression)
        inner = getattr(call.multicallable, how)(
            request, timeout=call.timeout, metadata=call.metadata, credentials=credentials,
            wait_for_ready=wait_for_ready, compression=compression,
        )
        if call.codec is None:
            return inner
        call.watch(self._channel._engine, inner)
        return _CallProxy(inner, call.codec)

    def _resend(self, reason: str, error: grpc.RpcError, call: _Call) -> None:
        engine = self._channel._engine
        if reason == "plain":
            engine.client_lost_peer(
                "a request frame reached a server without shmgrpc (it could not deserialize it); "
                "the request was resent inline and this channel stays plain"
            )
        else:
            engine.stats.add("fallback", "resent_inline")
            engine.client_welcome(error.trailing_metadata())


class _UnaryRequest(_MultiCallable):
    """unary-unary and stream-unary: __call__, with_call, future."""

    def _invoke(self, request, timeout, metadata, credentials, wait_for_ready, compression, resend: bool):
        engine = self._channel._engine
        call = self._start(request, timeout, metadata, credentials, wait_for_ready, compression, plain=not resend,
                           blocking=self._kind == "unary_unary")
        deadline = None if call.timeout is None else time.monotonic() + call.timeout
        if call.codec is not None:
            previous = getattr(current, "codec", None)
            current.codec = call.codec  # the codec of this thread's call (see ThreadCodec)
        try:
            response, outcome = call.multicallable.with_call(
                request, timeout=call.timeout, metadata=call.metadata, credentials=credentials,
                wait_for_ready=wait_for_ready, compression=compression,
            )
        except grpc.RpcError as err:
            if call.codec is None:
                raise
            call.settle(engine, err)
            reason = resend_reason(err, call.codec) if resend and self._resendable else None
            if reason is None:
                raise _CallProxy(err, call.codec)._raised(err)
            self._resend(reason, err, call)
            # Sent again plain: no hello, no frame, whatever server it reaches.
            return self._invoke(request, remaining(deadline), metadata, credentials, wait_for_ready, compression, False)
        finally:
            if call.codec is not None:
                current.codec = previous
        if call.codec is not None and call.settle(engine, outcome):
            return response, _CallProxy(outcome, call.codec)  # its trailers without our welcome
        return response, outcome

    def with_call(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression, True)

    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression, True)[0]

    def future(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._launch("future", request, timeout, metadata, credentials, wait_for_ready, compression)


class UnaryUnaryMultiCallable(_UnaryRequest, grpc.UnaryUnaryMultiCallable):
    _kind = "unary_unary"
    _resendable = True  # the request is still at hand


class StreamUnaryMultiCallable(_UnaryRequest, grpc.StreamUnaryMultiCallable):
    _kind = "stream_unary"
    _resendable = False  # the request iterator is consumed


class _StreamResponse(_MultiCallable):
    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None):
        return self._launch("__call__", request, timeout, metadata, credentials, wait_for_ready, compression)


class UnaryStreamMultiCallable(_StreamResponse, grpc.UnaryStreamMultiCallable):
    _kind = "unary_stream"


class StreamStreamMultiCallable(_StreamResponse, grpc.StreamStreamMultiCallable):
    _kind = "stream_stream"


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
        self._inner = channel
        self._engine = Engine(config, "client", options, name or type(channel).__name__)

    # the once-per-channel handshake

    def _handshake(self, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        """Call the handshake method once per channel. Threads starting calls
        meanwhile wait for it (at most its timeout), so their first large
        messages are offloaded too.

        A request stream of no message: it needs no serializer and no message
        of the caller's type, and interceptors inside the wrapper that only
        handle the caller's shapes are not even called for it. Nothing it
        raises reaches the caller."""
        engine = self._engine
        lock = engine.client_handshake_lock()
        if not lock.acquire(timeout=handshake_timeout(timeout)):
            return
        try:
            if not engine.client_needs_handshake():
                return  # another thread's handshake settled it
            state = engine.client_call_state()
            if state is None:
                return
            hello = state[0]
            try:
                shake = self._inner.stream_unary(wire.HANDSHAKE_METHOD)
                _, call = shake.with_call(
                    iter(()), timeout=handshake_timeout(timeout), metadata=with_hello(metadata, hello),
                    credentials=credentials, wait_for_ready=wait_for_ready, compression=compression,
                )
                engine.client_handshake_done(grpc.StatusCode.OK, call.trailing_metadata())
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                engine.client_handshake_done(code, err.trailing_metadata() if hasattr(err, "trailing_metadata") else ())
            except Exception as err:  # the caller's own interceptor or serializer, on our call
                engine.client_handshake_failed(err)
        finally:
            lock.release()

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

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        self.close()
        return False

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
    return Channel(grpc.insecure_channel(target, options, compression), config, options, name=target)


def secure_channel(target: str, credentials: grpc.ChannelCredentials,
                   options: Optional[Sequence[Tuple[str, Any]]] = None,
                   compression: Optional[grpc.Compression] = None, *,
                   config: Optional[Config] = None) -> Channel:
    """grpc.secure_channel(target, credentials, options, compression), wrapped."""
    return Channel(grpc.secure_channel(target, credentials, options, compression), config, options, name=target)


def _target_of(channel) -> str:
    target = getattr(channel, "_target", None)
    return target if isinstance(target, str) else type(channel).__name__


def channel_status(channel: object) -> ChannelStatus:
    """The ChannelStatus of a channel made by shmgrpc (sync or aio)."""
    status = getattr(channel, "status", None)
    if status is None or not isinstance(channel, EngineOwner):
        raise TypeError(f"{type(channel).__name__} is not a shmgrpc channel; wrap it with shmgrpc.intercept_channel()")
    return status()
