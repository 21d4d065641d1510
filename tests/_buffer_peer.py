"""A server process for tests/test_buffers.py: methods whose messages are
buffers (shmgrpc.buffer_serializer / buffer_deserializer), generic handlers,
no proto. Not a test.

    python -m tests._buffer_peer '{"api": "sync", "socket": PATH, "plain": false}'

Prints READY and JSON ({"pid", "target"}) once it serves; stops on SIGTERM
(or when stdin closes), exiting 0. Its environment's SHMGRPC_* configure it.

    /bufs.Buffers/Echo         answers the request's bytes
    /bufs.Buffers/Look         answers JSON: the request's digest, its type,
                               whether its memory lies in a shared mapping of
                               this process (/proc/self/maps) and which
    /bufs.Buffers/Keep         keeps the request (held, a view of the slot
                               where it came that way); answers Look's JSON
    /bufs.Buffers/Drop         request JSON {"how": release | with | gc}: lets
                               go of every kept request that way; answers
                               whether each still had the digest it came with
    /bufs.Buffers/Fork         forks a child that lets go of its inherited
                               copies of the kept requests (released and
                               dropped) and exits; answers JSON {"child":
                               its exit status, "same": whether each kept
                               request here still has its digest}
    /bufs.Buffers/Count        request JSON {"size", "count"}: a stream of
                               `count` buffers of `size` bytes (pattern(size, i))
    /bufs.Buffers/Sum          a stream of requests in; answers their digests
    /bufs.Buffers/Each         answers every request of a stream with its bytes
    /bufs.Buffers/Stats        this server's shmgrpc stats, as JSON
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any, Dict, Iterator, List

import grpc

from shmgrpc.tools._maps import mapping_of

SERVICE = "bufs.Buffers"


def pattern(size: int, seed: int) -> bytes:
    """Deterministic bytes, different per seed (fast: a repeated block)."""
    block = hashlib.sha256(f"{seed}".encode()).digest() * 128  # 4 KiB
    return (block * (size // len(block) + 1))[:size]


def digest(buf: Any) -> str:
    return hashlib.blake2b(buf, digest_size=16).hexdigest()


def look(buf: Any) -> Dict[str, Any]:
    return {"digest": digest(buf), "type": type(buf).__name__, "length": len(buf),
            "readonly": getattr(buf, "readonly", None), **mapping_of(buf)}


class Logic:
    def __init__(self) -> None:
        self.kept: List[Any] = []
        self.kept_digests: List[str] = []
        self.lock = threading.Lock()

    def echo(self, request: Any) -> Any:
        return request

    def look(self, request: Any) -> bytes:
        return json.dumps(look(request)).encode()

    def keep(self, request: Any) -> bytes:
        out = look(request)
        with self.lock:
            self.kept.append(request)
            self.kept_digests.append(out["digest"])
        return json.dumps(out).encode()

    def drop(self, request: Any) -> bytes:
        how = json.loads(bytes(request))["how"]
        with self.lock:
            kept, self.kept = self.kept, []
            digests, self.kept_digests = self.kept_digests, []
        same = [digest(buf) == d for buf, d in zip(kept, digests)]
        if how == "release":
            for one in kept:
                one.release()
        elif how == "with":
            for one in kept:
                with one:
                    pass
        one = None  # noqa: F841 (the loop's last reference)
        kept.clear()  # "gc": the last references go here
        gc.collect()
        return json.dumps({"same": same}).encode()

    def fork(self, request: Any) -> bytes:
        with self.lock:
            pid = os.fork()
            if pid == 0:  # the child: only this thread; no gRPC here
                code = 1
                try:
                    for one in self.kept:
                        one.release()
                    self.kept.clear()  # the last references: their finalizers run here
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            same = [digest(buf) == d for buf, d in zip(self.kept, self.kept_digests)]
        return json.dumps({"child": os.waitstatus_to_exitcode(status), "same": same}).encode()

    def count(self, request: Any) -> Iterator[bytes]:
        spec = json.loads(bytes(request))
        for i in range(spec["count"]):
            yield pattern(spec["size"], i)

    def sum(self, requests: Any) -> bytes:
        return json.dumps([look(r) for r in requests]).encode()

    def stats(self, request: Any) -> bytes:
        import shmgrpc

        return json.dumps(shmgrpc.stats()).encode()


def handlers(logic: Logic, plain: bool, aio: bool) -> grpc.GenericRpcHandler:
    import shmgrpc

    # plain: a server without shmgrpc, written for bytes
    ser, de = (None, None) if plain else (shmgrpc.buffer_serializer, shmgrpc.buffer_deserializer)

    def unary(fn):
        if aio:
            async def call(request, context):
                return fn(request)
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=de, response_serializer=ser)
        return grpc.unary_unary_rpc_method_handler(lambda r, c: fn(r), request_deserializer=de,
                                                   response_serializer=ser)

    def server_stream(fn):
        if aio:
            async def call(request, context):
                for item in fn(request):
                    yield item
            return grpc.unary_stream_rpc_method_handler(call, request_deserializer=de, response_serializer=ser)
        return grpc.unary_stream_rpc_method_handler(lambda r, c: fn(r), request_deserializer=de,
                                                    response_serializer=ser)

    def client_stream(fn):
        if aio:
            async def call(requests, context):
                return fn([r async for r in requests])
            return grpc.stream_unary_rpc_method_handler(call, request_deserializer=de, response_serializer=ser)
        return grpc.stream_unary_rpc_method_handler(lambda rs, c: fn(list(rs)), request_deserializer=de,
                                                    response_serializer=ser)

    def bidi():
        if aio:
            async def call(requests, context):
                async for r in requests:
                    yield r
            return grpc.stream_stream_rpc_method_handler(call, request_deserializer=de, response_serializer=ser)
        return grpc.stream_stream_rpc_method_handler(lambda rs, c: (r for r in rs), request_deserializer=de,
                                                     response_serializer=ser)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": unary(logic.echo),
        "Look": unary(logic.look),
        "Keep": unary(logic.keep),
        "Drop": unary(logic.drop),
        "Fork": unary(logic.fork),
        "Stats": unary(logic.stats),
        "Count": server_stream(logic.count),
        "Sum": client_stream(logic.sum),
        "Each": bidi(),
    })


OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def ready(target: str) -> None:
    print("READY " + json.dumps({"pid": os.getpid(), "target": target}), flush=True)


def serve_sync(spec: Dict[str, Any]) -> None:
    import shmgrpc

    logic = Logic()
    executor = futures.ThreadPoolExecutor(8)
    server = grpc.server(executor, options=OPTIONS) if spec.get("plain") else shmgrpc.server(executor, options=OPTIONS)
    server.add_generic_rpc_handlers((handlers(logic, bool(spec.get("plain")), False),))
    target = "unix:" + spec["socket"]
    server.add_insecure_port(target)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ready(target)
    stop.wait()
    server.stop(None)
    logic.kept.clear()
    shmgrpc.stats()


async def serve_aio(spec: Dict[str, Any]) -> None:
    from grpc import aio

    import shmgrpc.aio

    logic = Logic()
    server = aio.server(options=OPTIONS) if spec.get("plain") else shmgrpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handlers(logic, bool(spec.get("plain")), True),))
    target = "unix:" + spec["socket"]
    server.add_insecure_port(target)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.read(), stop.set()))
    ready(target)
    await stop.wait()
    await server.stop(None)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec.get("api") == "aio":
        asyncio.run(serve_aio(spec))
    else:
        serve_sync(spec)
