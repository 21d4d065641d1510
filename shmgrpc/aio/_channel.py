"""The grpc.aio client: a grpc.aio.Channel that wraps another, one engine per
channel. The same design as the sync wrapper (shmgrpc._channel): the same
calls carry the hello, the same multicallables serve those that do not, and
a call that may carry a handle gets a multicallable of the inner channel
built with the caller's own (de)serializers wrapped for its route.

grpc.aio's multicallables return a call object at once and do their work in
tasks; so does this wrapper: a call that carries the hello is the inner
call, started at once, behind a thin proxy that frees the call's offloaded
requests when it ends, learns the route from its trailers, and turns a
response handle that could not be restored into an AioRpcError with its own
status (grpc.aio would hand the caller None with status OK:
grpc/aio/_call.py logs a deserializer's exception and returns None).

Restoring runs where grpc.aio deserializes, on the event loop: a parse of a
large message blocks the loop there, as it does in plain grpc.aio. Nothing
there waits for the server: a handle naming a memfd segment that is not
here fails at once (shmgrpc.side), and a new welcome, whose side connection
waits for the server's answer, is learned in a thread of its own (_off_loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import grpc
from grpc import aio

from .. import wire
from .._channel import (
    MethodPath,
    _presized,
    _target_of,
    presized_serializer,
    remaining,
    resend_reason,
    with_hello,
    without_welcome,
)
from .._codec import CallCodec, Tickets, details_of
from .._core import ChannelStatus, Engine, EngineOwner
from ..config import Config, check_config
from ..errors import ShmGrpcError




async def _off_loop(fn: Callable, *args) -> None:
    """fn(*args) in a thread of its own, awaited: the loop runs meanwhile.
    One thread per welcome (they are rare): a server that keeps sending new
    ones delays only its own channel's calls, and no pool is held up."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(error: Optional[BaseException]) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def run() -> None:
        error: Optional[BaseException] = None
        try:
            fn(*args)
        except BaseException as err:  # handed to the awaiting task
            error = err
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=run, name="shmgrpc-welcome", daemon=True).start()
    await done


def _clean(err: aio.AioRpcError) -> aio.AioRpcError:
    """The call's error as the application sees it: no shmgrpc-welcome in its
    trailing metadata (see shmgrpc._channel.without_welcome)."""
    trailing = err.trailing_metadata()
    if trailing is None or wire.metadata_value(trailing, wire.WELCOME_KEY) is None:
        return err
    kept = aio.Metadata(*[(k, v) for k, v in trailing if k != wire.WELCOME_KEY])
    return aio.AioRpcError(err.code(), err.initial_metadata(), kept, err.details(), err.debug_error_string())


def _error_of(err: ShmGrpcError, initial, trailing, inner_debug: Optional[str] = None) -> aio.AioRpcError:
    return aio.AioRpcError(err.status_code, initial, trailing, details_of(err),
                           details_of(err) + (f" (gRPC: {inner_debug})" if inner_debug else ""))


class _Call:
    """What all four call shapes share: the start and the grpc.aio.Call
    surface, forwarded to the inner call."""

    def __init__(self, multicallable: "_MultiCallable", request, timeout, metadata, credentials,
                 wait_for_ready, compression, first_contact: bool):
        self._mc = multicallable
        self._request = request
        self._args = (timeout, metadata, credentials, wait_for_ready, compression)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._inner: Any = None
        self._codec: Optional[CallCodec] = None
        self._failure: Optional[aio.AioRpcError] = None
        self._first_contact = first_contact
        self._learned = False

    def _start_now(self, state, timeout: Optional[float]) -> None:
        """Start the inner call with this route state (None: plain)."""
        _, metadata, credentials, wait_for_ready, compression = self._args
        mc = self._mc
        tickets = None
        if state is None:
            multicallable, md = mc._quiet, metadata
        else:
            hello, route = state
            engine = mc._channel._engine
            tickets = Tickets(engine)
            self._codec = CallCodec(engine, route, keep=tickets.add, deadline=self._deadline)
            if self._codec.framed:
                multicallable = mc._factory()(mc._method, self._codec.serializer(mc._serializer),
                                              self._codec.deserializer(mc._deserializer))
            else:  # first contact: inline, the welcome comes in the trailers
                multicallable = mc._quiet
            md = with_hello(metadata, hello)
        self._inner = multicallable(self._request, timeout=timeout, metadata=md, credentials=credentials,
                                    wait_for_ready=wait_for_ready, compression=compression)
        if tickets is not None:
            self._inner.add_done_callback(lambda _: tickets.release())

    async def _learn(self, inner, ok: bool) -> None:
        """After a call that carried the hello: its trailers tell us our
        route (a welcome), or that the server has no shmgrpc (a first
        contact that ended OK without one)."""
        if self._codec is not None and not self._learned:
            self._learned = True
            engine = self._mc._channel._engine
            trailing = await inner.trailing_metadata()
            if engine.client.new_welcome(trailing):
                await _off_loop(engine.client.answered, ok, trailing, self._first_contact)
            else:
                engine.client.answered(ok, trailing, self._first_contact)

    async def _restore_failed(self, inner) -> aio.AioRpcError:
        inner.cancel()
        if self._failure is None:
            initial = trailing = None
            try:
                initial = await inner.initial_metadata()
                trailing = await inner.trailing_metadata()
            except Exception:  # a cancelled call may have neither
                pass
            codec = self._codec
            assert codec is not None and codec.failure is not None  # what the callers checked
            self._failure = _error_of(codec.failure, initial, trailing)
        return self._failure

    # -- grpc.aio.Call

    def cancel(self) -> bool:
        if self._codec is not None:
            self._codec.cancelled = True  # before gRPC's: a response read meanwhile ends CANCELLED
        return self._inner.cancel()

    def cancelled(self) -> bool:
        return self._inner.cancelled()

    def done(self) -> bool:
        return self._inner.done()

    def time_remaining(self) -> Optional[float]:
        return self._inner.time_remaining()

    def add_done_callback(self, callback) -> None:
        self._inner.add_done_callback(lambda _: callback(self))  # the callback gets this call, as grpc.aio's do

    async def initial_metadata(self):
        return await self._inner.initial_metadata()

    async def trailing_metadata(self):
        trailing = await self._inner.trailing_metadata()
        if trailing is None or wire.metadata_value(trailing, wire.WELCOME_KEY) is None:
            return trailing
        return aio.Metadata(*without_welcome(tuple(trailing)))

    async def code(self) -> grpc.StatusCode:
        code = await self._inner.code()
        return self._failure.code() if self._failure is not None else code

    async def details(self) -> str:
        details = await self._inner.details()
        return (self._failure.details() or "") if self._failure is not None else details  # ours always has some

    async def debug_error_string(self) -> Optional[str]:
        text = await self._inner.debug_error_string()
        return self._failure.debug_error_string() if self._failure is not None else text

    async def wait_for_connection(self) -> None:
        return await self._inner.wait_for_connection()


# The three parts below derive from _Call, whose state they use; each call
# class lists them before _Call, so the order of methods is what it was.
class _UnaryResponse(_Call):
    """__await__ of unary-unary and stream-unary calls."""

    def __await__(self):
        return self._response().__await__()

    async def _response(self):
        inner = self._inner
        try:
            response = await inner
        except aio.AioRpcError as err:
            reason = resend_reason(err, self._codec) if self._resendable else None
            if reason is None:
                await self._learn(inner, False)
                raise _clean(err) from None
            response = await self._resend(reason, err)
            inner = self._inner
        if self._codec is not None and self._codec.failure is not None:
            raise await self._restore_failed(inner)
        await self._learn(inner, True)
        return response

    async def _resend(self, reason: str, err: aio.AioRpcError):
        """Send the request again, plain (see shmgrpc._channel.resend_reason)."""
        engine = self._mc._channel._engine
        if reason == "plain":
            engine.client.lost_peer(
                "a request frame reached a server without shmgrpc (it could not deserialize it); "
                "the request was resent inline and this channel stays plain"
            )
        else:
            engine.stats.add("fallback", "resent_inline")
            if engine.client.new_welcome(err.trailing_metadata()):
                await _off_loop(engine.client.welcome, err.trailing_metadata())
            else:
                engine.client.welcome(err.trailing_metadata())
        self._resendable = False
        self._start_now(None, remaining(self._deadline))  # plain: no hello, no frame
        try:
            return await self._inner
        except aio.AioRpcError as again:
            raise _clean(again) from None


class _StreamResponse(_Call):
    """read() and async iteration of unary-stream and stream-stream calls."""

    async def read(self):
        inner = self._inner
        try:
            response = await inner.read()
        except aio.AioRpcError as err:
            await self._learn(inner, False)
            raise _clean(err) from None
        if response is aio.EOF:
            await self._learn(inner, await inner.code() == grpc.StatusCode.OK)
        elif self._codec is not None and self._codec.failure is not None:
            raise await self._restore_failed(inner)
        return response

    def __aiter__(self):
        return self._responses()

    async def _responses(self):
        while True:
            response = await self.read()
            if response is aio.EOF:
                return
            yield response


class _RequestStream(_Call):
    """write() and done_writing() of stream-unary and stream-stream calls."""

    async def write(self, request) -> None:
        await self._inner.write(request)

    async def done_writing(self) -> None:
        await self._inner.done_writing()


class UnaryUnaryCall(_UnaryResponse, _Call, aio.UnaryUnaryCall):
    _resendable = True


class UnaryStreamCall(_StreamResponse, _Call, aio.UnaryStreamCall):
    pass


class StreamUnaryCall(_RequestStream, _UnaryResponse, _Call, aio.StreamUnaryCall):
    _resendable = False


class StreamStreamCall(_RequestStream, _StreamResponse, _Call, aio.StreamStreamCall):
    pass


class _MultiCallable:
    _kind = ""
    _call_type: type = _Call
    _always_hello = False  # a request stream: it may carry a handle, whatever its first message

    def __init__(self, channel: "Channel", method: str, serializer, deserializer, registered: bool):
        self._channel = channel
        self._method = method
        self._path = MethodPath(channel._engine, method, serializer, channel._large)
        self._serializer = presized_serializer(serializer)
        self._deserializer = self._path.noting(deserializer)  # framed calls note large answers too
        kwargs = {"_registered_method": True} if registered else {}
        factory = self._factory()
        # Made now, as a stub does (see shmgrpc._channel._MultiCallable).
        self._plain = factory(method, serializer, deserializer, **kwargs)
        self._quiet = factory(method, self._serializer, self._deserializer, **kwargs)

    def _factory(self):
        return getattr(self._channel._inner, self._kind)

    def __call__(self, request, *, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        engine = self._channel._engine
        if engine.plain:
            return self._plain(request, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression)
        # grpc.aio serializes in the task it creates for the call, which
        # copies this context: the bytes the size check made are the ones sent.
        state, token = self._path.route_state(engine, request, self._always_hello)
        try:
            if state is None:
                return self._quiet(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                   wait_for_ready=wait_for_ready, compression=compression)
            call = self._call_type(self, request, timeout, metadata, credentials, wait_for_ready, compression,
                                   state[1] is None)
            call._start_now(state, timeout)
            return call
        finally:
            if token is not None:
                _presized.reset(token)


class UnaryUnaryMultiCallable(_MultiCallable, aio.UnaryUnaryMultiCallable):
    _kind = "unary_unary"
    _call_type = UnaryUnaryCall


class UnaryStreamMultiCallable(_MultiCallable, aio.UnaryStreamMultiCallable):
    _kind = "unary_stream"
    _call_type = UnaryStreamCall


class _StreamRequest(_MultiCallable):
    """grpc.aio's request-streaming multicallables take `request_iterator`
    (by keyword too) and the rest by position as well (its unary-request
    ones take `request` and the rest by keyword only, as _MultiCallable)."""

    def __call__(self, request_iterator=None, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        return _MultiCallable.__call__(self, request_iterator, timeout=timeout, metadata=metadata,
                                       credentials=credentials, wait_for_ready=wait_for_ready, compression=compression)


class StreamUnaryMultiCallable(_StreamRequest, aio.StreamUnaryMultiCallable):
    _kind = "stream_unary"
    _call_type = StreamUnaryCall
    _always_hello = True


class StreamStreamMultiCallable(_StreamRequest, aio.StreamStreamMultiCallable):
    _kind = "stream_stream"
    _call_type = StreamStreamCall
    _always_hello = True


class Channel(EngineOwner, aio.Channel):
    """A grpc.aio.Channel that offloads large messages to a co-located server.

    Build it with shmgrpc.aio.intercept_channel() or shmgrpc.aio.insecure_channel()."""

    def __init__(self, channel: aio.Channel, config: Optional[Config] = None,
                 options: Optional[Sequence[Tuple[str, Any]]] = None, name: str = "") -> None:
        if not isinstance(channel, aio.Channel):
            hint = " (a sync grpc channel: use shmgrpc.intercept_channel)" if isinstance(channel, grpc.Channel) else ""
            raise TypeError(f"shmgrpc.aio.intercept_channel needs a grpc.aio.Channel, not {type(channel).__name__}{hint}")
        check_config(config, "shmgrpc.aio.intercept_channel")
        self._inner = channel
        self._engine = Engine(config, "client", options, name or type(channel).__name__)
        self._large: set = set()  # methods that sent or answered at or above the threshold (see MethodPath)

    # grpc.aio.Channel

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    # grpc.aio.Channel's close, a coroutine, replaces EngineOwner's (which it calls in effect):
    # `await channel.close()` as with any grpc.aio channel.
    async def close(self, grace: Optional[float] = None) -> None:  # type: ignore[override]
        """Close the wrapped channel and let go of shared memory."""
        try:
            await self._inner.close(grace)
        finally:
            self._engine.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        return await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()

    def unary_unary(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                    response_deserializer: Optional[Callable[[bytes], Any]] = None,
                    _registered_method: bool = False) -> aio.UnaryUnaryMultiCallable:
        return UnaryUnaryMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                     response_deserializer: Optional[Callable[[bytes], Any]] = None,
                     _registered_method: bool = False) -> aio.UnaryStreamMultiCallable:
        return UnaryStreamMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                     response_deserializer: Optional[Callable[[bytes], Any]] = None,
                     _registered_method: bool = False) -> aio.StreamUnaryMultiCallable:
        return StreamUnaryMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(self, method: str, request_serializer: Optional[Callable[[Any], bytes]] = None,
                      response_deserializer: Optional[Callable[[bytes], Any]] = None,
                      _registered_method: bool = False) -> aio.StreamStreamMultiCallable:
        return StreamStreamMultiCallable(self, method, request_serializer, response_deserializer, _registered_method)

    def status(self) -> ChannelStatus:
        """Which transport carries this channel's large messages now, and why."""
        return self._engine.status()


def intercept_channel(channel: aio.Channel, config: Optional[Config] = None, *,
                      options: Optional[Sequence[Tuple[str, Any]]] = None) -> Channel:
    """Wrap a grpc.aio channel (see shmgrpc.intercept_channel for `options`)."""
    return Channel(channel, config, options, name=_target_of(channel))


def insecure_channel(target: str, options: Optional[Sequence[Tuple[str, Any]]] = None,
                     compression: Optional[grpc.Compression] = None,
                     interceptors: Optional[Sequence[aio.ClientInterceptor]] = None, *,
                     config: Optional[Config] = None) -> Channel:
    """grpc.aio.insecure_channel(target, options, compression, interceptors), wrapped.
    The interceptors run inside the wrapper and see the application's messages."""
    inner = aio.insecure_channel(target, options=options, compression=compression, interceptors=interceptors)
    return Channel(inner, config, options, name=target)


def secure_channel(target: str, credentials: grpc.ChannelCredentials,
                   options: Optional[Sequence[Tuple[str, Any]]] = None,
                   compression: Optional[grpc.Compression] = None,
                   interceptors: Optional[Sequence[aio.ClientInterceptor]] = None, *,
                   config: Optional[Config] = None) -> Channel:
    """grpc.aio.secure_channel(...), wrapped."""
    inner = aio.secure_channel(target, credentials, options=options, compression=compression,
                               interceptors=interceptors)
    return Channel(inner, config, options, name=target)
