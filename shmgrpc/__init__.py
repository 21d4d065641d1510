"""shmgrpc: large gRPC messages through shared memory between co-located
processes; plain gRPC everywhere else.

    channel = shmgrpc.insecure_channel(target, options)      # or intercept_channel(channel, options=...)
    server = shmgrpc.server(executor, options=options)       # or interceptors=[shmgrpc.ServerInterceptor()]

Messages that are buffers (numpy arrays, bytes): shmgrpc.buffer_serializer /
buffer_deserializer, one copy to send and none to receive (shmgrpc.Buffer).

Is it working? `python -m shmgrpc doctor [TARGET]`, shmgrpc.channel_status(channel),
shmgrpc.stats(); exporters in shmgrpc.metrics (prometheus, otel).
"""

import logging as _logging

from ._buffer import Buffer, buffer_deserializer, buffer_serializer
from ._channel import Channel, channel_status, insecure_channel, intercept_channel, secure_channel
from ._types import CountBytes, DirectionRecord, PeerRecord, PoolUsage, StatsSnapshot, TransportCounts
from ._version import __version__
from ._client import ClientInterceptor
from ._core import ChannelStatus, Direction, PeerStatus, stats
from ._malloc import tune_malloc
from ._server import Server, ServerInterceptor, server
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

# A library adds no handler of its own (grpcio does the same): records go to
# whatever the application configured, and nowhere otherwise.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "Buffer",
    "Channel",
    "ChannelStatus",
    "ClientInterceptor",
    "CmaBadAddress",
    "CmaError",
    "CmaNotPermitted",
    "CmaPeerGone",
    "Config",
    "ConfigError",
    "CountBytes",
    "DataLossError",
    "Direction",
    "DirectionRecord",
    "HandleError",
    "HandleTooLarge",
    "PeerGoneError",
    "PeerRecord",
    "PeerStatus",
    "PoolUsage",
    "Server",
    "ServerInterceptor",
    "ShmGrpcError",
    "StaleSessionError",
    "StatsSnapshot",
    "TransportCounts",
    "__version__",
    "buffer_deserializer",
    "buffer_serializer",
    "channel_status",
    "insecure_channel",
    "intercept_channel",
    "secure_channel",
    "server",
    "stats",
    "tune_malloc",
]
