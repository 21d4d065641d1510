"""The sync server interceptor, and the per-call glue the aio one reuses.

Requests: the handler's own request_deserializer is wrapped, not replaced. When
the raw bytes are a handle it returns a small _Pending marker instead of
parsing; the wrapped behavior resolves the marker before the application sees
the request. Resolving there (not inside the deserializer) lets a bad handle
end the call with its own status: grpc turns any exception raised by a
deserializer into INTERNAL "Exception deserializing request!".

Responses: the handler's response_serializer is wrapped; a large serialized
response is written to our pool and the handle bytes are returned in its place.

Welcome: the server's half of the handshake, sent only while the client's
hello does not name and prove this server, travels in the trailing metadata
(with the status: no extra operation). The handler then gets a context proxy
that merges it into the handler's own set_trailing_metadata, if it makes one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import grpc

from . import wire
from ._core import Engine, EngineOwner, Route
from .config import Config
from .errors import ShmGrpcError, StaleSessionError


class _Pending:
    """A request that arrived as a handle; resolved by the wrapped behavior."""

    __slots__ = ("raw", "deserializer")

    def __init__(self, raw: bytes, deserializer: Callable):
        self.raw = raw
        self.deserializer = deserializer


def _identity(value):
    return value


class CallGlue:
    """Everything one server call needs: its route and the wrapped functions."""

    __slots__ = ("engine", "route", "keep")

    def __init__(self, engine: Engine, route: Route, keep: Optional[Callable] = None):
        self.engine = engine
        self.route = route
        # Given to Engine.offload for each response (see there). The aio server
        # passes one, to free what a cancelled call's client will never read;
        # None here: the client's ack or the lease frees the slot.
        self.keep = keep

    def wrap_deserializer(self, original: Optional[Callable]) -> Callable:
        original = original or _identity

        def deserialize(raw: bytes) -> Any:
            if wire.looks_like_handle(raw):
                return _Pending(raw, original)
            return original(raw)

        return deserialize

    def wrap_serializer(self, original: Optional[Callable]) -> Callable:
        original = original or _identity
        engine, route, keep = self.engine, self.route, self.keep

        def serialize(message: Any) -> bytes:
            data = original(message)
            handle, _ = engine.offload(data, route, keep)  # the slot is freed by ack or lease
            return data if handle is None else handle

        return serialize

    def resolve(self, request: Any) -> Any:
        """The application's message for `request`; raises ShmGrpcError."""
        if type(request) is _Pending:
            return self.engine.restore(request.raw, self.route.peer, request.deserializer)
        return request


def abort_details(err: ShmGrpcError):
    """(code, details, trailing metadata) for a failed restore."""
    trailing = ((wire.RETRY_KEY, "inline"),) if isinstance(err, StaleSessionError) else ()
    return err.status_code, f"shmgrpc: {err}", trailing


class _Context:
    """The handler's context, with our welcome merged into the trailing
    metadata (which travels with the status: no extra operation)."""

    def __init__(self, inner, welcome):
        self._inner = inner
        self._welcome = welcome
        inner.set_trailing_metadata((welcome,))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def set_trailing_metadata(self, trailing_metadata):
        return self._inner.set_trailing_metadata(tuple(trailing_metadata) + (self._welcome,))


grpc.ServicerContext.register(_Context)


def handler_context(context, welcome):
    """The context the application sees: its own, or with our welcome merged
    when this call must carry one (sync and aio servers)."""
    return context if welcome is None else _Context(context, welcome)


def _abort(context, err: ShmGrpcError):
    code, details, trailing = abort_details(err)
    if trailing:
        context.set_trailing_metadata(trailing)
    context.abort(code, details)


def _resolved(glue: CallGlue, request, context):
    try:
        return glue.resolve(request)
    except ShmGrpcError as err:
        _abort(context, err)


def _resolving(glue: CallGlue, requests: Iterator, context) -> Iterator:
    for request in requests:
        yield _resolved(glue, request, context)


def _wrap_behavior(handler, glue: CallGlue) -> Callable:
    welcome = glue.route.welcome

    def context_for(context):
        return handler_context(context, welcome)

    if handler.request_streaming and handler.response_streaming:
        behavior = handler.stream_stream

        def stream_stream(requests, context):
            return behavior(_resolving(glue, requests, context), context_for(context))

        return stream_stream
    if handler.request_streaming:
        behavior = handler.stream_unary

        def stream_unary(requests, context):
            return behavior(_resolving(glue, requests, context), context_for(context))

        return stream_unary
    if handler.response_streaming:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            return behavior(_resolved(glue, request, context), context_for(context))

        return unary_stream
    behavior = handler.unary_unary

    def unary_unary(request, context):
        return behavior(_resolved(glue, request, context), context_for(context))

    return unary_unary


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rebuild_handler(handler, glue: CallGlue, behavior: Callable):
    """A new RpcMethodHandler of the same shape, with wrapped functions."""
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        behavior,
        request_deserializer=glue.wrap_deserializer(handler.request_deserializer),
        response_serializer=glue.wrap_serializer(handler.response_serializer),
    )


def handshake_handler(engine: Engine, details):
    """The handler of the internal handshake method, or None (UNIMPLEMENTED)
    when offload is off here."""
    if not engine.ready():
        return None
    route = engine.server_route(details.invocation_metadata)

    def hello(requests, context):
        for _ in requests:  # the client sends no message, or one empty one
            pass
        if route is not None and route.welcome is not None:
            context.set_trailing_metadata((route.welcome,))
        return b""

    return grpc.stream_unary_rpc_method_handler(hello)


class ServerInterceptor(EngineOwner, grpc.ServerInterceptor):
    """Restores offloaded requests and offloads large responses for clients
    that proved they share this host. Everyone else is served untouched."""

    def __init__(self, config: Optional[Config] = None):
        self._engine = Engine(config, "server")

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == wire.HANDSHAKE_METHOD:
            return handshake_handler(self._engine, handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        route = self._engine.server_route(handler_call_details.invocation_metadata)
        if route is None:
            return handler
        glue = CallGlue(self._engine, route)
        return rebuild_handler(handler, glue, _wrap_behavior(handler, glue))
