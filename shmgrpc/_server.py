"""The sync server side: ServerInterceptor, shmgrpc.server(), and the per-call
glue the aio server reuses.

Per call from a client whose hello names this server (a framed call), the
handler is rebuilt around the *handler's own* request_deserializer and
response_serializer, wrapped by a CallCodec (see _codec.py): a request handle
is restored inside the deserializer, so the application and every
interceptor outside shmgrpc see the real request; a large response is
written out inside the serializer. A handle that cannot be restored becomes a
`Failed` value, and the wrapped behavior ends the call with its own status
(gRPC would turn an exception of the deserializer into INTERNAL).

The application's context is a proxy: invocation_metadata() without
shmgrpc's hello, and set_trailing_metadata() merged with the welcome (the
server's half of the handshake, sent only while the client's hello does not
name and prove this server; it travels with the status: no extra operation).
"""

from __future__ import annotations

from concurrent import futures
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import grpc

from . import wire
from ._codec import CallCodec, Failed, Tickets
from ._core import Engine, EngineOwner, Route
from .config import Config
from .errors import ShmGrpcError, StaleSessionError


def abort_details(err: ShmGrpcError):
    """(code, details, trailing metadata) for a failed restore."""
    trailing = ((wire.RETRY_KEY, "inline"),) if isinstance(err, StaleSessionError) else ()
    return err.status_code, f"shmgrpc: {err}", trailing


def without_hello(metadata) -> Tuple:
    return tuple(m for m in metadata or () if m[0] != wire.HELLO_KEY)


class _Context:
    """The application's context: no hello in invocation_metadata(), our
    welcome merged into its trailing metadata."""

    def __init__(self, inner, welcome: Optional[Tuple[str, str]]):
        self._inner = inner
        self._welcome = (welcome,) if welcome is not None else ()
        if welcome is not None:
            inner.set_trailing_metadata(self._welcome)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def invocation_metadata(self):
        return without_hello(self._inner.invocation_metadata())

    def set_trailing_metadata(self, trailing_metadata):
        return self._inner.set_trailing_metadata(tuple(trailing_metadata or ()) + self._welcome)


grpc.ServicerContext.register(_Context)


def _abort(context, err: ShmGrpcError):
    code, details, trailing = abort_details(err)
    if trailing:
        context.set_trailing_metadata(trailing)
    context.abort(code, details)


def _checked(request, context):
    if type(request) is Failed:
        _abort(context, request.error)
    return request


def _checking(requests: Iterator, context) -> Iterator:
    for request in requests:
        yield _checked(request, context)


def _statused(context) -> bool:
    """Did the call end with a status from this side? (grpc/_server.py's
    _RPCState.statused: False when the client cancelled or the deadline
    passed.) Unknown: assume it did, and let the lease free what it holds."""
    return getattr(getattr(context, "_state", None), "statused", True)


def _context(context, welcome, sent: Optional[Tickets]):
    """Our context for the handler; with `sent`, the unread responses of a
    call that ends cancelled are freed then (as the aio server does)."""
    if sent is not None:
        context.add_callback(lambda: sent.end(release=not _statused(context), unread_only=True))
    return _Context(context, welcome)


def _wrap_behavior(handler, welcome, sent: Optional[Tickets] = None) -> Callable:
    """The handler's behavior, with our context and failed restores ended
    with their own status. The context comes first: its welcome must reach
    the trailers of a call that fails too (a client that reconnected to
    another server process learns it from exactly that failure)."""

    if handler.request_streaming and handler.response_streaming:
        behavior = handler.stream_stream

        def stream_stream(requests, context):
            ctx = _context(context, welcome, sent)
            return behavior(_checking(requests, ctx), ctx)

        return stream_stream
    if handler.request_streaming:
        behavior = handler.stream_unary

        def stream_unary(requests, context):
            ctx = _context(context, welcome, sent)
            return behavior(_checking(requests, ctx), ctx)

        return stream_unary
    if handler.response_streaming:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            ctx = _context(context, welcome, sent)
            return behavior(_checked(request, ctx), ctx)

        return unary_stream
    behavior = handler.unary_unary

    def unary_unary(request, context):
        ctx = _context(context, welcome, sent)
        return behavior(_checked(request, ctx), ctx)

    return unary_unary


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rebuild_handler(handler, codec: CallCodec, behavior: Callable):
    """A new RpcMethodHandler of the same shape, with wrapped functions."""
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        behavior,
        request_deserializer=codec.deserializer(handler.request_deserializer),
        response_serializer=codec.serializer(handler.response_serializer),
    )


def call_codec(engine: Engine, route: Optional[Route], keep=None) -> CallCodec:
    """A server call's codec: requests may be read again (retries), a failed
    restore is a Failed value."""
    return CallCodec(engine, route, keep=keep, reread=True, failed_value=True)


def handshake_trailers(engine: Engine, details) -> Optional[Tuple]:
    """What the internal handshake method answers with: its trailing
    metadata (our welcome, when the client's hello needs one), or None when
    offload is off here (no handler: UNIMPLEMENTED)."""
    if not engine.ready():
        return None
    route = engine.server_route(details.invocation_metadata)
    return (route.welcome,) if route is not None and route.welcome is not None else ()


def handshake_handler(engine: Engine, details):
    """The handler of the internal handshake method (see handshake_trailers)."""
    trailers = handshake_trailers(engine, details)
    if trailers is None:
        return None

    def hello(requests, context):
        for _ in requests:  # our clients send none; any is read and ignored
            pass
        if trailers:
            context.set_trailing_metadata(trailers)
        return b""

    return grpc.stream_unary_rpc_method_handler(hello)


class ServerInterceptor(EngineOwner, grpc.ServerInterceptor):
    """Restores offloaded requests and offloads large responses for clients
    that proved they share this host. Everyone else is served untouched.

    shmgrpc.server() installs one; to install it yourself, pass the server's
    options here too, so that offloaded messages meet the same size limits
    as inline ones (without them gRPC's defaults are assumed: receive 4 MiB,
    send unlimited)."""

    def __init__(self, config: Optional[Config] = None, *,
                 options: Optional[Sequence[Tuple[str, Any]]] = None) -> None:
        self._engine = Engine(config, "server", options, "server")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        if handler_call_details.method == wire.HANDSHAKE_METHOD:
            return handshake_handler(self._engine, handler_call_details)
        handler = continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if handler is None or wire.metadata_value(metadata, wire.HELLO_KEY) is None:
            return handler
        route = self._engine.server_route(metadata)
        welcome = route.welcome if route is not None else None
        sent = Tickets(self._engine) if route is not None and route.offloads else None
        codec = call_codec(self._engine, route, keep=sent.add if sent is not None else None)
        return rebuild_handler(handler, codec, _wrap_behavior(handler, welcome, sent))


def server(
    thread_pool: Optional[futures.Executor] = None,
    handlers: Optional[Sequence[grpc.GenericRpcHandler]] = None,
    interceptors: Optional[Sequence[grpc.ServerInterceptor]] = None,
    options: Optional[Sequence[Tuple[str, Any]]] = None,
    maximum_concurrent_rpcs: Optional[int] = None,
    compression: Optional[grpc.Compression] = None,
    xds: bool = False,
    *,
    config: Optional[Config] = None,
) -> grpc.Server:
    """grpc.server(...) with shmgrpc installed, innermost: your interceptors
    run first and see the real requests; shmgrpc knows the server's options.

    The ServerInterceptor is reachable as `server.shmgrpc` (stats, close)."""
    icpt = ServerInterceptor(config, options=options)
    srv = grpc.server(
        thread_pool, handlers=handlers, interceptors=[*(interceptors or ()), icpt], options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs, compression=compression, xds=xds,
    )
    srv.shmgrpc = icpt
    return srv
