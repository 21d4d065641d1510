"""shmgrpc: large gRPC messages through shared memory between co-located
processes; plain gRPC everywhere else.

    channel = shmgrpc.insecure_channel(target, options)      # or intercept_channel(channel, options=...)
    server = shmgrpc.server(executor, options=options)       # or interceptors=[shmgrpc.ServerInterceptor()]
"""

from ._channel import Channel, channel_status, insecure_channel, intercept_channel, secure_channel
from ._client import ClientInterceptor
from ._core import ChannelStatus, stats
from ._malloc import tune_malloc
from ._server import ServerInterceptor, server
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
    "Channel",
    "ChannelStatus",
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
    "channel_status",
    "insecure_channel",
    "intercept_channel",
    "secure_channel",
    "server",
    "stats",
    "tune_malloc",
]
