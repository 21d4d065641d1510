"""shmgrpc for grpc.aio: the same offload for asyncio clients and servers.

    channel = grpc.aio.insecure_channel(target, interceptors=shmgrpc.aio.client_interceptors())
    server = grpc.aio.server(interceptors=[shmgrpc.aio.ServerInterceptor()])

Both interoperate with the sync interceptors in the other process.
"""

from ._client import (
    StreamStreamClientInterceptor,
    StreamUnaryClientInterceptor,
    UnaryStreamClientInterceptor,
    UnaryUnaryClientInterceptor,
    client_interceptors,
)
from ._server import ServerInterceptor

__all__ = [
    "ServerInterceptor",
    "StreamStreamClientInterceptor",
    "StreamUnaryClientInterceptor",
    "UnaryStreamClientInterceptor",
    "UnaryUnaryClientInterceptor",
    "client_interceptors",
]
