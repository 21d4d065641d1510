"""The old client interceptors, kept so that programs using them still run.

They offloaded by swapping the *message* for a carrier of the handle, which
every layer between the interceptor and the socket (other interceptors,
custom serializers, non-protobuf codecs) and every server without shmgrpc
took for a real message: wrong data with status OK. A grpc client
interceptor never sees the codec, and cannot tell which channel it is on,
so it cannot be made safe. They now pass every call through untouched (plain
gRPC) and say, once, what replaces them: shmgrpc.intercept_channel().
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, TypeVar

import grpc

from ._stats import Stats
from .config import Config

log = logging.getLogger(__name__)

# The pass-through methods are generic as grpc's own are: a request of any
# type in, whatever the continuation returns out.
_Request = TypeVar("_Request")
_Result = TypeVar("_Result")

DEPRECATED = (
    "shmgrpc.ClientInterceptor no longer offloads anything (it could not do so safely); "
    "calls pass through as plain gRPC. Wrap the channel instead: "
    "channel = shmgrpc.intercept_channel(channel, options=...) or shmgrpc.insecure_channel(target, options) "
    "(grpc.aio: shmgrpc.aio.intercept_channel / shmgrpc.aio.insecure_channel)."
)
_warned = False


def warn_deprecated(stacklevel: int = 2) -> None:
    global _warned
    warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=stacklevel)
    if not _warned:
        _warned = True
        log.warning("%s", DEPRECATED)


class PassThrough:
    """What the deprecated interceptors still answer: nothing in effect."""

    def __init__(self, config: Optional[Config] = None, *, _stacklevel: int = 3) -> None:
        self._config = Config.from_env() if config is None else config
        self._stats = Stats(track=False)
        warn_deprecated(stacklevel=_stacklevel)  # 1 warn_deprecated, 2 __init__, 3 who built it

    @property
    def transport(self) -> str:
        return self._config.transport

    @property
    def transports(self) -> Tuple[str, ...]:
        return ()

    def stats(self) -> Dict[str, Any]:
        snap = self._stats.snapshot()
        snap["notes"]["deprecated"] = DEPRECATED
        return snap

    def close(self) -> None:
        pass


class ClientInterceptor(
    PassThrough,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Deprecated: passes calls through untouched. Use shmgrpc.intercept_channel()."""

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], _Result],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> _Result:
        return continuation(client_call_details, request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], _Result],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> _Result:
        return continuation(client_call_details, request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Request]], _Result],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Request],
    ) -> _Result:
        return continuation(client_call_details, request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[_Request]], _Result],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[_Request],
    ) -> _Result:
        return continuation(client_call_details, request_iterator)
