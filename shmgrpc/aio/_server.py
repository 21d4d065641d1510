"""The grpc.aio server side.

It is the sync server's glue (shmgrpc._server), made once per client route
and method (HandlerCache) and shared by their calls: the same CallCodec
wraps the handler's own (de)serializers, so a request handle is restored in
the deserializer (on the event loop, where grpc.aio deserializes) and the
application and every interceptor see the real request; the same context
proxy strips the hello and merges the welcome; the same handshake handler.
What differs is the behavior wrapper, because grpc.aio dispatches on what the
behavior *is* (grpc/_cython/_cygrpc/aio/server.pyx.pxi, _is_async_handler
and _finish_handler_with_stream_responses):

- a coroutine function or async generator function: wrapped here by one of
  the same kind, which ends a call whose handle could not be restored with
  its own status, and hands the application a context whose read() does too;
  once a method has answered large, its responses are serialized in a
  thread of shmgrpc's rather than on the loop (see _Responses for why);
- a plain function (a sync handler on an aio server, run in grpc's thread
  pool with a sync context): wrapped by the sync server's own wrapper.

A cancelled call (client cancel, deadline, server stop) frees the slots and
pins of the responses it offloaded: their reader will never read them. A
call that ended normally leaves them to the client's ack (its messages may
still be in flight). The shared serializer finds its call through a context
variable (_current): grpc.aio runs each call in a task of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import grpc
from grpc import aio

from .. import wire
from .._buffer import views_of
from .._codec import Failed, Tickets
from .._core import Engine, EngineOwner, PeerStatus, Route
from .._server import _Context as _SyncContext
from .._server import _Sent as _SyncSent
from .._server import (
    Dispatch,
    HandlerCache,
    _wrap_behavior,
    abort_details,
    call_codec,
    handshake_trailers,
    rebuild_handler,
    validate_generic_handlers,
)
from ..config import Config, check_config

log = logging.getLogger(__name__)

WRONG_SERVER = (
    "shmgrpc.aio.ServerInterceptor is installed on a sync grpc.server(); it "
    "only works with grpc.aio.server(). Use shmgrpc.ServerInterceptor there."
)


def _is_async(behavior) -> bool:
    """grpc.aio's own test for a handler it awaits rather than runs in its
    thread pool (server.pyx.pxi, _is_async_handler)."""
    return (
        inspect.isawaitable(behavior)
        or inspect.iscoroutinefunction(behavior)
        or inspect.isasyncgenfunction(behavior)
    )


async def _checked(request, context):
    """`request`, unless it is a handle that could not be restored: then the
    call ends with that failure's status."""
    if type(request) is Failed:
        code, details, trailing = abort_details(request.error)
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(code, details)
    return request


async def _checking(requests, context):
    async for request in requests:
        yield await _checked(request, context)


class _Context(_SyncContext):
    """The application's context (hello stripped, welcome merged), whose
    read() ends the call on a handle that could not be restored and whose
    write() serializes a large response off the loop (_Responses)."""

    def __init__(self, inner, welcome: Optional[Tuple[str, str]], responses: Optional["_Responses"] = None):
        super().__init__(inner, welcome)
        self._responses = responses

    async def read(self):
        return await _checked(await self._inner.read(), self)

    async def write(self, message) -> None:
        if self._responses is not None:
            await self._responses.ready(message)
        await self._inner.write(message)


aio.ServicerContext.register(_Context)


# The call whose task this is (grpc.aio runs each call in a task of its own,
# and serializes its responses there): set by the wrapped behavior, read by
# the route's shared serializer to keep the tickets of what it offloads.
# A behavior that an outer interceptor runs in another task leaves it unset
# in grpc's: such responses are freed by the client's ack or the lease.
_current: contextvars.ContextVar[Optional[_Sent]] = contextvars.ContextVar("shmgrpc_aio_call", default=None)


class _Sent(_SyncSent):
    """The sync server's _Sent, watching grpc.aio's context. `ready`: a
    response and its bytes, serialized off the loop (_Responses)."""

    __slots__ = ("ready",)

    def __init__(self, engine: Engine, context) -> None:
        super().__init__(engine, context)
        self.ready: Optional[Tuple[Any, Any]] = None

    def _watch(self, tickets: Tickets) -> None:
        # Fires when grpc's task for the call ends; done() means a status was
        # sent. Without one the call was cancelled: free its unread slots.
        self.context.add_done_callback(lambda ctx: tickets.end(release=not ctx.done(), unread_only=True))


_pools: Dict[int, futures.ThreadPoolExecutor] = {}  # by pid: a forked child makes its own


def _pool() -> futures.ThreadPoolExecutor:
    pid = os.getpid()
    pool = _pools.get(pid)
    if pool is None:
        _pools.clear()
        pool = _pools[pid] = futures.ThreadPoolExecutor(2, thread_name_prefix="shmgrpc-serialize")
    return pool


class _Responses:
    """Where the large responses of one method's async handler are serialized.

    grpc.aio parses a request and serializes the response on the event loop,
    so both come from the main thread's malloc arena. For a large message the
    request's copy, the encoder's buffer and the response's bytes then meet at
    the top of that heap when freed, and glibc gives them back to the kernel
    (its trim threshold is 2x the largest block it has unmapped: about 4x the
    message): every call faults its pages in again (1 MiB echo: 737 page
    faults and 1.4 ms of CPU per call). A sync server parses in gRPC's thread
    and serializes in a worker, two arenas, and faults nothing. So once a
    response of the method has been large, the next ones are serialized in
    a thread of shmgrpc's (the handle is still made on the loop, by the route's
    serializer); small ones stay on the loop, costing no thread hop."""

    __slots__ = ("engine", "serialize", "views", "threshold", "large")

    def __init__(self, engine: Engine, serialize: Optional[Callable[[Any], Any]]) -> None:
        self.engine = engine
        self.serialize = serialize or (lambda message: message)
        self.views = views_of(self.serialize)  # a buffer_serializer: a view, made on the loop (no copy)
        self.threshold = engine.config.threshold
        self.large = False  # the last response serialized was at or above the threshold

    def _note(self, data: Any) -> Any:
        self.large = isinstance(data, (bytes, bytearray, memoryview)) and len(data) >= self.threshold
        return data

    async def ready(self, response: Any) -> None:
        """Serialize `response` off the loop if the method answers large."""
        sent = _current.get()
        if self.large and response is not None and sent is not None and self.views is None:
            run = contextvars.copy_context().run  # the serializer sees the call's context, as on the loop
            data = await asyncio.get_running_loop().run_in_executor(_pool(), run, self.serialize, response)
            sent.ready = (response, self._note(data))

    def serializer(self, codec) -> Callable[[Any], Any]:
        """The route's response serializer: bytes made by ready(), or made now."""
        send = codec.send
        views = self.views
        if views is not None:
            return lambda message: codec.send_view(views(message), _keep_of_current())

        def serializer(message: Any) -> Any:
            sent = _current.get()
            ready = sent.ready if sent is not None else None
            if sent is not None and ready is not None:  # (ready implies sent: said for the checker)
                sent.ready = None
                if ready[0] is message:
                    return send(ready[1], sent.keep)
            return send(self._note(self.serialize(message)), sent.keep if sent is not None else None)

        return serializer


def _keep_of_current() -> Optional[Callable[[Any], None]]:
    sent = _current.get()
    return sent.keep if sent is not None else None


def _aio_behavior(handler, welcome, responses: Optional[_Responses]) -> Callable:
    """An async behavior of the same shape and kind as the handler's. With
    `responses` (the route offloads them), the call's _Sent is made current
    for the serializer."""
    streaming_in, streaming_out = bool(handler.request_streaming), bool(handler.response_streaming)
    behavior = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(streaming_in, streaming_out)]

    async def prepare(request, context):
        if responses is not None:
            _current.set(_Sent(responses.engine, context))
        ctx = _Context(context, welcome, responses)  # first: a failing call carries the welcome too
        if streaming_in:
            request = _checking(request, ctx)
        else:
            request = await _checked(request, ctx)
        return request, ctx

    if inspect.isasyncgenfunction(behavior):  # a response stream, as an async generator

        async def stream(request, context):
            request, ctx = await prepare(request, context)
            async for response in behavior(request, ctx):
                if responses is not None:
                    await responses.ready(response)
                yield response

        return stream

    async def call(request, context):  # one response, or a stream written with context.write()
        request, ctx = await prepare(request, context)
        response = await behavior(request, ctx)
        if responses is not None:
            await responses.ready(response)
        return response

    return call


def _handshake_handler(engine: Engine, details):
    """shmgrpc._server.handshake_handler, as an async handler: aio
    interceptors outside shmgrpc may wrap every behavior as a coroutine and
    hand it an async request iterator, which a sync handler cannot read."""
    trailers = handshake_trailers(engine, details)
    if trailers is None:
        return None

    async def hello(requests, context):
        if hasattr(requests, "__aiter__"):
            async for _ in requests:
                pass
        else:
            for _ in requests:
                pass
        if trailers:
            context.set_trailing_metadata(trailers)
        return b""

    return grpc.stream_unary_rpc_method_handler(hello)


class ServerInterceptor(EngineOwner, aio.ServerInterceptor):
    """Use shmgrpc.aio.server(), or grpc.aio.server(interceptors=[...,
    shmgrpc.aio.ServerInterceptor(options=options)]) with the server's
    options (see shmgrpc.ServerInterceptor).

    Restores offloaded requests and offloads large responses for clients that
    proved they share this host; everyone else is served untouched."""

    def __init__(self, config: Optional[Config] = None, *,
                 options: Optional[Sequence[Tuple[str, Any]]] = None) -> None:
        check_config(config, "shmgrpc.aio.ServerInterceptor")
        self._engine = Engine(config, "server", options, "server")
        self._handlers = HandlerCache(self._wrap)
        self._warned = False

    # Not `async def`: grpc.aio awaits what this returns, a sync grpc.server
    # does not. A sync server calls it from a worker thread with no running
    # loop and gives no earlier hook (grpc/_server.py touches interceptors
    # only in _find_method_handler, per call), so every call there fails
    # with WRONG_SERVER instead of the server choking on a coroutine.
    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._refuse(continuation, handler_call_details)
        return self._intercept(continuation, handler_call_details)

    async def _intercept(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return self.unknown(details)
        return self.handler_for(details, handler)

    def handler_for(self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """See shmgrpc.ServerInterceptor.handler_for."""
        hello = wire.metadata_value(details.invocation_metadata, wire.HELLO_KEY)
        if hello is None:
            return handler
        return self._handlers.get(self._engine.server.route(hello), handler)

    def status(self) -> Tuple[PeerStatus, ...]:
        """See shmgrpc.ServerInterceptor.status."""
        return tuple(self._engine.report.peer_statuses())

    def unknown(self, details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler]:
        """See shmgrpc.ServerInterceptor.unknown."""
        if details.method == wire.HANDSHAKE_METHOD:
            return _handshake_handler(self._engine, details)
        return None

    def _wrap(self, route: Optional[Route], handler):
        """The handler for every call of `route`'s client (see HandlerCache)."""
        engine = self._engine
        welcome = route.welcome if route is not None else None
        codec = call_codec(engine, route)
        behavior = (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)
        if not any(b is not None and _is_async(b) for b in behavior):
            # A sync handler: the sync glue, in grpc's threads (its responses
            # are serialized on the loop, apart from the call's thread: they
            # are freed by the ack or the lease).
            return rebuild_handler(handler, codec, _wrap_behavior(handler, welcome))
        if route is None or not route.offloads:
            return rebuild_handler(handler, codec, _aio_behavior(handler, welcome, None))
        responses = _Responses(engine, handler.response_serializer)
        return rebuild_handler(handler, codec, _aio_behavior(handler, welcome, responses),
                               response_serializer=responses.serializer(codec))

    def _refuse(self, continuation, details):
        """On a sync server: a handler of the call's shape that fails it with
        FAILED_PRECONDITION and says why."""
        if not self._warned:
            self._warned = True
            log.error("%s", WRONG_SERVER)
        handler = continuation(details) if details.method != wire.HANDSHAKE_METHOD else None

        def refuse(request, context):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, WRONG_SERVER)

        if handler is None or handler.request_streaming:
            factory = grpc.stream_stream_rpc_method_handler if handler and handler.response_streaming \
                else grpc.stream_unary_rpc_method_handler
        else:
            factory = grpc.unary_stream_rpc_method_handler if handler.response_streaming \
                else grpc.unary_unary_rpc_method_handler
        return factory(refuse)


class Server(aio.Server):
    """A grpc.aio.Server with shmgrpc: what shmgrpc.aio.server() returns (see
    shmgrpc.Server). `shmgrpc`: the ServerInterceptor behind it."""

    def __init__(self, inner: aio.Server, interceptor: ServerInterceptor, dispatch: Dispatch) -> None:
        self._inner = inner
        self._dispatch = dispatch
        self.shmgrpc = interceptor

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._dispatch.generic += validate_generic_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self._dispatch.add_registered(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._inner.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._inner.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self, grace: Optional[float]) -> None:
        await self._inner.stop(grace)

    async def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        return await self._inner.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def server(
    migration_thread_pool: Optional[futures.Executor] = None,
    handlers: Optional[Sequence[grpc.GenericRpcHandler]] = None,
    interceptors: Optional[Sequence[Any]] = None,
    options: Optional[Sequence[Tuple[str, Any]]] = None,
    maximum_concurrent_rpcs: Optional[int] = None,
    compression: Optional[grpc.Compression] = None,
    *,
    config: Optional[Config] = None,
) -> Server:
    """grpc.aio.server(...) with shmgrpc installed, innermost (see
    shmgrpc.server). The ServerInterceptor is reachable as `server.shmgrpc`."""
    icpt = ServerInterceptor(config, options=options)
    dispatch = Dispatch(icpt)
    dispatch.generic = validate_generic_handlers(handlers or ())
    inner = aio.server(
        migration_thread_pool, handlers=(dispatch,), interceptors=interceptors, options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs, compression=compression,
    )
    return Server(inner, icpt, dispatch)
