"""The one error the client example reports as FAIL (exit status 1)."""

from __future__ import annotations

import grpc


class Failure(Exception):
    """Something the demo promised did not happen: wrong bytes, a failed RPC,
    a server that did not start or stop, shared memory left behind."""


def rpc_failure(what: str, error: grpc.RpcError) -> Failure:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return Failure(f"{what}: {code.name if code else 'RPC error'}: {details}")
