"""shmgrpc for grpc.aio: the same offload for asyncio clients and servers.

    channel = shmgrpc.aio.insecure_channel(target, options)   # or intercept_channel(channel, options=...)
    server = shmgrpc.aio.server(options=options)              # or interceptors=[shmgrpc.aio.ServerInterceptor()]

Both interoperate with the sync side in the other process.
"""

from ._channel import Channel, insecure_channel, intercept_channel, secure_channel
from ._client import (
    StreamStreamClientInterceptor,
    StreamUnaryClientInterceptor,
    UnaryStreamClientInterceptor,
    UnaryUnaryClientInterceptor,
    client_interceptors,
)
from ._server import Server, ServerInterceptor, server

__all__ = [
    "Channel",
    "Server",
    "ServerInterceptor",
    "StreamStreamClientInterceptor",
    "StreamUnaryClientInterceptor",
    "UnaryStreamClientInterceptor",
    "UnaryUnaryClientInterceptor",
    "client_interceptors",
    "insecure_channel",
    "intercept_channel",
    "secure_channel",
    "server",
]
