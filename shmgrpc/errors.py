"""One error root for shmgrpc; every error knows the gRPC status it maps to.

Each class also inherits the builtin it resembles (pyzmq's habit), so callers
that only know the builtins still catch the right thing.
"""

from __future__ import annotations

import grpc


class ShmGrpcError(Exception):
    """Root of every shmgrpc error."""

    status_code = grpc.StatusCode.INTERNAL


class ConfigError(ShmGrpcError, ValueError):
    """A SHMGRPC_* variable or Config field has a value we do not accept."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class HandleError(ShmGrpcError, ValueError):
    """A handle is malformed, out of bounds, or names something it may not."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class HandleTooLarge(HandleError):
    """A handle describes a message longer than this receiver accepts."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StaleSessionError(ShmGrpcError):
    """A handle was addressed to another receiver (a channel reconnected to a
    different server process). The client retries such unary requests inline."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class DataLossError(ShmGrpcError):
    """The bytes behind a valid handle changed or vanished while we read them."""

    status_code = grpc.StatusCode.DATA_LOSS


class SlotReclaimed(DataLossError):
    """The sender took back the slot or pin a handle names (the handle's call
    ended, or its lease expired) before the reader read it, or while it did:
    the entry's generation moved on. Counted as DataLossError; a forged
    handle is a HandleError, whatever the entry holds now."""

    counted_as = "DataLossError"


class CallEnded(ShmGrpcError):
    """A response whose sender took it back because the call had ended (its
    deadline passed, or the application cancelled it) before this side read
    it. The call ends as gRPC ends such a call, with DEADLINE_EXCEEDED or
    CANCELLED and gRPC's own words; shmgrpc counts no error for it."""

    def __init__(self, status_code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.status_code = status_code

    @classmethod
    def deadline(cls) -> "CallEnded":
        return cls(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # grpc's own words

    @classmethod
    def cancelled(cls) -> "CallEnded":
        return cls(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")


class PeerGoneError(DataLossError, ProcessLookupError):
    """The process that offered the bytes has exited."""


class CmaError(ShmGrpcError, OSError):
    """process_vm_readv/process_vm_writev failed."""

    status_code = grpc.StatusCode.INTERNAL


class CmaNotPermitted(CmaError, PermissionError):
    """EPERM/EACCES: ptrace rules (Yama, user namespaces, seccomp) forbid it."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class CmaPeerGone(CmaError, PeerGoneError):
    """ESRCH: the peer process no longer exists."""

    status_code = grpc.StatusCode.DATA_LOSS


class CmaBadAddress(CmaError, HandleError):
    """EFAULT: the remote range is not mapped in the peer."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


__all__ = [
    "CallEnded",
    "CmaBadAddress",
    "CmaError",
    "CmaNotPermitted",
    "CmaPeerGone",
    "ConfigError",
    "DataLossError",
    "HandleError",
    "HandleTooLarge",
    "PeerGoneError",
    "ShmGrpcError",
    "SlotReclaimed",
    "StaleSessionError",
]
