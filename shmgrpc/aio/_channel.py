"""The grpc.aio client: a grpc.aio.Channel that wraps another, one engine per
channel. The same design as the sync wrapper (shmgrpc._channel): each call
gets a multicallable of the inner channel built with the caller's own
(de)serializers wrapped for that call's route (shmgrpc._codec).

What differs is only the waiting. grpc.aio's multicallables return a call
object at once and do their work in tasks; so does this wrapper:

- a channel that is plain: the inner channel's own call, untouched;
- a channel that knows its route: the inner call, started at once, behind a
  thin proxy that frees the call's offloaded requests when it ends and turns
  a response handle that could not be restored into an AioRpcError with its
  own status (grpc.aio would hand the caller None with status OK:
  grpc/aio/_call.py logs a deserializer's exception and returns None);
- the channel's first call: the proxy starts a task that does the handshake
  (with the caller's metadata, credentials and wait_for_ready, within a
  share of its deadline) and then the call; every method of the proxy waits
  for that start.

Restoring runs where grpc.aio deserializes, on the event loop: a parse of a
large message blocks the loop there, as it does in plain grpc.aio.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import grpc
from grpc import aio

from .. import wire
from .._channel import (
    _target_of,
    handshake_timeout,
    remaining,
    resend_reason,
    with_hello,
    without_welcome,
)
from .._codec import CallCodec, Tickets
from .._core import ChannelStatus, Engine, EngineOwner
from ..config import Config


_LOCALLY_CANCELLED = "Locally cancelled by application!"  # grpc/aio/_call.py's words


def _clean(err: aio.AioRpcError) -> aio.AioRpcError:
    """The call's error as the application sees it: no shmgrpc-welcome in its
    trailing metadata (see shmgrpc._channel.without_welcome)."""
    trailing = err.trailing_metadata()
    if trailing is None or wire.metadata_value(trailing, wire.WELCOME_KEY) is None:
        return err
    kept = aio.Metadata(*[(k, v) for k, v in trailing if k != wire.WELCOME_KEY])
    return aio.AioRpcError(err.code(), err.initial_metadata(), kept, err.details(), err.debug_error_string())


def _error_of(codec: CallCodec, initial, trailing, inner_debug: Optional[str] = None) -> aio.AioRpcError:
    err = codec.failure
    return aio.AioRpcError(err.status_code, initial, trailing, f"shmgrpc: {err}",
                           f"shmgrpc: {err}" + (f" (gRPC: {inner_debug})" if inner_debug else ""))


class _Call:
    """What all four call shapes share: the start (maybe after a handshake)
    and the grpc.aio.Call surface, forwarded once started."""

    def __init__(self, multicallable: "_MultiCallable", request, timeout, metadata, credentials,
                 wait_for_ready, compression):
        self._mc = multicallable
        self._request = request
        self._args = (timeout, metadata, credentials, wait_for_ready, compression)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._inner = None
        self._codec: Optional[CallCodec] = None
        self._tickets: Optional[Tickets] = None
        self._cancelled = False
        self._callbacks = []
        self._failure: Optional[aio.AioRpcError] = None
        self._starting: Optional[asyncio.Task] = None

    # -- start

    def _start_now(self, state, timeout: Optional[float]) -> None:
        """Start the inner call with this route state (None: plain)."""
        _, metadata, credentials, wait_for_ready, compression = self._args
        mc = self._mc
        if state is None:
            multicallable, md = mc._plain, metadata
        else:
            hello, route = state
            engine = mc._channel._engine
            self._tickets = Tickets(engine)
            self._codec = CallCodec(engine, route, keep=self._tickets.add)
            multicallable = mc._factory()(mc._method, self._codec.serializer(mc._serializer),
                                          self._codec.deserializer(mc._deserializer))
            md = with_hello(metadata, hello)
        self._inner = multicallable(self._request, timeout=timeout, metadata=md, credentials=credentials,
                                    wait_for_ready=wait_for_ready, compression=compression)
        if self._tickets is not None:
            tickets = self._tickets
            self._inner.add_done_callback(lambda _: tickets.release())
        for callback in self._callbacks:
            self._inner.add_done_callback(callback)
        self._callbacks = []

    def _start_later(self) -> None:
        self._starting = asyncio.get_running_loop().create_task(self._handshake_then_start())

    async def _handshake_then_start(self) -> None:
        timeout, metadata, credentials, wait_for_ready, compression = self._args
        channel = self._mc._channel
        await channel._handshake(timeout, metadata, credentials, wait_for_ready, compression)
        if self._cancelled:
            return
        self._start_now(channel._engine.client_call_state(), remaining(self._deadline))

    async def _started(self):
        if self._inner is None and self._starting is not None and not self._cancelled:
            await asyncio.shield(self._starting)
        return self._inner  # None: cancelled before it started (see _Cancelled)

    async def _live(self):
        """The started inner call; CancelledError for a call cancelled before
        it started, as grpc.aio raises for its own cancelled calls."""
        inner = await self._started()
        if inner is None:
            raise asyncio.CancelledError()
        return inner

    async def _learn(self, inner) -> None:
        """After a call that carried the hello: a welcome in its trailers
        tells us our route (a new one after a reconnect)."""
        if self._codec is not None:
            self._mc._channel._engine.client_welcome(await inner.trailing_metadata())

    async def _restore_failed(self, inner) -> aio.AioRpcError:
        inner.cancel()
        if self._failure is None:
            initial = trailing = None
            try:
                initial = await inner.initial_metadata()
                trailing = await inner.trailing_metadata()
            except Exception:  # a cancelled call may have neither
                pass
            self._failure = _error_of(self._codec, initial, trailing)
        return self._failure

    # -- grpc.aio.Call

    def cancel(self) -> bool:
        if self._inner is not None:
            return self._inner.cancel()
        if self._cancelled:
            return False
        self._cancelled = True
        if self._starting is not None:
            self._starting.cancel()
        for callback in self._callbacks:
            callback(self)
        self._callbacks = []
        return True

    def cancelled(self) -> bool:
        return self._inner.cancelled() if self._inner is not None else self._cancelled

    def done(self) -> bool:
        return self._inner.done() if self._inner is not None else self._cancelled

    def time_remaining(self) -> Optional[float]:
        if self._inner is not None:
            return self._inner.time_remaining()
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_done_callback(self, callback) -> None:
        wrapped = lambda _: callback(self)  # noqa: E731 - the callback gets this call, as grpc.aio's do
        if self._inner is not None:
            self._inner.add_done_callback(wrapped)
        elif self._cancelled:
            callback(self)
        else:
            self._callbacks.append(wrapped)

    async def initial_metadata(self):
        inner = await self._started()
        return aio.Metadata() if inner is None else await inner.initial_metadata()

    async def trailing_metadata(self):
        inner = await self._started()
        if inner is None:
            return aio.Metadata()
        trailing = await inner.trailing_metadata()
        if trailing is None or wire.metadata_value(trailing, wire.WELCOME_KEY) is None:
            return trailing
        return aio.Metadata(*without_welcome(tuple(trailing)))

    async def code(self) -> grpc.StatusCode:
        inner = await self._started()
        if inner is None:
            return grpc.StatusCode.CANCELLED
        code = await inner.code()
        return self._failure.code() if self._failure is not None else code

    async def details(self) -> str:
        inner = await self._started()
        if inner is None:
            return _LOCALLY_CANCELLED
        details = await inner.details()
        return self._failure.details() if self._failure is not None else details

    async def debug_error_string(self) -> Optional[str]:
        inner = await self._started()
        if inner is None:
            return None
        text = await inner.debug_error_string()
        return self._failure.debug_error_string() if self._failure is not None else text

    async def wait_for_connection(self) -> None:
        inner = await self._started()
        if inner is None:
            raise asyncio.CancelledError()  # as grpc.aio's own cancelled call does
        return await inner.wait_for_connection()


class _UnaryResponse:
    """__await__ of unary-unary and stream-unary calls."""

    def __await__(self):
        return self._response().__await__()

    async def _response(self):
        inner = await self._live()
        try:
            response = await inner
        except aio.AioRpcError as err:
            reason = resend_reason(err, self._codec) if self._resendable else None
            if reason is None:
                await self._learn(inner)
                raise _clean(err) from None
            response = await self._resend(reason, err)
            inner = self._inner
        if self._codec is not None and self._codec.failure is not None:
            raise await self._restore_failed(inner)
        await self._learn(inner)
        return response

    async def _resend(self, reason: str, err: aio.AioRpcError):
        """Send the request again, plain (see shmgrpc._channel.resend_reason)."""
        engine = self._mc._channel._engine
        if reason == "plain":
            engine.client_lost_peer(
                "a request frame reached a server without shmgrpc (it could not deserialize it); "
                "the request was resent inline and this channel stays plain"
            )
        else:
            engine.stats.add("fallback", "resent_inline")
            engine.client_welcome(err.trailing_metadata())
        self._resendable = False
        self._start_now(None, remaining(self._deadline))  # plain: no hello, no frame
        try:
            return await self._inner
        except aio.AioRpcError as again:
            raise _clean(again) from None


class _StreamResponse:
    """read() and async iteration of unary-stream and stream-stream calls."""

    async def read(self):
        inner = await self._live()
        try:
            response = await inner.read()
        except aio.AioRpcError as err:
            raise _clean(err) from None
        if response is aio.EOF:
            await self._learn(inner)
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


class _RequestStream:
    """write() and done_writing() of stream-unary and stream-stream calls."""

    async def write(self, request) -> None:
        await (await self._live()).write(request)

    async def done_writing(self) -> None:
        await (await self._live()).done_writing()


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

    def __init__(self, channel: "Channel", method: str, serializer, deserializer, registered: bool):
        self._channel = channel
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        self._registered = registered
        kwargs = {"_registered_method": True} if registered else {}
        self._plain = self._factory()(method, serializer, deserializer, **kwargs)  # made now, as a stub does

    def _factory(self):
        return getattr(self._channel._inner, self._kind)

    def __call__(self, request=None, *, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        engine = self._channel._engine
        state = engine.client_call_state()
        if state is None:
            return self._plain(request, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression)
        call = self._call_type(self, request, timeout, metadata, credentials, wait_for_ready, compression)
        if engine.client_needs_handshake():
            call._start_later()
        else:
            call._start_now(state, timeout)
        return call


class UnaryUnaryMultiCallable(_MultiCallable, aio.UnaryUnaryMultiCallable):
    _kind = "unary_unary"
    _call_type = UnaryUnaryCall


class UnaryStreamMultiCallable(_MultiCallable, aio.UnaryStreamMultiCallable):
    _kind = "unary_stream"
    _call_type = UnaryStreamCall


class StreamUnaryMultiCallable(_MultiCallable, aio.StreamUnaryMultiCallable):
    _kind = "stream_unary"
    _call_type = StreamUnaryCall


class StreamStreamMultiCallable(_MultiCallable, aio.StreamStreamMultiCallable):
    _kind = "stream_stream"
    _call_type = StreamStreamCall


class Channel(EngineOwner, aio.Channel):
    """A grpc.aio.Channel that offloads large messages to a co-located server.

    Build it with shmgrpc.aio.intercept_channel() or shmgrpc.aio.insecure_channel()."""

    def __init__(self, channel: aio.Channel, config: Optional[Config] = None,
                 options: Optional[Sequence[Tuple[str, Any]]] = None, name: str = "") -> None:
        if not isinstance(channel, aio.Channel):
            hint = " (a sync grpc channel: use shmgrpc.intercept_channel)" if isinstance(channel, grpc.Channel) else ""
            raise TypeError(f"shmgrpc.aio.intercept_channel needs a grpc.aio.Channel, not {type(channel).__name__}{hint}")
        self._inner = channel
        self._engine = Engine(config, "client", options, name or type(channel).__name__)
        self._shaking: Optional[asyncio.Future] = None  # the handshake in flight

    async def _handshake(self, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        """The once-per-channel handshake call: a request stream of no message,
        as in shmgrpc._channel.Channel._handshake. Calls started meanwhile
        join it. A caller's cancel stops its own wait, not the handshake.
        Nothing it raises reaches the caller."""
        engine = self._engine
        if not engine.client_needs_handshake():
            return
        shake = self._shaking
        if shake is None or shake.done():
            state = engine.client_call_state()
            if state is None:
                return
            shake = self._shaking = asyncio.ensure_future(
                self._shake(state[0], timeout, metadata, credentials, wait_for_ready, compression)
            )
        await asyncio.shield(shake)

    async def _shake(self, hello, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        engine = self._engine
        try:
            call = self._inner.stream_unary(wire.HANDSHAKE_METHOD)(
                iter(()), timeout=handshake_timeout(timeout), metadata=with_hello(metadata, hello),
                credentials=credentials, wait_for_ready=wait_for_ready, compression=compression,
            )
            await call
            engine.client_handshake_done(grpc.StatusCode.OK, await call.trailing_metadata())
        except aio.AioRpcError as err:
            engine.client_handshake_done(err.code(), err.trailing_metadata())
        except asyncio.CancelledError:
            # grpc.aio ends a request-streaming call whose deadline passed with
            # CancelledError rather than AioRpcError; nothing else cancels
            # this task (the caller's cancel stops at the shield).
            engine.client_handshake_done(grpc.StatusCode.DEADLINE_EXCEEDED, ())
        except Exception as err:  # the caller's own interceptor, on our call
            engine.client_handshake_failed(err)

    # grpc.aio.Channel

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    async def close(self, grace: Optional[float] = None) -> None:
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
    return Channel(aio.insecure_channel(target, options, compression, interceptors), config, options, name=target)


def secure_channel(target: str, credentials: grpc.ChannelCredentials,
                   options: Optional[Sequence[Tuple[str, Any]]] = None,
                   compression: Optional[grpc.Compression] = None,
                   interceptors: Optional[Sequence[aio.ClientInterceptor]] = None, *,
                   config: Optional[Config] = None) -> Channel:
    """grpc.aio.secure_channel(...), wrapped."""
    return Channel(aio.secure_channel(target, credentials, options, compression, interceptors), config, options,
                   name=target)
