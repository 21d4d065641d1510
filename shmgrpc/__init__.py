"""shmgrpc: gRPC interceptors that move large messages through shared memory
between co-located processes, and step aside everywhere else.

    channel = grpc.intercept_channel(channel, shmgrpc.ClientInterceptor())
    server = grpc.server(executor, interceptors=[shmgrpc.ServerInterceptor()])
"""

from ._client import ClientInterceptor
from ._core import stats
from ._server import ServerInterceptor
from .config import Config
from .errors import (
    CmaBadAddress,
    CmaError,
    CmaNotPermitted,
    CmaPeerGone,
    ConfigError,
    DataLossError,
    HandleError,
    HandleTooLarge,
    PeerGoneError,
    ShmGrpcError,
    StaleSessionError,
)

__all__ = [
    "ClientInterceptor",
    "CmaBadAddress",
    "CmaError",
    "CmaNotPermitted",
    "CmaPeerGone",
    "Config",
    "ConfigError",
    "DataLossError",
    "HandleError",
    "HandleTooLarge",
    "PeerGoneError",
    "ServerInterceptor",
    "ShmGrpcError",
    "StaleSessionError",
    "stats",
]
