"""The old grpc.aio client interceptors, kept so that programs using them
still run: they pass every call through untouched (see shmgrpc._client for
why) and say, once, what replaces them: shmgrpc.aio.intercept_channel()."""

from __future__ import annotations

from typing import AsyncIterable, Awaitable, Callable, Iterable, List, Optional, TypeVar, Union

from grpc import aio

from .._client import PassThrough
from ..config import Config

# Generic as grpc.aio's own methods are: a request of any type in, whatever
# the continuation's call resolves to out.
_Request = TypeVar("_Request")
_Call = TypeVar("_Call")
_Requests = Union[AsyncIterable[_Request], Iterable[_Request]]


class UnaryUnaryClientInterceptor(PassThrough, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, _Request], Awaitable[_Call]],
        client_call_details: aio.ClientCallDetails,
        request: _Request,
    ) -> _Call:
        return await continuation(client_call_details, request)


class UnaryStreamClientInterceptor(PassThrough, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[aio.ClientCallDetails, _Request], Awaitable[_Call]],
        client_call_details: aio.ClientCallDetails,
        request: _Request,
    ) -> _Call:
        return await continuation(client_call_details, request)


class StreamUnaryClientInterceptor(PassThrough, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, _Requests[_Request]], Awaitable[_Call]],
        client_call_details: aio.ClientCallDetails,
        request_iterator: _Requests[_Request],
    ) -> _Call:
        return await continuation(client_call_details, request_iterator)


class StreamStreamClientInterceptor(PassThrough, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[[aio.ClientCallDetails, _Requests[_Request]], Awaitable[_Call]],
        client_call_details: aio.ClientCallDetails,
        request_iterator: _Requests[_Request],
    ) -> _Call:
        return await continuation(client_call_details, request_iterator)


def client_interceptors(config: Optional[Config] = None) -> List[UnaryUnaryClientInterceptor]:
    """Deprecated: pass-through interceptors. Use shmgrpc.aio.intercept_channel()."""
    return [UnaryUnaryClientInterceptor(config, _stacklevel=4)]  # the caller of client_interceptors()
