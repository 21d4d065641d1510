"""Retries: where shmgrpc differs from plain gRPC, measured (README, Limits).

gRPC core keeps a request for retries only up to grpc.per_rpc_retry_buffer_size
(256 KiB by default); a call whose request is larger is committed at once and
never retried. An offloaded request crosses the socket as a handle of a few
dozen bytes, so core retries it. The same scenario, plain and through
shmgrpc: a retry policy for UNAVAILABLE, a handler that fails the first
attempt of each request, a 300 KB request. If either outcome changes, the
README's Limits entry must change with it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from concurrent import futures

import grpc
import pytest

import shmgrpc
import shmgrpc.aio
from tests.conftest import CALL_TIMEOUT, KiB, client_config

METHOD = "/test.Retry/Echo"
SIZE = 300 * 1000  # above gRPC's 256 KiB retry buffer
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "test.Retry"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG),
           ("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


class FailOnce(grpc.GenericRpcHandler):
    """Echo, failing the first attempt of every request whose first byte is
    b"F" with UNAVAILABLE; counts the attempts per request."""

    def __init__(self) -> None:
        self.attempts: Counter = Counter()
        self._lock = threading.Lock()

    def service(self, details):
        if details.method != METHOD:
            return None

        def echo(request, context):
            with self._lock:
                self.attempts[request[:8]] += 1
                first = self.attempts[request[:8]] == 1
            if request[:1] == b"F" and first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "first attempt fails")
            return request

        return grpc.unary_unary_rpc_method_handler(echo)


@pytest.fixture
def serve(tmp_path):
    made = []

    def start(with_shmgrpc: bool):
        handler = FailOnce()
        pool = futures.ThreadPoolExecutor(4)
        if with_shmgrpc:
            server = shmgrpc.server(pool, handlers=[handler], options=OPTIONS, config=client_config("shm"))
        else:
            server = grpc.server(pool, handlers=[handler], options=OPTIONS)
        target = f"unix:{tmp_path}/retry-{len(made)}.sock"
        server.add_insecure_port(target)
        server.start()
        made.append(server)
        return target, handler

    yield start
    for server in made:
        server.stop(None).wait()
        if isinstance(server, shmgrpc.Server):
            server.shmgrpc.close()


def _sync_outcome(target: str, with_shmgrpc: bool):
    if with_shmgrpc:
        channel = shmgrpc.insecure_channel(target, OPTIONS, config=client_config("shm"))
    else:
        channel = grpc.insecure_channel(target, options=OPTIONS)
    with channel:
        echo = channel.unary_unary(METHOD)
        learn = b"L" * (64 * KiB)
        assert echo(learn, timeout=CALL_TIMEOUT) == learn  # a first large call: the route
        request = b"F" + bytes(SIZE - 1)
        try:
            return "OK" if echo(request, timeout=CALL_TIMEOUT) == request else "wrong", channel_offloaded(channel)
        except grpc.RpcError as err:
            return err.code().name, channel_offloaded(channel)


async def _aio_outcome(target: str, with_shmgrpc: bool):
    if with_shmgrpc:
        channel = shmgrpc.aio.insecure_channel(target, OPTIONS, config=client_config("shm"))
    else:
        channel = grpc.aio.insecure_channel(target, options=OPTIONS)
    async with channel:
        echo = channel.unary_unary(METHOD)
        learn = b"L" * (64 * KiB)
        assert await echo(learn, timeout=CALL_TIMEOUT) == learn
        request = b"F" + bytes(SIZE - 1)
        try:
            return ("OK" if await echo(request, timeout=CALL_TIMEOUT) == request else "wrong"), \
                channel_offloaded(channel)
        except grpc.aio.AioRpcError as err:
            return err.code().name, channel_offloaded(channel)


def channel_offloaded(channel) -> int:
    return channel.stats()["offloaded"]["count"] if isinstance(channel, shmgrpc.Channel) or isinstance(
        channel, shmgrpc.aio.Channel) else 0


@pytest.mark.parametrize("api", ["sync", "aio"])
def test_a_large_request_is_retried_through_shmgrpc_not_through_plain_grpc(serve, api):
    outcomes = {}
    for with_shmgrpc in (False, True):
        target, handler = serve(with_shmgrpc)
        if api == "sync":
            outcomes[with_shmgrpc] = (*_sync_outcome(target, with_shmgrpc), handler.attempts[b"F" + bytes(7)])
        else:
            outcomes[with_shmgrpc] = (*asyncio.run(_aio_outcome(target, with_shmgrpc)),
                                      handler.attempts[b"F" + bytes(7)])
    # plain gRPC: the 300 KB request is past the retry buffer: one attempt, UNAVAILABLE
    assert outcomes[False] == ("UNAVAILABLE", 0, 1), outcomes
    # shmgrpc: the request went as a handle, core retried it: the handler ran twice, OK
    assert outcomes[True] == ("OK", 1, 2), outcomes
