"""The grpc.aio server interceptor.

Per call it is the sync server's glue (shmgrpc._server): the same CallGlue
wraps the handler's own (de)serializers, a handle arrives as the same
_Pending marker, the welcome is merged by the same context proxy and the
internal handshake method has the same handler. What differs is the
behavior wrapper, because grpc.aio dispatches on what the behavior *is*
(grpc/_cython/_cygrpc/aio/server.pyx.pxi, _is_async_handler and
_finish_handler_with_stream_responses):

- a coroutine function or async generator function: wrapped here by one of
  the same kind, which resolves pending requests (off the loop when large)
  and hands the application a context whose read() resolves them too;
- a plain function (a sync handler on an aio server, run in grpc's thread
  pool with a sync context): wrapped by the sync server's own wrapper.

A cancelled call (client cancel, deadline, server stop) frees the slots and
pins of the responses it offloaded: their reader will never read them. A
call that ended normally leaves them to the client's ack (its messages may
still be in flight). Sync handlers are served as the sync server serves
them: what a cancelled one offloaded waits for its lease.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Callable, Optional

import grpc
from grpc import aio

from .. import wire
from .._core import Engine, EngineOwner
from .._server import (
    CallGlue,
    _Pending,
    _wrap_behavior,
    abort_details,
    handler_context,
    handshake_handler,
    rebuild_handler,
)
from ..config import Config
from ..errors import ShmGrpcError
from . import _common
from ._common import Sent

log = logging.getLogger("shmgrpc")

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


async def _resolved(glue: CallGlue, request, context):
    """The application's request for `request` (a _Pending is restored, in a
    worker thread when large); a bad handle aborts the call with its status."""
    if type(request) is not _Pending:
        return request
    try:
        return await _common.run(_common.handle_length(request.raw), glue.resolve, request)
    except ShmGrpcError as err:
        code, details, trailing = abort_details(err)
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(code, details)


async def _resolving(glue: CallGlue, requests, context):
    async for request in requests:
        yield await _resolved(glue, request, context)


class _Context:
    """The application's context: reads resolve pending requests; the rest,
    welcome included, is the sync glue's context (handler_context)."""

    def __init__(self, context, glue: CallGlue):
        self._raw = context
        self._inner = handler_context(context, glue.route.welcome)
        self._glue = glue

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def read(self):
        return await _resolved(self._glue, await self._inner.read(), self._raw)


aio.ServicerContext.register(_Context)


def _aio_behavior(handler, glue: CallGlue, sent: Sent) -> Callable:
    """An async behavior of the same shape and kind as the handler's."""
    streaming_in, streaming_out = bool(handler.request_streaming), bool(handler.response_streaming)
    behavior = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[(streaming_in, streaming_out)]

    async def prepare(request, context):
        # Runs first in every call. add_done_callback fires when grpc's task
        # for the call ends; done() means a status was sent. Without one the
        # call was cancelled (client, deadline, server stop): free its slots.
        context.add_done_callback(lambda ctx: sent.end(release=not ctx.done()))
        if streaming_in:
            request = _resolving(glue, request, context)
        else:
            request = await _resolved(glue, request, context)
        return request, _Context(context, glue)

    if inspect.isasyncgenfunction(behavior):  # a response stream, as an async generator

        async def stream(request, context):
            request, ctx = await prepare(request, context)
            async for response in behavior(request, ctx):
                yield response

        return stream

    async def call(request, context):  # one response, or a stream written with context.write()
        request, ctx = await prepare(request, context)
        return await behavior(request, ctx)

    return call


class ServerInterceptor(EngineOwner, aio.ServerInterceptor):
    """Use as grpc.aio.server(interceptors=[shmgrpc.aio.ServerInterceptor()]).

    Restores offloaded requests and offloads large responses for clients that
    proved they share this host; everyone else is served untouched."""

    def __init__(self, config: Optional[Config] = None):
        self._engine = Engine(config, "server")
        self._warned = False

    # Not `async def`: grpc.aio awaits what this returns, a sync grpc.server
    # does not. A sync server calls it from a worker thread with no running
    # loop and gives no earlier hook (grpc/_server.py touches interceptors
    # only in _find_method_handler, per call), so every call there fails
    # with WRONG_SERVER instead of the server choking on a coroutine.
    def intercept_service(self, continuation, handler_call_details):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._refuse(continuation, handler_call_details)
        return self._intercept(continuation, handler_call_details)

    async def _intercept(self, continuation, details):
        engine = self._engine
        if details.method == wire.HANDSHAKE_METHOD:
            # A sync handler: grpc.aio runs it in its thread pool, once per channel.
            return handshake_handler(engine, details)
        handler = await continuation(details)
        if handler is None:
            return None
        route = engine.server_route(details.invocation_metadata)
        if route is None:
            return handler
        behavior = (handler.unary_unary, handler.unary_stream, handler.stream_unary, handler.stream_stream)
        if not any(b is not None and _is_async(b) for b in behavior):
            glue = CallGlue(engine, route)  # a sync handler: the sync glue, in grpc's threads
            return rebuild_handler(handler, glue, _wrap_behavior(handler, glue))
        sent = Sent(engine)
        glue = CallGlue(engine, route, keep=sent.add)
        return rebuild_handler(handler, glue, _aio_behavior(handler, glue, sent))

    def _refuse(self, continuation, details):
        """On a sync server: a handler of the call's shape that fails it with
        FAILED_PRECONDITION and says why."""
        if not self._warned:
            self._warned = True
            log.error("shmgrpc: %s", WRONG_SERVER)
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
