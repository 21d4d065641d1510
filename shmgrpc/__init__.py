"""shmgrpc: gRPC interceptors that move large messages through shared memory
between co-located processes, and step aside everywhere else."""

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
    "ShmGrpcError",
    "StaleSessionError",
]
