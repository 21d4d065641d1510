"""A sync shmgrpc server behind an outer interceptor that does what a
user's interceptor may do to the handler shmgrpc returns (for
tests/test_server_wrapping.py):

    python -m tests._wrapped_server MODE UNIX_PATH [--aio]

MODE: "none" (no outer interceptor), "hop" (the outer interceptor runs each
behavior in a thread of its own pool, so grpc serializes the response in
another thread than the one that ran shmgrpc's behavior), "replace" (it
returns a copy of every response: not the object shmgrpc's behavior gave).
With --aio: a grpc.aio server, async handlers, and an outer aio interceptor
("hop": each unary behavior runs in a task of its own, asyncio.wait_for).

Methods (raw bytes, no codec): /wrapped.W/Get answers int(request) bytes of
a pattern; /wrapped.W/Stream answers 3 such messages; /wrapped.W/Stats
answers the server's shmgrpc stats as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from concurrent import futures

import grpc
from grpc import aio

import shmgrpc


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


class Outer(grpc.ServerInterceptor):
    def __init__(self, mode: str):
        self._mode = mode
        self._pool = futures.ThreadPoolExecutor(4)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or self._mode == "none" or handler.request_streaming:
            # (request streams are left alone, among them the old handshake
            # method that shmgrpc still answers for doctor and old clients)
            return handler
        if handler.response_streaming:
            inner = handler.unary_stream

            def stream(request, context):
                responses = self._pool.submit(inner, request, context).result()
                for response in responses:
                    yield bytes(bytearray(response)) if self._mode == "replace" else response

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        inner = handler.unary_unary

        def unary(request, context):
            response = self._pool.submit(inner, request, context).result()
            return bytes(bytearray(response)) if self._mode == "replace" else response

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def service(get, stream, stats) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("wrapped.W", {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Stats": grpc.unary_unary_rpc_method_handler(stats),
    })


class AioOuter(aio.ServerInterceptor):
    """Outer, for grpc.aio: "hop" runs each behavior in a task of its own
    (asyncio.wait_for), "replace" returns copies."""

    def __init__(self, mode: str):
        self._mode = mode

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self._mode == "none" or handler.request_streaming:
            return handler
        copy = self._mode == "replace"
        if handler.response_streaming:
            inner = handler.unary_stream

            async def stream(request, context):
                async for response in inner(request, context):
                    yield bytes(bytearray(response)) if copy else response

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        inner = handler.unary_unary

        async def unary(request, context):
            response = await asyncio.wait_for(inner(request, context), 60)
            return bytes(bytearray(response)) if copy else response

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


async def aio_main(mode: str, path: str) -> None:
    import shmgrpc.aio

    server = shmgrpc.aio.server(interceptors=[AioOuter(mode)])

    async def get(request, context):
        return pattern(int(request))

    async def stream(request, context):
        for seed in range(3):
            yield pattern(int(request), seed)

    async def stats(request, context):
        return json.dumps(server.shmgrpc.stats()).encode()

    server.add_generic_rpc_handlers((service(get, stream, stats),))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)
    server.shmgrpc.close()


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "--aio":
        asyncio.run(aio_main(mode, path))
        return
    server = shmgrpc.server(futures.ThreadPoolExecutor(8), interceptors=[Outer(mode)])

    def get(request, context):
        return pattern(int(request))

    def stream(request, context):
        for seed in range(3):
            yield pattern(int(request), seed)

    def stats(request, context):
        return json.dumps(server.shmgrpc.stats()).encode()

    server.add_generic_rpc_handlers((service(get, stream, stats),))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server.stop(None)
    server.shmgrpc.close()


if __name__ == "__main__":
    main()
