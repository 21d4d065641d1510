"""The demo's array method: a numpy array in, a few words about it out.

    /blobstore.Arrays/Put   request: a float64 array's bytes, through
                            shmgrpc.buffer_deserializer (a read-only view of
                            shared memory from a co-located shmgrpc client,
                            of gRPC's bytes from anyone else); answer: JSON
                            {"count", "first", "last", "where"}

No proto: a generic handler with the buffer codec. numpy is optional (the
demo's extra); without it the method answers UNIMPLEMENTED.
"""

from __future__ import annotations

import json

import grpc

import shmgrpc
from shmgrpc.tools._maps import mapping_of

SERVICE = "blobstore.Arrays"


def describe(buffer) -> bytes:
    try:
        import numpy
    except ImportError:
        raise NotImplementedError("numpy is not installed on the server (pip install 'shmgrpc[numpy]')")
    array = numpy.frombuffer(buffer, numpy.float64)  # no copy: a view of what came
    return json.dumps({"count": len(array), "first": float(array[0]), "last": float(array[-1]),
                       "where": "shared memory" if mapping_of(buffer)["shared"] else "a copy"}).encode()


def _put(buffer, context):
    try:
        return describe(buffer)
    except NotImplementedError as err:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, str(err))


async def _aio_put(buffer, context):
    try:
        return describe(buffer)
    except NotImplementedError as err:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(err))


def add_to_server(server, aio: bool) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        _aio_put if aio else _put, request_deserializer=shmgrpc.buffer_deserializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Put": handler}),))
