"""The grpc.aio client interceptors: one class per RPC shape, one engine per
channel.

grpc.aio sorts a channel's interceptors with `isinstance ... elif`
(grpc/aio/_channel.py, Channel.__init__): an object that is all four kinds at
once would only ever see unary-unary calls. So `client_interceptors()` makes
one object per shape, all four around one _Channel: one Engine, one
handshake, one pool.

Everything but the awaiting is the sync client's code path (shmgrpc._client):
the per-call state and the handshake bookkeeping of the Engine, with_hello,
offload_request, handle_in, restore_response. What differs is only where the
results are awaited:

- unary responses: the returned call is a wrapper whose `await` restores the
  response (once; awaiting twice gives the same message);
- response streams: the interceptor returns an async generator that restores
  each message as it is read (grpc.aio's documented way to replace a
  stream's messages: it keeps the call for metadata, status and cancel);
- request streams: the request iterator is wrapped by an async generator
  that offloads each message as grpc pulls it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import List, Optional

import grpc
from grpc import aio

from .. import wire
from .._client import (
    RestoreError,
    asks_inline_retry,
    handle_in,
    handshake_details,
    handshake_probe,
    offload_request,
    restore_response,
    with_hello,
)
from .._core import Engine, EngineOwner, Route
from ..config import Config
from ..errors import ShmGrpcError
from . import _common
from ._common import Sent

# grpc.aio passes the method as bytes to the channel (grpc/aio/_channel.py
# encodes it once per multicallable); the sync details carry a str.
_HANDSHAKE_METHOD = wire.HANDSHAKE_METHOD.encode("ascii")


class _Finished:
    """The outcome of an awaited handshake call, in the shape
    Engine.client_handshake_done reads (a finished sync grpc.Call)."""

    def __init__(self, code, initial_metadata, trailing_metadata):
        self._code = code
        self._initial = initial_metadata
        self._trailing = trailing_metadata

    def code(self):
        return self._code

    def initial_metadata(self):
        return self._initial

    def trailing_metadata(self):
        return self._trailing


async def _restore_error(err: ShmGrpcError, call) -> aio.AioRpcError:
    """A response that could not be restored, as the AioRpcError callers
    expect, with the status its error maps to (DATA_LOSS, ...)."""
    initial = trailing = None
    try:
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
    except Exception:  # a cancelled call may have neither
        pass
    details = RestoreError(err, None).details()
    return aio.AioRpcError(err.status_code, initial, trailing, details)


async def _restored(engine: Engine, route: Optional[Route], response, call):
    """restore_response, off the loop for a large handle; AioRpcError if it fails."""
    raw = handle_in(response)
    if raw is None:
        return response
    try:
        return await _common.run(_common.handle_length(raw), restore_response, engine, route, response)
    except ShmGrpcError as err:
        error = err
    call.cancel()
    raise await _restore_error(error, call)


class _Channel:
    """What the four shape interceptors of one channel share."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._handshake: Optional[asyncio.Future] = None  # the handshake in flight

    async def call_state(self, continuation, details, probe):
        """(hello, route) for one call, after the once-per-channel handshake,
        or None: plain gRPC. Concurrent first calls share one handshake."""
        engine = self.engine
        state = engine.client_call_state()
        if state is not None and probe is not None and engine.client_needs_handshake():
            task = self._handshake
            if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
                task = self._handshake = asyncio.ensure_future(self._shake(continuation, details, probe))
            # shield: a caller cancelled meanwhile must not cancel the others' handshake
            await asyncio.shield(task)
            state = engine.client_call_state()
        return state

    async def _shake(self, continuation, details, probe) -> None:
        engine = self.engine
        hello = engine.client_metadata()
        if hello is None:
            return
        call = await continuation(handshake_details(details, hello)._replace(method=_HANDSHAKE_METHOD), probe)
        try:
            if hasattr(call, "__aiter__"):
                async for _ in call:
                    pass
            else:
                await call
        except grpc.RpcError:  # the code is read below
            pass
        code = await call.code()
        engine.client_handshake_done(_Finished(code, await call.initial_metadata(), await call.trailing_metadata()))

    def offload(self, route: Optional[Route], request, sent: Sent):
        """The request as sent: itself, or the carrier of its handle."""
        return offload_request(self.engine, route, request, sent.add)[0]

    def requests(self, requests, route: Optional[Route], sent: Sent):
        """The request stream as sent: each message offloaded when large."""
        offload = functools.partial(self.offload, route, sent=sent)

        async def offloading():
            if hasattr(requests, "__aiter__"):
                async for request in requests:
                    yield offload(request)
            else:
                for request in requests:
                    yield offload(request)

        return offloading()

    async def responses(self, call, route: Optional[Route]):
        """The response stream as read: each handle restored."""
        engine = self.engine
        async for response in call:
            yield await _restored(engine, route, response, call)
        engine.client_welcome(await call.trailing_metadata())


class _Interceptor(EngineOwner):
    """Construction and stats/close of every shape (the four of one
    client_interceptors() list answer for the same engine)."""

    def __init__(self, config: Optional[Config] = None, *, channel: Optional[_Channel] = None):
        self._channel = channel if channel is not None else _Channel(Engine(config, "client"))
        self._engine = self._channel.engine

    async def _unary_request(self, continuation, details, request):
        """Start a call with one request: (call, None) when offload is off for
        this channel, else (call, (hello, route, message sent)). The route may
        be None before a handshake has succeeded."""
        channel = self._channel
        state = await channel.call_state(continuation, details, handshake_probe(request))
        if state is None:
            return await continuation(details, request), None
        hello, route = state
        sent = Sent(channel.engine)
        message = channel.offload(route, request, sent)
        call = await continuation(with_hello(details, hello), message)
        sent.end_with(call)
        return call, (hello, route, message)

    async def _request_stream(self, continuation, details, request_iterator):
        """Start a request-streaming call: (call, (route,)), or (plain call,
        None) when offload is off for this channel. The route itself may be
        None before a handshake has succeeded."""
        channel = self._channel
        state = await channel.call_state(continuation, details, handshake_probe())
        if state is None:
            return await continuation(details, request_iterator), None
        hello, route = state
        sent = Sent(channel.engine)
        call = await continuation(with_hello(details, hello), channel.requests(request_iterator, route, sent))
        sent.end_with(call)
        return call, (route,)


class _UnaryOutcome:
    """A call with one response, restored when it is awaited.

    Subclassed below as the aio.UnaryUnaryCall / aio.StreamUnaryCall that
    grpc.aio expects back from an interceptor (a unary-unary interceptor that
    returns anything else has it taken for the response itself)."""

    def __init__(self, inner, channel: _Channel, route: Optional[Route], retry=None):
        self._inner = inner
        self._channel = channel
        self._route = route
        self._retry = retry  # (continuation, details, hello, request): may resend inline
        self._settling: Optional[asyncio.Future] = None
        self._error: Optional[aio.AioRpcError] = None  # a failed restore

    def __await__(self):
        return self._outcome().__await__()

    async def _outcome(self):
        # One task does the waiting and the restore (a handle is read once);
        # every await joins it. Cancelling an awaiter cancels the RPC, as
        # grpc.aio's own call does; a restore already under way still ends,
        # and a later await gets its result.
        if self._settling is None:
            self._settling = asyncio.ensure_future(self._settle())
            # its outcome reaches the awaiters; this only keeps asyncio from
            # logging "exception never retrieved" when none is left to take it
            self._settling.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await asyncio.shield(self._settling)
        except asyncio.CancelledError:
            if not self._settling.done():
                self._inner.cancel()
            raise

    async def _settle(self):
        engine = self._channel.engine
        try:
            response = await self._inner  # the call's own AioRpcError propagates
        except aio.AioRpcError as err:
            if self._retry is None or not asks_inline_retry(err.trailing_metadata()):
                raise
            response = await self._resend_inline(err)
        engine.client_welcome(await self._inner.trailing_metadata())
        try:
            return await _restored(engine, self._route, response, self._inner)
        except aio.AioRpcError as err:
            self._error = err
            raise

    async def _resend_inline(self, err: aio.AioRpcError):
        """The server refused a handle meant for another server process (the
        channel reconnected): learn the new server, send the request inline."""
        engine = self._channel.engine
        continuation, details, hello, request = self._retry
        engine.client_welcome(err.trailing_metadata())
        hello, self._route = engine.client_call_state() or (hello, None)
        self._inner = await continuation(with_hello(details, hello), request)
        return await self._inner

    # -- the rest of the call, forwarded

    def cancel(self) -> bool:
        return self._inner.cancel()

    def cancelled(self) -> bool:
        return self._inner.cancelled()

    def done(self) -> bool:
        return self._inner.done()

    def add_done_callback(self, callback) -> None:
        self._inner.add_done_callback(lambda _: callback(self))

    def time_remaining(self) -> Optional[float]:
        return self._inner.time_remaining()

    async def initial_metadata(self):
        return await self._inner.initial_metadata()

    async def trailing_metadata(self):
        return await self._inner.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        if isinstance(self._error, aio.AioRpcError):
            return self._error.code()
        return await self._inner.code()

    async def details(self) -> str:
        if isinstance(self._error, aio.AioRpcError):
            return self._error.details()
        return await self._inner.details()

    async def debug_error_string(self) -> Optional[str]:
        return await self._inner.debug_error_string()

    async def wait_for_connection(self) -> None:
        return await self._inner.wait_for_connection()

    # stream-unary only: grpc.aio's intercepted call reads this flag, and
    # write()/done_writing() exist for a caller holding the inner call's API.

    @property
    def _done_writing_flag(self) -> bool:
        return self._inner._done_writing_flag

    async def write(self, request) -> None:
        await self._inner.write(request)

    async def done_writing(self) -> None:
        await self._inner.done_writing()


class _UnaryUnaryCall(_UnaryOutcome, aio.UnaryUnaryCall):
    pass


class _StreamUnaryCall(_UnaryOutcome, aio.StreamUnaryCall):
    pass


class UnaryUnaryClientInterceptor(_Interceptor, aio.UnaryUnaryClientInterceptor):
    """Unary-unary calls; one of the four of client_interceptors()."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call, offload = await self._unary_request(continuation, client_call_details, request)
        if offload is None:
            return call
        hello, route, message = offload
        retry = (continuation, client_call_details, hello, request) if message is not request else None
        return _UnaryUnaryCall(call, self._channel, route, retry)


class UnaryStreamClientInterceptor(_Interceptor, aio.UnaryStreamClientInterceptor):
    """Unary-stream calls; one of the four of client_interceptors()."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call, offload = await self._unary_request(continuation, client_call_details, request)
        return call if offload is None else self._channel.responses(call, offload[1])


class StreamUnaryClientInterceptor(_Interceptor, aio.StreamUnaryClientInterceptor):
    """Stream-unary calls; one of the four of client_interceptors()."""

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        call, offload = await self._request_stream(continuation, client_call_details, request_iterator)
        return call if offload is None else _StreamUnaryCall(call, self._channel, offload[0])


class StreamStreamClientInterceptor(_Interceptor, aio.StreamStreamClientInterceptor):
    """Stream-stream calls; one of the four of client_interceptors()."""

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        call, offload = await self._request_stream(continuation, client_call_details, request_iterator)
        return call if offload is None else self._channel.responses(call, offload[0])


def client_interceptors(config: Optional[Config] = None) -> List[_Interceptor]:
    """The interceptors of one grpc.aio channel, one per RPC shape, sharing
    one engine:

        channel = grpc.aio.insecure_channel(target, interceptors=shmgrpc.aio.client_interceptors())

    Make a new list per channel: it remembers the server that channel talks
    to. `stats()` and `close()` of any of the four answer for all of them."""
    channel = _Channel(Engine(config, "client"))
    return [
        UnaryUnaryClientInterceptor(channel=channel),
        UnaryStreamClientInterceptor(channel=channel),
        StreamUnaryClientInterceptor(channel=channel),
        StreamStreamClientInterceptor(channel=channel),
    ]
