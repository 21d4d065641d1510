"""The sync server side: ServerInterceptor, shmgrpc.server(), and the per-call
glue the aio server reuses.

For a client whose hello names this server (a framed call), the handler is
wrapped around the *handler's own* request_deserializer and
response_serializer by a CallCodec (see _codec.py): a request handle is
restored inside the deserializer, so the application and every interceptor
outside shmgrpc see the real request; a large response is written out inside
the serializer. The wrapped handler is made once per route and handler and
reused by every call (rebuilding it per call cost more than the rest of
shmgrpc's work on a small call). A handle that cannot be restored becomes a
`Failed` value, and the wrapped behavior ends the call with its own status
(gRPC would turn an exception of the deserializer into INTERNAL).

The application's context is a proxy: invocation_metadata() without
shmgrpc's hello, and set_trailing_metadata() merged with the welcome (the
server's half of the handshake, sent only while the client's hello does not
name and prove this server; it travels with the status: no extra operation).
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import grpc

from . import wire
from ._codec import CallCodec, Failed, Tickets
from ._core import Engine, EngineOwner, PeerStatus, Route
from .config import Config, check_config
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


# What the sync server's worker thread is about to serialize: (id of the
# response, its call's _Sent). A sync server runs a call's behavior, then
# serializes what it returned or yielded, in the same worker thread; the
# route's shared serializer takes its call from here, and only for the very
# object the behavior gave (an interceptor that replaced the response, or
# moved the behavior to another thread, finds nothing: its responses are
# then freed by the client's ack or the lease instead of at a cancelled
# call's end).
_pending = threading.local()


class _Sent:
    """One call's offloaded responses (sync server): those still unread when
    the call ends cancelled are freed then. Made per call; its Tickets and
    the context callback only when a response is offloaded."""

    __slots__ = ("engine", "context", "tickets")

    def __init__(self, engine: Engine, context):
        self.engine = engine
        self.context = context
        self.tickets: Optional[Tickets] = None

    def keep(self, ticket) -> None:
        tickets = self.tickets
        if tickets is None:
            tickets = self.tickets = Tickets(self.engine)
            self._watch(tickets)
        tickets.add(ticket)

    def _watch(self, tickets: Tickets) -> None:
        """Free the unread ones if the call ends cancelled."""
        context = self.context
        if not context.add_callback(lambda: tickets.end(release=not _statused(context), unread_only=True)):
            tickets.end(release=True, unread_only=True)  # over already: nobody will read it


def _marked(responses: Iterator, sent: _Sent) -> Iterator:
    """The behavior's responses, each marked as this call's before grpc
    serializes it (next() as grpc would call it, so a non-iterator fails the
    same way)."""
    while True:
        try:
            response = next(responses)
        except StopIteration:
            return
        _pending.value = (id(response), sent)
        yield response


def _wrap_behavior(handler, welcome, engine: Optional[Engine] = None) -> Callable:
    """The handler's behavior, with our context and failed restores ended
    with their own status. The context comes first: its welcome must reach
    the trailers of a call that fails too (a client that reconnected to
    another server process learns it from exactly that failure). With
    `engine` (the route offloads responses), each response is marked with its
    call for the shared serializer (see _pending)."""

    if handler.request_streaming and handler.response_streaming:
        behavior = handler.stream_stream

        def stream_stream(requests, context):
            ctx = _Context(context, welcome)
            responses = behavior(_checking(requests, ctx), ctx)
            return responses if engine is None else _marked(responses, _Sent(engine, context))

        return stream_stream
    if handler.request_streaming:
        behavior = handler.stream_unary

        def stream_unary(requests, context):
            ctx = _Context(context, welcome)
            response = behavior(_checking(requests, ctx), ctx)
            if engine is not None:
                _pending.value = (id(response), _Sent(engine, context))
            return response

        return stream_unary
    if handler.response_streaming:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            ctx = _Context(context, welcome)
            responses = behavior(_checked(request, ctx), ctx)
            return responses if engine is None else _marked(responses, _Sent(engine, context))

        return unary_stream
    behavior = handler.unary_unary

    def unary_unary(request, context):
        ctx = _Context(context, welcome)
        response = behavior(_checked(request, ctx), ctx)
        if engine is not None:
            _pending.value = (id(response), _Sent(engine, context))
        return response

    return unary_unary


def _keep_of(message) -> Optional[Callable[[Any], None]]:
    """For the route's shared response serializer: the keep of the call
    that returned or yielded `message` in this thread (see _pending), or
    None."""
    pending = getattr(_pending, "value", None)
    if pending is None or pending[0] != id(message):
        return None
    _pending.value = None
    return pending[1].keep


class HandlerCache:
    """Wrapped handlers by (route, handler), each made once by `wrap` and
    reused by every call of that client and method. Keyed by identity: the
    entries hold their route and handler, so an id is never reused while
    its entry lives; bounded, oldest out first."""

    MAX = 1024  # routes x methods in use

    def __init__(self, wrap: Callable[[Optional[Route], Any], Any]):
        self._wrap = wrap
        self._entries: "collections.OrderedDict[Tuple[int, int], Tuple[Any, Any, Any]]" = collections.OrderedDict()
        self._lock = threading.Lock()  # protects _entries' changes (a get needs none)

    def get(self, route: Optional[Route], handler):
        key = (id(route), id(handler))
        entry = self._entries.get(key)
        if entry is not None and entry[0] is route and entry[1] is handler:
            return entry[2]
        wrapped = self._wrap(route, handler)
        with self._lock:
            self._entries[key] = (route, handler, wrapped)
            while len(self._entries) > self.MAX:
                self._entries.popitem(last=False)
        return wrapped


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rebuild_handler(handler, codec: CallCodec, behavior: Callable, keep_of=None, response_serializer=None):
    """A new RpcMethodHandler of the same shape, with wrapped functions
    (`keep_of`: see CallCodec.serializer; `response_serializer`: one made
    already)."""
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        behavior,
        request_deserializer=codec.deserializer(handler.request_deserializer),
        response_serializer=response_serializer or codec.serializer(handler.response_serializer, keep_of),
    )


def call_codec(engine: Engine, route: Optional[Route]) -> CallCodec:
    """A server route's codec, shared by its calls: requests may be read
    again (retries), a failed restore is a Failed value."""
    return CallCodec(engine, route, reread=True, failed_value=True)


def handshake_trailers(engine: Engine, details) -> Optional[Tuple]:
    """What the internal handshake method answers with: its trailing
    metadata (our welcome, when the client's hello needs one), or None when
    offload is off here (no handler: UNIMPLEMENTED)."""
    if not engine.ready():
        return None
    route = engine.server.route(wire.metadata_value(details.invocation_metadata, wire.HELLO_KEY))
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

    shmgrpc.server() installs it without gRPC's interceptor machinery (it
    wraps the handlers where they are registered); installed by hand, in
    grpc.server(interceptors=[...]), it works the same but every call pays
    gRPC's interceptor dispatch. Pass it the server's options too, so that
    offloaded messages meet the same size limits as inline ones (without
    them gRPC's defaults are assumed: receive 4 MiB, send unlimited)."""

    def __init__(self, config: Optional[Config] = None, *,
                 options: Optional[Sequence[Tuple[str, Any]]] = None) -> None:
        check_config(config, "shmgrpc.ServerInterceptor")
        self._engine = Engine(config, "server", options, "server")
        self._handlers = HandlerCache(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(handler_call_details)
        if handler is None:
            return self.unknown(handler_call_details)
        return self.handler_for(handler_call_details, handler)

    def handler_for(self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler that serves this call: `handler` itself for a call
        without hello, else the one wrapped for its client's route."""
        hello = wire.metadata_value(details.invocation_metadata, wire.HELLO_KEY)
        if hello is None:
            return handler
        return self._handlers.get(self._engine.server.route(hello), handler)

    def status(self) -> Tuple[PeerStatus, ...]:
        """What the large messages to and from each client route did lately,
        the newest route first (PeerStatus: per direction, the transport that
        carried them or inline and why); stats()["peers"] holds the same."""
        return tuple(self._engine.report.peer_statuses())

    def unknown(self, details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler]:
        """A method the application does not serve: the handshake method of
        clients before 0.3 and of `shmgrpc doctor`, or None (UNIMPLEMENTED)."""
        if details.method == wire.HANDSHAKE_METHOD:
            return handshake_handler(self._engine, details)
        return None

    def _wrap(self, route: Optional[Route], handler):
        """The handler for every call of `route`'s client (see HandlerCache)."""
        engine = self._engine
        behavior = _wrap_behavior(handler, route.welcome if route is not None else None,
                                  engine if route is not None and route.offloads else None)
        return rebuild_handler(handler, call_codec(engine, route), behavior, keep_of=_keep_of)


def validate_generic_handlers(generic_rpc_handlers: Iterable[Any]) -> Tuple[Any, ...]:
    """gRPC's own check (grpc/_server.py, _validate_generic_rpc_handlers), same words."""
    handlers = tuple(generic_rpc_handlers)
    for handler in handlers:
        if getattr(handler, "service", None) is None:
            raise AttributeError(f'"{handler}" must conform to'
                                 'grpc.GenericRpcHandler type but does not have "service" method!')
    return handlers


class Dispatch(grpc.GenericRpcHandler):
    """The one generic handler a shmgrpc server registers with gRPC: it finds
    the application's handler as gRPC would (registered methods first, then
    generic handlers in the order they were added) and gives it to the
    interceptor's handler_for. A call without hello gets the application's
    handler itself, through one dict lookup and one scan of its metadata."""

    def __init__(self, interceptor: Any) -> None:
        self._interceptor = interceptor
        self.registered: Dict[str, Any] = {}
        self.generic: Tuple[Any, ...] = ()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler]:
        handler = self.registered.get(handler_call_details.method)
        if handler is None:
            for generic in self.generic:
                handler = generic.service(handler_call_details)
                if handler is not None:
                    break
            else:
                return self._interceptor.unknown(handler_call_details)
        return self._interceptor.handler_for(handler_call_details, handler)

    def add_registered(self, service_name: str, method_handlers: Mapping[str, Any]) -> None:
        self.registered.update({f"/{service_name}/{method}": handler for method, handler in method_handlers.items()})


class Server(grpc.Server):
    """A grpc.Server with shmgrpc: what shmgrpc.server() returns.

    Handlers registered here reach gRPC through one generic handler (see
    Dispatch): gRPC's registered-method fast path is not used (its handler
    is fixed per method, while shmgrpc picks one per client). `shmgrpc`: the
    ServerInterceptor behind it (stats(), close())."""

    def __init__(self, inner: grpc.Server, interceptor: "ServerInterceptor", dispatch: Dispatch) -> None:
        self._inner = inner
        self._dispatch = dispatch
        self._started = False
        self.shmgrpc = interceptor

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._dispatch.generic += validate_generic_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        if self._started:  # gRPC's words and behaviour
            logging.getLogger("grpc._server").warning("Cannot register method handlers once server has started")
            return
        self._dispatch.add_registered(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._inner.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._inner.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._started = True
        self._inner.start()

    def stop(self, grace: Optional[float]) -> threading.Event:
        return self._inner.stop(grace)

    def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        return self._inner.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def server(
    thread_pool: futures.Executor,  # required, as grpc.server's: a server without one fails every call
    handlers: Optional[Sequence[grpc.GenericRpcHandler]] = None,
    interceptors: Optional[Sequence[grpc.ServerInterceptor]] = None,
    options: Optional[Sequence[Tuple[str, Any]]] = None,
    maximum_concurrent_rpcs: Optional[int] = None,
    compression: Optional[grpc.Compression] = None,
    xds: bool = False,
    *,
    config: Optional[Config] = None,
) -> Server:
    """grpc.server(...) with shmgrpc installed, innermost: your interceptors
    run first and see the real requests; shmgrpc knows the server's options.

    The ServerInterceptor is reachable as `server.shmgrpc` (stats, close)."""
    icpt = ServerInterceptor(config, options=options)
    dispatch = Dispatch(icpt)
    dispatch.generic = validate_generic_handlers(handlers or ())
    # types-grpcio asks for a ThreadPoolExecutor and a list of interceptors; grpc
    # calls only submit() of its executor and takes any sequence of interceptors.
    inner = grpc.server(
        thread_pool, handlers=[dispatch], interceptors=interceptors,  # type: ignore[arg-type]
        options=options, maximum_concurrent_rpcs=maximum_concurrent_rpcs, compression=compression, xds=xds,
    )
    return Server(inner, icpt, dispatch)
