"""The sync client interceptor: one class for all four RPC shapes.

Requests: a client interceptor sees message objects, not bytes, and the stub's
serializer runs after it. So a large request is serialized here, written to
the pool, and replaced by a fresh message of the same type that holds nothing
but the handle as an unknown field; the stub serializes that to exactly the
handle bytes (see wire.py).

Responses: the stub's deserializer has already run, so a handle arrives as an
unknown field of an otherwise empty message. It is found with
UnknownFieldSet (cheap: it does not copy known fields, unlike ListFields) and
the original message is parsed from shared memory.
"""

from __future__ import annotations

import collections
from typing import Any, List, Optional

import grpc

from . import wire
from ._core import Engine, EngineOwner, Route
from .config import Config
from .errors import HandleError, ShmGrpcError

try:  # protobuf >= 4.22
    from google.protobuf.unknown_fields import UnknownFieldSet as _UnknownFieldSet
except ImportError:  # pragma: no cover - older protobuf
    _UnknownFieldSet = None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


def with_hello(details, hello):
    metadata = list(details.metadata or ())
    metadata.append(hello)
    return _CallDetails(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


def handle_in(message: Any) -> Optional[bytes]:
    """The handle a response message carries, as raw handle bytes, or None.
    A call made without a response deserializer gets raw bytes: the handle
    then is the whole response."""
    if isinstance(message, (bytes, bytearray)):
        return bytes(message) if wire.looks_like_handle(message) else None
    if _UnknownFieldSet is None:
        return None
    try:
        fields = _UnknownFieldSet(message)
    except Exception:  # not a protobuf message: nothing we could have sent
        return None
    for field in fields:
        if field.field_number == wire.FIELD_NUMBER and field.wire_type == 2:
            return wire.frame(field.data)
    return None


def offload_request(engine: Engine, route: Optional[Route], request: Any, keep=None):
    """(message to send, slot or None): the request, or a carrier of its handle.
    `keep`: see Engine.offload."""
    if route is None or not (route.send_shm or route.send_cma):
        return request, None
    serialize = getattr(request, "SerializeToString", None)
    if serialize is None:
        return request, None
    handle, slot = engine.offload(serialize(), route, keep)
    if handle is None:
        return request, None
    carrier = type(request)()
    carrier.MergeFromString(handle)
    return carrier, slot


def restore_response(engine: Engine, route: Optional[Route], response: Any) -> Any:
    """The application's response; raises ShmGrpcError on a bad handle.

    `route` is the one this call's hello named: a server offloads a response
    only to a client whose hello named and proved that very server."""
    raw = handle_in(response)
    if raw is None:
        return response
    if route is None:
        raise HandleError("server sent a shmgrpc handle, but this call had no shmgrpc session")
    parse = bytes if isinstance(response, (bytes, bytearray)) else type(response).FromString
    return engine.restore(raw, route.peer, parse)


class RestoreError(grpc.RpcError, grpc.Call):
    """A response handle could not be restored: surfaces as an RpcError with
    the status the failure maps to (DATA_LOSS, INVALID_ARGUMENT, ...)."""

    def __init__(self, err: ShmGrpcError, call=None):
        super().__init__(f"shmgrpc: {err}")
        self._err = err
        self._call = call

    def code(self):
        return self._err.status_code

    def details(self):
        return f"shmgrpc: {self._err}"

    def initial_metadata(self):
        return self._call.initial_metadata() if self._call is not None else ()

    def trailing_metadata(self):
        return self._call.trailing_metadata() if self._call is not None else ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False

    def __str__(self):
        return f"<RestoreError {self._err.status_code.name}: {self._err}>"


class _Delegate:
    """Forwards the grpc.Call / grpc.Future surface to the wrapped call."""

    def __init__(self, inner):
        self._inner = inner

    def initial_metadata(self):
        return self._inner.initial_metadata()

    def trailing_metadata(self):
        return self._inner.trailing_metadata()

    def code(self):
        return self._inner.code()

    def details(self):
        return self._inner.details()

    def is_active(self):
        return self._inner.is_active()

    def time_remaining(self):
        return self._inner.time_remaining()

    def cancel(self):
        return self._inner.cancel()

    def cancelled(self):
        return self._inner.cancelled()

    def running(self):
        return self._inner.running()

    def done(self):
        return self._inner.done()

    def add_callback(self, callback):
        return self._inner.add_callback(callback)

    def traceback(self, timeout=None):
        return self._inner.traceback(timeout)


class UnaryResult(_Delegate, grpc.Call, grpc.Future):
    """A unary response that is restored the first time it is asked for."""

    def __init__(self, inner, engine: Engine, route: Optional[Route]):
        super().__init__(inner)
        self._engine = engine
        self._route = route
        self._restored = False
        self._value = None
        self._error: Optional[RestoreError] = None

    def result(self, timeout=None):
        response = self._inner.result(timeout)  # raises the call's own RpcError
        if not self._restored:
            try:
                self._engine.client_welcome(self._inner.trailing_metadata())
                self._value = restore_response(self._engine, self._route, response)
            except ShmGrpcError as err:
                self._error = RestoreError(err, self._inner)
            self._restored = True
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout=None):
        error = self._inner.exception(timeout)
        if error is not None:
            return error
        try:
            self.result(timeout)
        except RestoreError as err:
            return err
        return None

    def code(self):
        return self._error.code() if self._error is not None else self._inner.code()

    def details(self):
        return self._error.details() if self._error is not None else self._inner.details()

    def add_done_callback(self, fn):
        self._inner.add_done_callback(lambda _: fn(self))


class StreamResult(_Delegate, grpc.Call, grpc.Future):
    """A response stream whose messages are restored as they are read."""

    def __init__(self, inner, engine: Engine, route: Optional[Route]):
        super().__init__(inner)
        self._engine = engine
        self._route = route

    def __iter__(self):
        return self

    def __next__(self):
        try:
            response = next(self._inner)
        except StopIteration:
            self._engine.client_welcome(self._inner.trailing_metadata())
            raise
        try:
            return restore_response(self._engine, self._route, response)
        except ShmGrpcError as err:
            self._inner.cancel()
            raise RestoreError(err, self._inner) from None

    next = __next__

    def result(self, timeout=None):
        return self._inner.result(timeout)

    def exception(self, timeout=None):
        return self._inner.exception(timeout)

    def add_done_callback(self, fn):
        self._inner.add_done_callback(lambda _: fn(self))


def _release_when_done(engine: Engine, call, slots: List) -> None:
    """Free the request slots once the call is over (the list may still grow
    while a request stream is being sent)."""

    def release(_):
        for slot in slots:
            engine.release(slot)

    call.add_done_callback(release)


def asks_inline_retry(trailing_metadata) -> bool:
    """The server refused a handle addressed to another server process, and
    asks for the request again, inline (sync and aio clients)."""
    return wire.metadata_value(trailing_metadata, wire.RETRY_KEY) is not None


def _retry_inline(outcome) -> bool:
    """`outcome` is a failed sync call that asks_inline_retry."""
    if not isinstance(outcome, grpc.RpcError) or not outcome.done():
        return False
    try:
        trailing = outcome.trailing_metadata() or ()
    except Exception:
        return False
    return asks_inline_retry(trailing)


def handshake_details(details, hello):
    """The details of the handshake call made before `details`' call: the
    internal method, our hello as its only metadata (sync and aio clients)."""
    return _CallDetails(
        wire.HANDSHAKE_METHOD, details.timeout, [hello], details.credentials,
        getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
    )


def handshake_probe(request=None):
    """What the handshake call sends: an empty message of the unary request's
    type (the stub serializes it), no message at all for a request stream
    (request None), or None when the request type cannot be built empty."""
    if request is None:
        return iter(())
    try:
        return type(request)()
    except Exception:
        return None


class ClientInterceptor(
    EngineOwner,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Use as grpc.intercept_channel(channel, shmgrpc.ClientInterceptor()).

    One interceptor per channel: it remembers the server that channel talks to.
    """

    def __init__(self, config: Optional[Config] = None):
        self._engine = Engine(config, "client")

    def _handshake(self, continuation, details, request) -> None:
        """Once per channel, before the first call: the internal handshake
        method, so that even the first large message can be offloaded."""
        engine = self._engine
        hello = engine.client_metadata()
        if hello is None:
            return
        call = continuation(handshake_details(details, hello), request)
        try:
            if hasattr(call, "__next__"):
                for _ in call:
                    pass
            else:
                call.result()
        except Exception:  # an RpcError carries the code we look at below
            pass
        engine.client_handshake_done(call)

    def _requests(self, requests, route: Optional[Route], slots: List):
        engine = self._engine
        for request in requests:
            sent, slot = offload_request(engine, route, request)
            if slot is not None:
                slots.append(slot)
            yield sent

    def _call_state(self, continuation, details, request=None):
        """(hello, route) for this call, after the once-per-channel handshake.
        `request` is the unary request (its type carries the probe), or None
        for a request stream (the probe then sends no message)."""
        engine = self._engine
        state = engine.client_call_state()
        if state is not None and engine.client_needs_handshake():
            probe = handshake_probe(request)
            if probe is not None:
                self._handshake(continuation, details, probe)
                state = engine.client_call_state()
        return state

    def _unary_request(self, continuation, details, request):
        """Start a call with one request: (call, None) when offload is off for
        this channel, else (call, (hello, route, message sent)). The route may
        be None before a handshake has succeeded."""
        engine = self._engine
        state = self._call_state(continuation, details, request)
        if state is None:
            return continuation(details, request), None
        hello, route = state
        sent, ticket = offload_request(engine, route, request)
        call = continuation(with_hello(details, hello), sent)
        _release_when_done(engine, call, [ticket] if ticket is not None else [])
        return call, (hello, route, sent)

    def _request_stream(self, continuation, details, request_iterator):
        """Start a request-streaming call: (call, None) when offload is off for
        this channel, else (call, (route,))."""
        state = self._call_state(continuation, details)
        if state is None:
            return continuation(details, request_iterator), None
        hello, route = state
        tickets: List = []
        call = continuation(with_hello(details, hello), self._requests(request_iterator, route, tickets))
        _release_when_done(self._engine, call, tickets)
        return call, (route,)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        outcome, offload = self._unary_request(continuation, client_call_details, request)
        if offload is None:
            return outcome
        hello, route, sent = offload
        engine = self._engine
        if sent is not request and _retry_inline(outcome):
            engine.client_welcome(outcome.trailing_metadata())
            hello, route = engine.client_call_state() or (hello, None)
            outcome = continuation(with_hello(client_call_details, hello), request)
        return UnaryResult(outcome, engine, route)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        call, offload = self._unary_request(continuation, client_call_details, request)
        return call if offload is None else StreamResult(call, self._engine, offload[1])

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        outcome, offload = self._request_stream(continuation, client_call_details, request_iterator)
        return outcome if offload is None else UnaryResult(outcome, self._engine, offload[0])

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        call, offload = self._request_stream(continuation, client_call_details, request_iterator)
        return call if offload is None else StreamResult(call, self._engine, offload[0])
