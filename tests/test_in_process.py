"""A client and a server in the same process (a service calling itself, an
in-process test): the route learned once per channel, large messages offloaded
through a transport that works within one process, and a settled status.
Each process has one node, so the two ends share one peer id: a memfd side
connection from the process to itself cannot be told apart from its other
end (it used to be lost and learned again on every call)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

import shmgrpc
from shmgrpc import wire
from tests.conftest import CALL_TIMEOUT, THRESHOLD, client_config

ECHO = "/shmgrpc.test.InProcess/Echo"
CALLS = 20


class _CountHandshakes(grpc.ServerInterceptor):
    """Outside shmgrpc: would see any handshake call (there is none)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def intercept_service(self, continuation, details):
        if details.method == wire.HANDSHAKE_METHOD:
            with self._lock:
                self.count += 1
        return continuation(details)


class _Echo(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method != ECHO:
            return None
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: request,
            request_deserializer=BytesValue.FromString,
            response_serializer=BytesValue.SerializeToString,
        )


@pytest.fixture
def in_process(tmp_path):
    def start(transport: str):
        handshakes = _CountHandshakes()
        server = shmgrpc.server(futures.ThreadPoolExecutor(4), handlers=[_Echo()], interceptors=[handshakes],
                                config=client_config(transport))
        target = f"unix:{tmp_path}/in-process.sock"
        server.add_insecure_port(target)
        server.start()
        channel = shmgrpc.insecure_channel(target, config=client_config(transport))
        made.append((server, channel))
        return server, channel, handshakes

    made = []
    yield start
    for server, channel in made:
        channel.close()
        server.stop(None).wait()
        server.shmgrpc.close()


def _echo_many(channel) -> dict:
    echo = channel.unary_unary(ECHO, BytesValue.SerializeToString, BytesValue.FromString)
    before = channel.stats()
    for i in range(CALLS):
        request = BytesValue(value=bytes([i]) * (4 * THRESHOLD))
        assert echo(request, timeout=CALL_TIMEOUT) == request
    after = channel.stats()
    return {"offloaded": after["offloaded"]["count"] - before["offloaded"]["count"],
            "restored": after["restored"]["count"] - before["restored"]["count"]}


def test_default_transports_settle_once_and_offload(in_process):
    server, channel, handshakes = in_process("auto")
    moved = _echo_many(channel)
    status = channel.status()
    assert handshakes.count == 0
    assert status.settled and status.transport in ("shm", "cma"), status
    assert "memfd" not in status.transports, status
    # The first call learns the route (inline); every later request out and
    # response back (a route lost after each call would offload nothing).
    assert moved == {"offloaded": CALLS - 1, "restored": CALLS - 1}


def test_memfd_alone_goes_inline_once_settled(in_process):
    server, channel, handshakes = in_process("memfd")
    moved = _echo_many(channel)
    status = channel.status()
    assert handshakes.count == 0
    assert status.settled and status.transport == "inline", status
    assert moved == {"offloaded": 0, "restored": 0}
